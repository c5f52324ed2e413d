"""Collecting pooled rows of several batches and writing them to the cache in large blocks."""

import numpy as np
import torch

from emo.cache.writer import CHUNK_ROWS, CacheWriter


class RowBuffer:
    """Pooled rows held until ``block_rows`` of them are ready, then written with one call per stage.

    Fewer, larger writes cost less than one per batch, and each write fills whole HDF5 chunks
    when the blocks start at row 0. On CUDA the rows stay on the device until a block is full, so
    the host waits for the device once per block rather than once per batch. Memory use is
    bounded by one block whatever the number of images. Rows not yet written when a run stops are
    extracted again when it resumes.

    Example:
        >>> buffer = RowBuffer(writer, block_rows=256)  # doctest: +SKIP
        >>> buffer.add(torch.arange(32), {"L4": torch.zeros(32, 2048)})  # doctest: +SKIP
        >>> buffer.flush()  # doctest: +SKIP
    """

    def __init__(self, writer: CacheWriter, *, block_rows: int = CHUNK_ROWS):
        if block_rows < 1:
            raise ValueError(f"block_rows must be at least 1, got {block_rows}")
        self.writer = writer
        self.block_rows = block_rows
        self._rows: list[torch.Tensor] = []
        self._values: list[dict[str, torch.Tensor]] = []
        self._count = 0

    def add(self, rows: torch.Tensor, pooled: dict[str, torch.Tensor]) -> None:
        """Add the pooled features {stage: [B, C]} of the sample indices ``rows`` [B], in increasing order."""
        self._rows.append(rows)
        self._values.append(pooled)
        self._count += len(rows)
        if self._count >= self.block_rows:
            self.flush()

    def flush(self) -> None:
        """Write every buffered row to the cache."""
        if not self._count:
            return
        rows = torch.cat(self._rows).numpy().astype(np.int64, copy=False)
        values = {name: torch.cat([part[name] for part in self._values]).cpu().numpy() for name in self._values[0]}
        self._rows, self._values, self._count = [], [], 0
        self.writer.write(rows, values)
