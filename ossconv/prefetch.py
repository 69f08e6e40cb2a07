"""Run a producer one step ahead on a second thread, so reading and codec work overlap the writing.

torch's kernels and file reads release the GIL, so on two cores the next expert is read and decoded (or
repacked) while the current one is written; the order of items is kept and an error is raised where it
happened, in the consumer's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


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
