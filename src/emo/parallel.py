"""Running independent jobs in worker processes, one CPU thread each and without inner progress bars.

Workers are started with ``spawn``: a forked child of a process that has already run torch's
thread pool can deadlock. This module imports nothing heavy, so a spawned worker runs
:func:`_configure_worker` before torch or tqdm are imported into it.
"""

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed


def available_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def map_unordered(function: Callable, items: Iterable, *, workers: int) -> Iterator[tuple[int, object]]:
    """Call ``function`` on each item and yield ``(index, result)`` as each call finishes.

    With ``workers`` above 1 the calls run in that many spawned processes, so ``function`` and the
    items must be picklable (a module-level function, dataclasses). With 1 they run here, one
    after another, which saves starting a process. Either way torch computes with one thread,
    so a call gives the same numbers in both modes. When a call raises, the exception is raised
    here. Calls not yet started are then cancelled and running ones are waited for, so no worker
    outlives this generator.

    Example:
        >>> sorted(map_unordered(abs, [-2, 3], workers=2))  # doctest: +SKIP
        [(0, 2), (1, 3)]
    """
    if workers == 1:
        yield from _map_here(function, items)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_configure_worker)
    try:
        futures = {pool.submit(function, item): index for index, item in enumerate(items)}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _map_here(function: Callable, items: Iterable) -> Iterator[tuple[int, object]]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for index, item in enumerate(items):
            yield index, function(item)
    finally:
        torch.set_num_threads(threads)


def _configure_worker() -> None:
    # Each worker computes with one thread, so N workers use N cores instead of competing for them,
    # and results do not depend on how many threads a reduction was split across.
    os.environ["OMP_NUM_THREADS"] = "1"
    # tqdm (4.66 and later) reads TQDM_* variables when it is imported. Bars from N workers would
    # garble the parent's bar.
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    torch.set_num_threads(1)
