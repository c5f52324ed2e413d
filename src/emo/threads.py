"""A scoped setting of torch's intra-op CPU thread count."""

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[int]:
    """Run the block with ``count`` torch CPU threads and restore the previous count afterwards.

    Args:
        count: threads for torch's CPU operators; ``None`` keeps the current setting.

    Yields:
        The thread count in effect inside the block.

    Example:
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    previous = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise ValueError(f"thread count must be at least 1, got {count}")
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
