"""Writing a feature cache: preallocated rows filled by sample index, in a ``.partial`` file
that is renamed into place only when every row has been written.

A partial file whose fingerprint matches the current command is resumed; one made by a different
command is replaced only with ``overwrite``, unless it contains no written row and so costs nothing to lose.

Crash safety rests on three rules. The partial file is built under a temporary name with every
dataset allocated and is renamed to ``NAME.h5.partial`` only then, so a partial file always has
its full header. After that, writes change only raw data, never HDF5 metadata. Each batch's
features are flushed before its rows are flagged in ``written`` (and the flags flushed), so a
process killed at any moment leaves rows that are either flagged and complete or unflagged.
NOTE: flushes reach the operating system, not the disk; a power cut can still lose or damage rows.
"""

import fcntl
import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from emo import __version__
from emo.cache.reader import hdf5_error_reason, hdf5_lock_failed
from emo.cache.schema import FORMAT_NAME, LOCK_SUFFIX, PARTIAL_SUFFIX, POOLING, SCHEMA_VERSION
from emo.errors import CacheError

logger = logging.getLogger(__name__)

# Rows per HDF5 chunk: large enough for fast sequential writes, small enough to read a split cheaply.
CHUNK_ROWS = 256
# Suffix of the file a new partial cache is built in before it is renamed to NAME.h5.partial.
STAGING_SUFFIX = ".tmp"
# User-facing names of the fingerprint parts, for the message that explains why a partial file is not resumed.
FINGERPRINT_PART_NAMES = {"weights_sha256": "weights", "rows": "rows (file list, labels, split or file contents)"}


