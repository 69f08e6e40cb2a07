"""Run a producer one step ahead on a second thread, so reading and codec work overlap the writing.

torch's kernels and file reads release the GIL, so on two cores the next expert is read and decoded (or
repacked) while the current one is written; the order of items is kept and an error is raised where it
happened, in the consumer's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
B = TypeVar("B")
_DONE = object()
READ_AHEAD = 2  # items made ahead of the one being consumed
RING_SLOTS = READ_AHEAD + 2  # READ_AHEAD queued, one being made, one being consumed


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order, producing up to ``depth`` ahead on a worker thread. Items must not share
    buffers (a reused buffer would be overwritten while the consumer still holds it)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put((item, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            ready.put((None, error))
            return
        ready.put((_DONE, None))

    worker = threading.Thread(target=produce, name="ossconv-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # let a blocked producer finish its put and see the stop
            try:
                ready.get_nowait()
            except queue.Empty:
                worker.join(0.01)


def ring(make_buffer: Callable[[], B]) -> list[B]:
    """Buffers for :func:`ring_prefetch`, made once and reusable across several of its runs."""
    return [make_buffer() for _ in range(RING_SLOTS)]


def ring_prefetch(make: Callable[[int, B], T], count: int, buffers: list[B]) -> Iterator[T]:
    """``make(i, buffer)`` for i in ``range(count)`` on a worker thread, READ_AHEAD ahead, into ``buffers``
    (see :func:`ring`) reused in turn: item ``i`` is made in the slot of an item the consumer has finished
    with, so no item is allocated (and page-faulted) afresh. An item is valid until the next one is taken."""
    if len(buffers) < RING_SLOTS:
        raise ValueError(f"a ring needs {RING_SLOTS} buffers, got {len(buffers)}")
    return prefetch((make(i, buffers[i % len(buffers)]) for i in range(count)), depth=READ_AHEAD)
