"""Reading a finished feature cache, with checks that turn a foreign or damaged file into a clear error."""

import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import torch

from emo.cache.schema import FORMAT_NAME, REQUIRED_ATTRS, SCHEMA_VERSION
from emo.errors import CacheError

ROW_DATASETS = ("labels", "split", "paths", "written")
JSON_ATTRS = ("classes", "stages", "weights", "normalization")
# File rows per contiguous read in FeatureCache.read_rows; bounds its temporary copy to a few MB.
READ_BLOCK_ROWS = 1024


class FeatureCache:
    """A finished feature cache opened for reading.

    Each process (and each DataLoader worker) should open its own instance; any number of
    readers may have the same cache open at once.

    Raises:
        CacheError: if the file is missing, not HDF5, not a feature cache, of another schema
            version, incomplete or internally inconsistent.

    Example:
        >>> with FeatureCache("emotion6.h5") as cache:  # doctest: +SKIP
        ...     x = cache.features("L4", "train")
        ...     y = cache.labels("train")
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._file = _open_h5(self.path)
        try:
            self.attrs = self._read(lambda: _checked_attrs(self._file, self.path))
            values = _json_attrs(self.attrs, self.path)
            self.classes: list[str] = values["classes"]
            self.stages: dict[str, int] = values["stages"]
            self.weights: dict = values["weights"]
            self.normalization: dict = values["normalization"]
            self._split = self._read(lambda: self._file["split"].asstr()[:])
            self._read(lambda: _check_rows(self._file, self.path, self.classes, self.stages))
        except CacheError:
            self._file.close()
            raise

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def __len__(self) -> int:
        return len(self._split)

    def _read(self, read):
        """Call ``read`` and turn an HDF5 failure (damaged file, I/O error) into a CacheError."""
        try:
            return read()
        except (OSError, KeyError) as error:
            raise CacheError(f"reading cache {self.path} failed ({hdf5_error_reason(error)}); the file is damaged "
                             "or its disk failed, so recreate it with `emo extract`") from error

    def indices(self, split: str | None = None) -> np.ndarray:
        """Return the row indices of ``split`` (all rows when None), in increasing order."""
        if split is None:
            return np.arange(len(self))
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; use train, val or test")
        return np.flatnonzero(self._split == split)

    def features(self, stage: str, split: str | None = None) -> np.ndarray:
        """Return the float32 features [rows, C] of one stage for one split."""
        return self.read_rows(stage, self.indices(split))

    def read_rows(self, stage: str, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Return the float32 features [len(rows), C] of one stage at the increasing row indices ``rows``.

        Rows are read as contiguous blocks of the file and picked in memory, which is much faster
        than h5py's selection of thousands of single rows.

        Args:
            stage: the stage name.
            rows: row indices in increasing order.
            out: a float32 array [len(rows), C] (a column slice of a larger array is fine) to fill
                instead of allocating a new one.

        Example:
            >>> with FeatureCache("emotion6.h5") as cache:  # doctest: +SKIP
            ...     cache.read_rows("L4", np.array([0, 5, 6])).shape
            (3, 2048)
        """
        if stage not in self.stages:
            raise CacheError(f"cache {self.path} has no stage {stage!r}; it has {', '.join(self.stages)}")
        data = self._file["features"][stage]
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), data.shape[1]), dtype=np.float32)
        if not len(rows):
            return out
        for block_start in range(int(rows[0]), int(rows[-1]) + 1, READ_BLOCK_ROWS):
            low, high = np.searchsorted(rows, [block_start, block_start + READ_BLOCK_ROWS])
            if low == high:
                continue
            span = torch.from_numpy(self._read(lambda: data[rows[low]:rows[high - 1] + 1]))  # [<= READ_BLOCK_ROWS, C], stored dtype
            picked = span if len(span) == high - low else span[torch.from_numpy(rows[low:high] - rows[low])]
            # torch converts float16 to float32 several times faster than numpy's assignment does.
            torch.from_numpy(out[low:high]).copy_(picked)
        return out

    def labels(self, split: str | None = None) -> np.ndarray:
        """Return the class index of each row of ``split``."""
        return self._read(lambda: self._file["labels"][:])[self.indices(split)]

    def paths(self, split: str | None = None) -> list[str]:
        """Return the dataset-relative path of each row of ``split``."""
        return self._read(lambda: self._file["paths"].asstr()[:])[self.indices(split)].tolist()

    def backbone_record(self) -> dict:
        """Return what a run needs to rebuild the backbone that made this cache."""
        return {
            "arch": self.attrs["arch"],
            "weights": self.weights,
            "image_size": int(self.attrs["image_size"]),
            "resize_size": int(self.attrs["resize_size"]),
            "normalization": self.normalization,
            "precision": self.attrs["precision"],
        }

    def split_sha256(self) -> str:
        """Return a SHA-256 over the sorted (path, split) pairs, which identifies the split assignment.

        Two caches of the same images split the same way have the same digest, whatever their row
        order, weights or storage type.
        """
        pairs = sorted(zip(self.paths(), self._split.tolist()))
        return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()

    def run_record(self) -> dict:
        """Return what a run records about the cache it was trained on: path, fingerprint and split digest."""
        return {"path": str(self.path.resolve()), "fingerprint": str(self.attrs["fingerprint"]),
                "split_sha256": self.split_sha256()}

    def require_classes(self, classes: list[str]) -> None:
        """Raise CacheError unless this cache's classes are exactly ``classes``, in order."""
        if self.classes != list(classes):
            raise CacheError(f"cache {self.path} has classes {self.classes}, but the run expects {list(classes)}; "
                             "use a cache extracted from a dataset with the run's classes")