def check_destination(path: Path, *, overwrite: bool) -> None:
    """Raise CacheError unless a cache can be written at ``path``.

    Cheap enough to call before scanning a dataset, so a wrong ``--out`` fails in seconds.

    Args:
        path: the cache file to write.
        overwrite: whether an existing cache at ``path`` may be replaced.

    Example:
        >>> check_destination(Path("/no/such/folder/cache.h5"), overwrite=False)  # doctest: +SKIP
        Traceback (most recent call last):
        emo.errors.CacheError: output folder /no/such/folder does not exist; create it first
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise CacheError(f"output folder {path.parent} does not exist; create it first")
    # os.access reports a read-only file system even for root, who otherwise may write anywhere.
    if not os.access(path.parent, os.W_OK):
        raise CacheError(f"output folder {path.parent} is not writable; choose another --out")
    if path.exists() and not overwrite:
        raise CacheError(f"cache {path} already exists; pass --overwrite to replace it "
                         "(it is kept until the new one is complete)")


class CacheWriter:
    """Create or resume a cache file and write pooled features into it by row index.

    Use as a context manager; :meth:`finish` checks that every row was written and moves the
    partial file into place. ``header`` contains the cache attributes, including ``fingerprint``
    and, to explain a mismatch, ``fingerprint_parts``.
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
        check_destination(self.path, overwrite=self.overwrite)
        self._acquire_lock()
        try:
            self.file = self._open_or_resume()
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is KeyboardInterrupt and self.file is not None:
            logger.warning("interrupted; the partial cache %s is kept, so rerun the same command to resume "
                           "without recomputing its finished rows", self.partial)
        try:
            self._close(failing=exc is not None)
        finally:
            self._release_lock()

    def _close(self, *, failing: bool) -> None:
        if self.file is None:
            return
        file, self.file = self.file, None
        try:
            file.close()
        except (OSError, ValueError) as error:
            if not failing:
                raise CacheError(f"closing {self.partial} failed: {hdf5_error_reason(error)}") from error
            # Only log this one, so the error that ended the extraction is the one the user sees.
            logger.warning("closing %s after an error failed as well: %s", self.partial, error)

    def _acquire_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + LOCK_SUFFIX)
        try:
            self._lock_file = open(lock_path, "a")
        except OSError as error:
            raise CacheError(f"cannot create lock file {lock_path}: {error.strerror or error}") from error
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._lock_file.close()
            self._lock_file = None
            if isinstance(error, BlockingIOError):
                raise CacheError(f"cache {self.path} is in use by another `emo extract` (lock {lock_path})") from error
            raise CacheError(f"cannot lock {lock_path}: {error.strerror or error}; write the cache to a local "
                             "file system") from error

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
        self._create()
        return self._open_partial()

    def _open_partial(self) -> h5py.File:
        try:
            return h5py.File(self.partial, "r+")
        except OSError as error:
            raise CacheError(f"cannot open {self.partial}: {hdf5_error_reason(error)}") from error

    def _try_resume(self) -> h5py.File | None:
        """Open the partial file for a resume; return None when it must be rebuilt."""
        try:
            file = h5py.File(self.partial, "r+")
        except OSError as error:
            if hdf5_lock_failed(error):
                raise CacheError(f"{self.partial} is open in another program; close it and rerun") from error
            logger.warning("partial cache %s is unreadable (%s); starting over", self.partial, error)
            return None
        try:
            if file.attrs.get("fingerprint") != self.header["fingerprint"]:
                changed = _changed_parts(file.attrs.get("fingerprint_parts"), self.header.get("fingerprint_parts"))
                empty = "written" in file and not np.any(file["written"][:])
                file.close()
                self._discard_other_command(changed, empty=empty)
                return None
            problem = self._layout_problem(file)
            done = int(np.count_nonzero(file["written"][:])) if problem is None else 0
        except OSError as error:
            problem = str(error)
        if problem:
            file.close()
            logger.warning("partial cache %s is damaged (%s); starting over", self.partial, problem)
            return None
        logger.info("resuming %s: %d of %d rows already written", self.partial, done, len(file["written"]))
        return file

    def _discard_other_command(self, changed: str, *, empty: bool) -> None:
        # A partial without rows is what an error in the first batch leaves (for example a float16
        # overflow), so the corrected command replaces it without --overwrite.
        if empty:
            logger.info("replacing %s, which another command started but which contains no rows (%s)", self.partial,
                        changed)
        elif not self.overwrite:
            raise CacheError(f"{self.partial} was started by a different command ({changed}); pass --overwrite "
                             "to discard it and start over, or rerun the command that started it")
        else:
            logger.warning("discarding %s, which was started by a different command (%s)", self.partial, changed)
        # Free its space before the new file is built next to it.
        self.partial.unlink()

    def _layout_problem(self, file: h5py.File) -> str | None:
        rows = len(self.columns["labels"])
        for name in ("labels", "split", "paths", "sha256", "written"):
            if name not in file or file[name].shape != (rows,):
                return f"dataset {name!r} is missing or does not have {rows} rows"
        for name, channels in self.stages.items():
            if f"features/{name}" not in file or file["features"][name].shape != (rows, channels):
                return f"dataset features/{name} is missing or does not have shape ({rows}, {channels})"
        return None

    def _create(self) -> None:
        """Build the partial file under a temporary name and rename it to ``self.partial``."""
        staging = self.partial.with_name(self.partial.name + STAGING_SUFFIX)
        try:
            with h5py.File(staging, "w") as file:
                self._create_layout(file)
            os.replace(staging, self.partial)
        # h5py raises ValueError when HDF5 cannot create a dataset, for example on a full disk.
        except (OSError, ValueError) as error:
            staging.unlink(missing_ok=True)
            if hdf5_lock_failed(error):
                raise CacheError(f"creating {self.partial} failed: HDF5 cannot lock files in {self.path.parent}; "
                                 "set HDF5_USE_FILE_LOCKING=FALSE or choose another --out") from error
            raise CacheError(f"creating {self.partial} failed: {hdf5_error_reason(error)}. The cache needs about "
                             f"{self._size_estimate() / 1e6:.1f} MB; free space or choose another --out") from error

    def _create_layout(self, file: h5py.File) -> None:
        rows = len(self.columns["labels"])
        features = file.create_group("features")
        for name, channels in self.stages.items():
            # Allocating every chunk now and writing zeros into it makes a full disk fail here,
            # before any forward pass. Later writes then never change the file's chunk index.
            features.create_dataset(name, shape=(rows, channels), dtype=self.dtype,
                                    chunks=(min(CHUNK_ROWS, max(rows, 1)), channels), dcpl=_early_allocation(),
                                    fillvalue=0, fill_time="alloc")
        file.create_dataset("labels", data=np.asarray(self.columns["labels"], dtype=np.int64))
        for name in ("split", "paths", "sha256"):
            file.create_dataset(name, data=np.asarray(self.columns[name], dtype=object), dtype=h5py.string_dtype())
        file.create_dataset("written", data=np.zeros(rows, dtype=bool))
        self._write_header(file)

    def _size_estimate(self) -> int:
        rows = len(self.columns["labels"])
        return rows * sum(self.stages.values()) * np.dtype(self.dtype).itemsize

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
        """Write the pooled features of ``rows`` (increasing indices) and mark the rows written.

        Raises:
            CacheError: if a value cannot be stored, or the file cannot be written (disk full,
                I/O error). Rows written before stay in the partial file for a resume.
        """
        for name, values in pooled.items():
            _check_representable(name, values, self.dtype)
        selection = _as_selection(rows)
        try:
            for name, values in pooled.items():
                self.file["features"][name][selection] = values.astype(self.dtype, copy=False)
            # Features reach the file before their rows are flagged, so a kill between the two
            # flushes leaves the rows unflagged and a resume recomputes them.
            self.file.flush()
            self.file["written"][selection] = True
            self.file.flush()
        except (OSError, ValueError) as error:
            raise CacheError(f"writing rows to {self.partial} failed: {hdf5_error_reason(error)}. Rows written before are kept; "
                             "fix the cause (for example free disk space) and rerun the same command to resume") from error

    def finish(self) -> None:
        """Check that every row was written, mark the cache complete and move it into place."""
        missing = self.pending_rows()
        if len(missing):
            raise CacheError(f"{len(missing)} row(s) of {self.partial} were never written, e.g. row {missing[0]}")
        try:
            self.file.attrs["complete"] = True
            self._close(failing=False)
            os.replace(self.partial, self.path)
        except (OSError, ValueError) as error:
            raise CacheError(f"finishing {self.partial} as {self.path} failed: {hdf5_error_reason(error)}") from error


def _early_allocation() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _changed_parts(recorded: str | None, requested: dict | None) -> str:
    """Name the fingerprint parts that differ between a partial file (JSON text) and the current command."""
    try:
        recorded = json.loads(recorded)
    except (TypeError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or not isinstance(requested, dict):
        return "other weights, image size, classes, files or split"
    names = sorted(key for key in set(recorded) | set(requested) if recorded.get(key) != requested.get(key))
    if not names:
        return "another fingerprint"
    return "differs in " + ", ".join(FINGERPRINT_PART_NAMES.get(name, name) for name in names)


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
