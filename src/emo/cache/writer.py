"""Writing a feature cache: preallocated rows filled by sample index, in a ``.partial`` file
that is renamed into place only when every row has been written.

A partial file whose fingerprint matches the current command is resumed; one made by a different
command is replaced only with ``overwrite``.
"""

import fcntl
import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from emo import __version__
from emo.cache.schema import FORMAT_NAME, LOCK_SUFFIX, PARTIAL_SUFFIX, POOLING, SCHEMA_VERSION
from emo.errors import CacheError

logger = logging.getLogger(__name__)

# Rows per HDF5 chunk: large enough for fast sequential writes, small enough to read a split cheaply.
CHUNK_ROWS = 256


class CacheWriter:
    """Create or resume a cache file and write pooled features into it by row index.

    Use as a context manager; :meth:`finish` checks that every row was written and moves the
    partial file into place.
    """

    def __init__(self, path: Path, *, header: dict, columns: dict, stages: dict[str, int], dtype: str,
                 overwrite: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.header = header
        self.columns = columns
        self.stages = stages
        self.dtype = dtype
        self.overwrite = overwrite
        self._lock_file = None
        self.file: h5py.File | None = None

    def __enter__(self) -> "CacheWriter":
        self._check_destination()
        self._acquire_lock()
        try:
            self.file = self._open_or_resume()
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        self._release_lock()

    def _check_destination(self) -> None:
        if not self.path.parent.is_dir():
            raise CacheError(f"output folder {self.path.parent} does not exist; create it first")
        if not os.access(self.path.parent, os.W_OK):
            raise CacheError(f"output folder {self.path.parent} is not writable")
        if self.path.exists() and not self.overwrite:
            raise CacheError(f"cache {self.path} already exists; pass --overwrite to replace it "
                             "(it is kept until the new one is complete)")

    def _acquire_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + LOCK_SUFFIX)
        self._lock_file = open(lock_path, "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            self._lock_file.close()
            self._lock_file = None
            raise CacheError(f"cache {self.path} is in use by another `emo extract` (lock {lock_path})") from error

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _open_or_resume(self) -> h5py.File:
        if self.partial.exists():
            file = self._try_resume()
            if file is not None:
                return file
        return self._create()

    def _try_resume(self) -> h5py.File | None:
        try:
            file = h5py.File(self.partial, "r+")
        except OSError:
            logger.warning("partial cache %s is unreadable; starting over", self.partial)
            return None
        if file.attrs.get("fingerprint") == self.header["fingerprint"] and "written" in file:
            done = int(np.count_nonzero(file["written"][:]))
            logger.info("resuming %s: %d of %d rows already written", self.partial, done, len(file["written"]))
            return file
        file.close()
        if not self.overwrite:
            raise CacheError(f"{self.partial} was started by a different command (other weights, image size, "
                             "classes, files or split); pass --overwrite to discard it and start over")
        logger.warning("discarding %s, which was started by a different command", self.partial)
        return None

    def _create(self) -> h5py.File:
        rows = len(self.columns["labels"])
        file = h5py.File(self.partial, "w")
        features = file.create_group("features")
        for name, channels in self.stages.items():
            features.create_dataset(name, shape=(rows, channels), dtype=self.dtype,
                                    chunks=(min(CHUNK_ROWS, max(rows, 1)), channels))
        file.create_dataset("labels", data=np.asarray(self.columns["labels"], dtype=np.int64))
        for name in ("split", "paths", "sha256"):
            file.create_dataset(name, data=np.asarray(self.columns[name], dtype=object), dtype=h5py.string_dtype())
        file.create_dataset("written", data=np.zeros(rows, dtype=bool))
        self._write_header(file)
        return file

    def _write_header(self, file: h5py.File) -> None:
        attrs = {
            "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "emo_version": __version__,
            "pooling": POOLING, "dtype": self.dtype, "stages": json.dumps(self.stages), "complete": False,
        }
        attrs.update(self.header)
        for key, value in attrs.items():
            file.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value

    def pending_rows(self) -> np.ndarray:
        """Return the indices of rows not written yet, in increasing order."""
        return np.flatnonzero(~self.file["written"][:])

    def write(self, rows: np.ndarray, pooled: dict[str, np.ndarray]) -> None:
        """Write the pooled features of ``rows`` (increasing indices) and mark the rows written."""
        selection = _as_selection(rows)
        for name, values in pooled.items():
            _check_representable(name, values, self.dtype)
            self.file["features"][name][selection] = values.astype(self.dtype, copy=False)
        # Mark rows only after their features are in the file, so a crash never marks an empty row.
        self.file["written"][selection] = True

    def finish(self) -> None:
        """Check that every row was written, mark the cache complete and move it into place."""
        missing = self.pending_rows()
        if len(missing):
            raise CacheError(f"{len(missing)} row(s) of {self.partial} were never written, e.g. row {missing[0]}")
        self.file.attrs["complete"] = True
        self.file.close()
        self.file = None
        os.replace(self.partial, self.path)


def _check_representable(stage: str, values: np.ndarray, dtype: str) -> None:
    """Raise CacheError if a stage output is not finite or would overflow the storage type."""
    if not np.isfinite(values).all():
        raise CacheError(f"stage {stage} produced NaN or infinite values; check the backbone weights")
    largest = float(np.abs(values).max(initial=0.0))
    limit = float(np.finfo(dtype).max)
    if largest > limit:
        raise CacheError(f"stage {stage} has values up to {largest:.3g}, beyond the {dtype} range ({limit:.3g}); "
                         "pass --dtype float32")


def _as_selection(rows: np.ndarray):
    """Return a slice for consecutive rows (fast in h5py) or the index array otherwise."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows
