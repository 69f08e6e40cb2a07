"""sha256 of files while they are written: read right behind the writer, on a thread of its own.

An expert-parallel reshard hashes every byte it writes for the manifest. Hashing the files after each rank
was written read them a second time and left the last rank's hashing after the copying had ended (5 of 32
seconds on the synthetic 20b). Here the hash follows the writer's contiguous frontier of each shard, on the
second core, while the bytes are still in the page cache; when the writer finishes, little is left to hash.
"""

from __future__ import annotations

import hashlib
import os
import threading

READ_CHUNK = 16 << 20


class TrailingHash:
    """A watcher for :class:`ossconv.writer.CheckpointWriter`: ``opened(shard, fd, name)`` when a shard file
    is created, ``written(shard, frontier)`` when its first ``frontier`` bytes are all written. :meth:`finish`
    (after the writer finished) returns ``{file name: sha256}``; :meth:`close` stops it in any case."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._fds: dict[int, int] = {}
        self._names: dict[int, str] = {}
        self._frontier: dict[int, int] = {}
        self._hashed: dict[int, int] = {}
        self._sha: dict[int, hashlib._Hash] = {}
        self._finishing = self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ossconv-trailing-hash", daemon=True)
        self._thread.start()

    def opened(self, shard: int, fd: int, name: str) -> None:
        with self._lock:
            self._fds[shard] = os.dup(fd)  # stays valid when the writer closes its own and renames the folder
            self._names[shard], self._frontier[shard], self._hashed[shard] = name, 0, 0
            self._sha[shard] = hashlib.sha256()
            self._lock.notify()

    def written(self, shard: int, frontier: int) -> None:
        with self._lock:
            self._frontier[shard] = frontier
            self._lock.notify()

    def finish(self) -> dict[str, str]:
        with self._lock:
            self._finishing = True
            self._lock.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return {self._names[shard]: sha.hexdigest() for shard, sha in self._sha.items()}

    def close(self) -> None:
        with self._lock:
            self._finishing = self._closed = True
            self._lock.notify()
        self._thread.join()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def _next(self) -> tuple[int, int, int] | None:
        """(shard, start, count) of bytes written but not hashed yet; None when there is nothing left."""
        for shard, frontier in self._frontier.items():
            if self._hashed[shard] < frontier:
                return shard, self._hashed[shard], min(READ_CHUNK, frontier - self._hashed[shard])
        return None

    def _run(self) -> None:
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        try:
            while True:
                with self._lock:
                    work = self._next()
                    while work is None and not self._finishing:
                        self._lock.wait()
                        work = self._next()
                    if work is None or self._closed:
                        return
                    shard, start, count = work
                    fd, sha = self._fds[shard], self._sha[shard]
                done = 0
                while done < count:
                    got = os.preadv(fd, [view[done:count]], start + done)
                    if got == 0:
                        raise OSError(f"{self._names[shard]} ended at {start + done} bytes while being hashed")
                    done += got
                sha.update(view[:count])
                with self._lock:
                    self._hashed[shard] += count
        except BaseException as error:  # noqa: BLE001 - raised by finish, in the caller's thread
            self._error = error
