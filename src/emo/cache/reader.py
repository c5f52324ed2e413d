"""Reading a finished feature cache, with checks that turn a foreign file into a clear error."""

import json
from pathlib import Path

import h5py
import numpy as np

from emo.cache.schema import FORMAT_NAME, REQUIRED_ATTRS, SCHEMA_VERSION
from emo.errors import CacheError


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
        if stage not in self.stages:
            raise CacheError(f"cache {self.path} has no stage {stage!r}; it has {', '.join(self.stages)}")
        rows = self.indices(split)
        data = self._file["features"][stage]
        return data[rows].astype(np.float32) if len(rows) else np.zeros((0, data.shape[1]), np.float32)

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
