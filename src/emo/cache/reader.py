"""Reading a finished feature cache, with checks that turn a foreign file into a clear error."""

import json
from pathlib import Path

import h5py
import numpy as np
import torch

from emo.cache.schema import FORMAT_NAME, REQUIRED_ATTRS, SCHEMA_VERSION
from emo.errors import CacheError

# File rows per contiguous read in FeatureCache.read_rows; bounds its temporary copy to a few MB.
READ_BLOCK_ROWS = 1024


class FeatureCache:
    """A finished feature cache opened for reading.

    Each process (and each DataLoader worker) should open its own instance.

    Example:
        >>> with FeatureCache("emotion6.h5") as cache:  # doctest: +SKIP
        ...     x = cache.features("L4", "train")
        ...     y = cache.labels("train")
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._file = _open_h5(self.path)
        try:
            self.attrs = _checked_attrs(self._file, self.path)
        except CacheError:
            self._file.close()
            raise
        self.classes: list[str] = json.loads(self.attrs["classes"])
        self.stages: dict[str, int] = json.loads(self.attrs["stages"])
        self.weights: dict = json.loads(self.attrs["weights"])
        self.normalization: dict = json.loads(self.attrs["normalization"])
        self._split = self._file["split"].asstr()[:]

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def __len__(self) -> int:
        return len(self._split)

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
            span = torch.from_numpy(data[rows[low]:rows[high - 1] + 1])  # [<= READ_BLOCK_ROWS, C], stored dtype
            picked = span if len(span) == high - low else span[torch.from_numpy(rows[low:high] - rows[low])]
            # torch converts float16 to float32 several times faster than numpy's assignment does.
            torch.from_numpy(out[low:high]).copy_(picked)
        return out

    def labels(self, split: str | None = None) -> np.ndarray:
        """Return the class index of each row of ``split``."""
        return self._file["labels"][:][self.indices(split)]

    def paths(self, split: str | None = None) -> list[str]:
        """Return the dataset-relative path of each row of ``split``."""
        return self._file["paths"].asstr()[:][self.indices(split)].tolist()

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

    def require_classes(self, classes: list[str]) -> None:
        """Raise CacheError unless this cache's classes are exactly ``classes``, in order."""
        if self.classes != list(classes):
            raise CacheError(f"cache {self.path} has classes {self.classes}, but the run expects {list(classes)}")


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise CacheError(f"cache {path} not found; create it with `emo extract`")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise CacheError(f"{path} is not a readable HDF5 file (truncated or another format): {error}") from error


def _checked_attrs(file: h5py.File, path: Path) -> dict:
    attrs = dict(file.attrs)
    if attrs.get("format") != FORMAT_NAME:
        raise CacheError(f"{path} is an HDF5 file but not an emo-vision feature cache")
    missing = [name for name in REQUIRED_ATTRS if name not in attrs]
    if missing:
        raise CacheError(f"cache {path} lacks attribute {missing[0]!r}; recreate it with `emo extract`")
    version = int(attrs["schema_version"])
    if version > SCHEMA_VERSION:
        raise CacheError(f"cache {path} has schema version {version}, newer than this emo-vision "
                         f"supports ({SCHEMA_VERSION}); upgrade emo-vision")
    if version < SCHEMA_VERSION:
        raise CacheError(f"cache {path} has old schema version {version}; recreate it with `emo extract`")
    if not bool(attrs["complete"]):
        raise CacheError(f"cache {path} is incomplete; rerun the same `emo extract` command to finish it")
    for name in ("features", "labels", "split", "paths", "written"):
        if name not in file:
            raise CacheError(f"cache {path} lacks dataset {name!r}; recreate it with `emo extract`")
    return attrs
