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


def map_in_processes(function: Callable, items: Iterable, *, workers: int) -> Iterator[tuple[int, object]]:
    """Call ``function`` on each item in ``workers`` processes and yield ``(index, result)`` as each finishes.

    ``function`` and the items must be picklable (a module-level function, dataclasses). When a
    call raises, the exception is raised here; calls not yet started are cancelled and the
    running ones are waited for, so no worker outlives this generator.

    Example:
        >>> sorted(map_in_processes(abs, [-2, 3], workers=2))  # doctest: +SKIP
        [(0, 2), (1, 3)]
    """
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_configure_worker)
    try:
        futures = {pool.submit(function, item): index for index, item in enumerate(items)}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _configure_worker() -> None:
    # Each worker computes with one thread, so N workers use N cores instead of competing for them,
    # and results do not depend on how many threads a reduction was split across.
    os.environ["OMP_NUM_THREADS"] = "1"
    # tqdm reads TQDM_* variables when it is imported; bars from N workers would garble the parent's.
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    torch.set_num_threads(1)
