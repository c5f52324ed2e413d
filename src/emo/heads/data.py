"""Features for the heads: one float32 matrix per split, held in memory or streamed from the cache.

All stages of a split sit side by side in one matrix [N, sum of C], so a mini-batch is one
gather rather than one per stage, and each stage is a column slice of the gathered rows.
When the training matrix would exceed a memory budget, :class:`StreamedRows` reads it from the
cache window by window instead. Both classes yield the same mini-batches, value for value.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from emo.cache.reader import FeatureCache

# Rows per block when computing the standardization statistics, in both storage modes; a block's
# float32 temporaries take a few times 1024 x C x 4 bytes.
STATISTICS_BLOCK_ROWS = 1024


@dataclass(frozen=True)
class StageColumns:
    """The column span of each stage in the side-by-side matrix: {stage: (first column, width)}."""

    spans: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, widths: dict[str, int]) -> "StageColumns":
        """Lay out the stages of ``widths`` ({stage: C}) left to right, in their order."""
        spans, start = {}, 0
        for name, width in widths.items():
            spans[name] = (start, width)
            start += width
        return cls(spans)

    @property
    def width(self) -> int:
        """The total number of columns."""
        return sum(width for _, width in self.spans.values())

    def split(self, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return each stage's column slice [N, C] of ``matrix`` [N, width], as views."""
        return {name: matrix.narrow(1, start, width) for name, (start, width) in self.spans.items()}


def read_matrix(cache: FeatureCache, rows: np.ndarray, columns: StageColumns,
                out: np.ndarray | None = None) -> np.ndarray:
    """Read the features of every stage at the cache rows ``rows`` (increasing) into one float32 matrix.

    Args:
        cache: an open feature cache.
        rows: cache row indices in increasing order.
        columns: the stages and their place in the matrix.
        out: a float32 array [len(rows), columns.width] to fill instead of allocating one.

    Returns:
        The matrix [len(rows), columns.width].
    """
    if out is None:
        out = np.empty((len(rows), columns.width), dtype=np.float32)
    for name, (start, width) in columns.spans.items():
        cache.read_rows(name, rows, out=out[:, start:start + width])
    return out


def column_statistics(blocks: Iterator[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the mean and sample standard deviation of each column over row blocks [n, C].

    Each block's mean and sum of squared deviations come from two passes over the block in
    float32. The blocks are merged in float64 with the pairwise update of Chan, Golub and LeVeque
    (1979), which stays accurate when a column's mean is far larger than its spread. The same
    blocks always give the same result.
    """
    count, mean, squares = 0, None, None
    for block in blocks:
        values = np.ascontiguousarray(block, dtype=np.float32)
        block_mean = values.mean(axis=0)
        deviations = values - block_mean
        block_squares = (deviations * deviations).sum(axis=0).astype(np.float64)
        block_mean = block_mean.astype(np.float64)
        if mean is None:
            count, mean, squares = len(values), block_mean, block_squares
            continue
        total = count + len(values)
        delta = block_mean - mean
        mean = mean + delta * (len(values) / total)
        squares = squares + block_squares + delta ** 2 * (count * len(values) / total)
        count = total
    if count < 2:
        raise ValueError(f"standardization needs at least 2 training rows, got {count}")
    std = np.sqrt(squares / (count - 1))
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


class InMemoryRows:
    """The training rows of every stage in one float32 tensor [N, sum of C], with labels [N]."""

    def __init__(self, matrix: torch.Tensor, labels: torch.Tensor, columns: StageColumns):
        self.matrix = matrix
        self.labels = labels
        self.columns = columns
        self.standardized = False

    def standardize(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardize the matrix in place with a mean and standard deviation [sum of C], once.

        The values equal those of standardizing each mini-batch, with no copy of the matrix.
        """
        self.matrix.sub_(mean).div_(std)
        self.standardized = True

    def __enter__(self) -> "InMemoryRows":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def statistics(self, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mean and standard deviation [C] of one stage's training features."""
        if self.standardized:
            raise RuntimeError("statistics of the training rows are read before they are standardized")
        start, width = self.columns.spans[stage]
        view = self.matrix.numpy()[:, start:start + width]
        return column_statistics(view[i:i + STATISTICS_BLOCK_ROWS]
                                 for i in range(0, len(view), STATISTICS_BLOCK_ROWS))

    def batches(self, batches: list[torch.Tensor]) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Yield ``({stage: [B, C]}, labels [B])`` for each tensor of row positions in ``batches``."""
        for index in batches:
            # index_select copies rows about twice as fast as advanced indexing (torch 2.14, one thread).
            yield self.columns.split(self.matrix.index_select(0, index)), self.labels.index_select(0, index)


class StreamedRows:
    """The training rows read from the cache one window at a time, with labels [N] in memory.

    A window is as many consecutive mini-batches as fit ``window_rows`` rows. Its rows are read
    into one preallocated buffer, so memory use is bounded by the buffer whatever the cache size.
    Each window reads the training rows of the whole file once, since a shuffled window draws
    rows from everywhere.

    Use as a context manager, which opens and closes the cache file.
    """

    def __init__(self, path: Path, rows: np.ndarray, labels: torch.Tensor, columns: StageColumns, *,
                 window_rows: int):
        self.path = Path(path)
        self.rows = np.asarray(rows, dtype=np.int64)  # cache row of each training position
        self.labels = labels
        self.columns = columns
        self.window_rows = window_rows
        self._standardization: tuple[torch.Tensor, torch.Tensor] | None = None
        self._buffer = None
        self._cache: FeatureCache | None = None

    @property
    def standardized(self) -> bool:
        """Whether the mini-batches are standardized (see :meth:`standardize`)."""
        return self._standardization is not None

    def standardize(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardize every window as it is read, with a mean and standard deviation [sum of C]."""
        self._standardization = (mean, std)

    def __enter__(self) -> "StreamedRows":
        self._cache = FeatureCache(self.path)
        self._buffer = torch.empty(self.window_rows, self.columns.width)
        return self

    def __exit__(self, *exc) -> None:
        self._cache.close()
        self._cache, self._buffer = None, None

    def statistics(self, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mean and standard deviation [C] of one stage's training features, read in blocks."""
        with FeatureCache(self.path) as cache:
            blocks = (cache.read_rows(stage, self.rows[i:i + STATISTICS_BLOCK_ROWS])
                      for i in range(0, len(self.rows), STATISTICS_BLOCK_ROWS))
            return column_statistics(blocks)

    def batches(self, batches: list[torch.Tensor]) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Yield ``({stage: [B, C]}, labels [B])`` for each tensor of row positions in ``batches``."""
        if self._cache is None:
            raise RuntimeError("StreamedRows.batches needs an open cache; use the object as a context manager")
        for window in self._windows(batches):
            needed = torch.unique(torch.cat(window))  # sorted training positions of this window
            buffer = self._buffer[:len(needed)]
            read_matrix(self._cache, self.rows[needed.numpy()], self.columns, out=buffer.numpy())
            if self._standardization is not None:
                mean, std = self._standardization
                buffer.sub_(mean).div_(std)
            for index in window:
                positions = torch.searchsorted(needed, index)
                yield self.columns.split(buffer.index_select(0, positions)), self.labels.index_select(0, index)

    def _windows(self, batches: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        window, size = [], 0
        for index in batches:
            if window and size + len(index) > self.window_rows:
                yield window
                window, size = [], 0
            window.append(index)
            size += len(index)
        if window:
            yield window


def row_bytes(columns: StageColumns) -> int:
    """Return the bytes one training row takes in memory (float32)."""
    return 4 * columns.width