def hdf5_lock_failed(error: OSError) -> bool:
    """Return whether an h5py open failed because HDF5 could not lock the file."""
    return "unable to lock file" in str(error)


def hdf5_error_reason(error: Exception) -> str:
    """Return the operating system's message inside an h5py error, or its first line.

    HDF5 reports a failed write as several lines with buffer addresses and offsets. Of these, a
    user needs the ``error message = '...'`` field, for example 'No space left on device'.

    Example:
        >>> hdf5_error_reason(OSError("Can't write data (file write failed: errno = 122, "
        ...                           "error message = 'Disk quota exceeded', buf = 0x1)"))
        'Disk quota exceeded'
    """
    text = str(error)
    match = re.search(r"error message = '([^']*)'", text)
    if match:
        return match.group(1)
    return text.splitlines()[0] if text else type(error).__name__


def _open_h5(path: Path) -> h5py.File:
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not a feature cache; pass the .h5 file written by `emo extract` "
                         f"(to extract one from images, run `emo extract {path} --out FILE.h5`)")
    if not path.is_file():
        raise CacheError(f"cache {path} not found; create it with `emo extract`")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        if hdf5_lock_failed(error):
            raise CacheError(f"cannot lock {path} for reading ({error}); another program is writing it, or "
                             "the file system has no locks (then set HDF5_USE_FILE_LOCKING=FALSE)") from error
        raise CacheError(f"{path} is not a readable HDF5 file (truncated or another format): {error}") from error


def _checked_attrs(file: h5py.File, path: Path) -> dict:
    attrs = dict(file.attrs)
    if attrs.get("format") != FORMAT_NAME:
        raise CacheError(f"{path} is an HDF5 file but not an emo-vision feature cache")
    missing = [name for name in REQUIRED_ATTRS if name not in attrs]
    if missing:
        raise CacheError(f"cache {path} lacks attribute {missing[0]!r}; recreate it with `emo extract`")
    try:
        version = int(attrs["schema_version"])
    except (TypeError, ValueError) as error:
        raise CacheError(f"cache {path} has an invalid schema version {attrs['schema_version']!r}") from error
    if version > SCHEMA_VERSION:
        raise CacheError(f"cache {path} has schema version {version}, newer than this emo-vision "
                         f"supports ({SCHEMA_VERSION}); upgrade emo-vision")
    if version < SCHEMA_VERSION:
        raise CacheError(f"cache {path} has old schema version {version}; recreate it with `emo extract`")
    if not bool(attrs["complete"]):
        raise CacheError(f"cache {path} is incomplete; rerun the same `emo extract` command to finish it")
    for name in ("features", *ROW_DATASETS):
        if name not in file:
            raise CacheError(f"cache {path} lacks dataset {name!r}; recreate it with `emo extract`")
    return attrs


def _json_attrs(attrs: dict, path: Path) -> dict:
    values = {}
    for name in JSON_ATTRS:
        try:
            values[name] = json.loads(attrs[name])
        except (TypeError, ValueError) as error:
            raise CacheError(f"cache {path} has an invalid {name!r} attribute: {error}") from error
    if not isinstance(values["classes"], list) or not all(isinstance(name, str) for name in values["classes"]):
        raise CacheError(f"cache {path}: attribute 'classes' is not a list of class names")
    if not isinstance(values["stages"], dict):
        raise CacheError(f"cache {path}: attribute 'stages' is not a mapping of stage names to channels")
    return values


def _check_rows(file: h5py.File, path: Path, classes: list[str], stages: dict[str, int]) -> None:
    """Check that every dataset has one row per image, every row is written and labels index ``classes``."""
    rows = len(file["labels"])
    shapes = {name: file[name].shape for name in ROW_DATASETS}
    shapes.update({f"features/{name}": file["features"][name].shape for name in stages if name in file["features"]})
    written = file["written"][:]
    labels = file["labels"][:]
    expected = {name: (rows,) for name in ROW_DATASETS}
    expected.update({f"features/{name}": (rows, channels) for name, channels in stages.items()})
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise CacheError(f"cache {path}: dataset {name} has shape {shapes.get(name)}, expected {shape}; "
                             "recreate it with `emo extract`")
    if not np.all(written):
        raise CacheError(f"cache {path} is marked complete but {np.count_nonzero(~written)} row(s) were never "
                         "written; recreate it with `emo extract`")
    if rows and (labels.min() < 0 or labels.max() >= len(classes)):
        raise CacheError(f"cache {path} has label indices outside 0..{len(classes) - 1} ({len(classes)} classes); "
                         "recreate it with `emo extract`")
