"""Ranges of work on every core, on Python threads: torch's kernels release the GIL.

torch's own intra-op threads barely help the gathers and small products here (MXFP4 decode of 2/3 of a 20b
layer: 1 thread 0.43 s, 2 threads 0.38 s); two ranges on two Python threads take 0.26 s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_POOL: ThreadPoolExecutor | None = None
_IN_WORKER = threading.local()


def in_parallel(work: Callable[[int, int], None], count: int, unit: int) -> None:
    """Run ``work(first, last)`` over contiguous ranges of ``count`` items, one per torch thread, when there
    are at least two ``unit``\\ s of work; inline otherwise, and when called from one of the ranges itself (a
    nested call would wait on the pool it runs in). The first error by position is raised."""
    global _POOL
    workers = max(1, torch.get_num_threads())
    if workers == 1 or count < 2 * unit or getattr(_IN_WORKER, "active", False):
        work(0, count)
        return
    if _POOL is None or _POOL._max_workers != workers:
        _POOL = ThreadPoolExecutor(workers, thread_name_prefix="ossconv-range", initializer=_mark_worker)
    bounds = [count * i // workers for i in range(workers + 1)]
    futures = [_POOL.submit(work, bounds[i], bounds[i + 1]) for i in range(workers)]
    for future in futures:  # in order: the first failing range's error wins
        future.result()


def _mark_worker() -> None:
    _IN_WORKER.active = True
