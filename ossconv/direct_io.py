"""Bytes moved once, past the page cache (``O_DIRECT``), through reused aligned buffers.

Why: a checkpoint is read once and written once, and the page cache only costs CPU on the way. A buffered
write copies every byte into a page the kernel has just allocated, then the kernel's flusher writes it out
on one thread; a buffered read fills fresh pages that are slow to touch first on a virtual machine. 8 layers
of 20b shape to HF bf16 (15.4 GB written) took 27 s of system time buffered. Direct I/O moves the bytes
between the disk and buffers that stay mapped, and leaves the user's cached files where they were.

``O_DIRECT`` wants file offsets, sizes and memory on the device's logical block; :data:`ALIGN` (4096) fits
every common one. Bytes that do not fill a whole block (a tensor's unaligned start, a stream's last bytes)
go through the ordinary file descriptor; a block is only ever written one way, so the two never overlap. A
file system that refuses ``O_DIRECT`` gets buffered I/O.
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)
STREAM_CHUNK = 16 << 20  # bytes staged per direct write
UNCOPIED_MIN = 1 << 20  # from this size a producer's buffer that lines up is written from where it is, not
# staged: a 20b down_proj expert in bf16 (16.6 MB, under one piece) was copied once more, 4.2 GB over 8 layers
# (CPU only: the disk bounds that conversion, whose time did not change)
STREAMS = 4  # runs of consecutive writes staged at once: MXFP4 blocks and scales are written alternately
IN_FLIGHT = 2  # pieces being written while the next ones are staged


def round_up(value: int, to: int = ALIGN) -> int:
    return -(-value // to) * to


def direct_buffer(nbytes: int) -> torch.Tensor:
    """A page-aligned uint8 buffer that holds ``nbytes`` starting at any offset within a block, in huge
    pages where the kernel gives them, touched once here so that no I/O into it faults a page in again."""
    mapping = mmap.mmap(-1, round_up(nbytes + 2 * ALIGN))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    buffer = torch.from_numpy(np.frombuffer(mapping, dtype=np.uint8))
    buffer.fill_(0)
    return buffer


def open_direct(path: str | Path, flags: int) -> int | None:
    """A descriptor with ``O_DIRECT`` added, or None where the file system refuses it."""
    if not O_DIRECT:
        return None
    try:
        return os.open(path, flags | O_DIRECT)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return None
        raise


def read_direct(fd: int, position: int, count: int, out: np.ndarray) -> memoryview:
    """``count`` bytes at ``position`` of the file open as ``fd`` (with ``O_DIRECT``), read into ``out``
    (from :func:`direct_buffer`, at least ``count + 2 * ALIGN`` bytes) by whole blocks; fewer where the
    file ends first."""
    first = position - position % ALIGN
    view, done, wanted = memoryview(out)[: round_up(position + count - first)], 0, position + count - first
    while done < wanted:
        got = os.preadv(fd, [view[done:]], first + done)
        if got == 0:
            break
        done += got
    return view[position - first : min(done, wanted)]


def pwrite_all(fd: int, data: memoryview, position: int) -> None:
    while data:
        count = os.pwrite(fd, data, position)
        data, position = data[count:], position + count


def _lines_up(data: memoryview) -> bool:
    """Whether ``data`` starts on a page and is big enough to be written from where it is, synchronously."""
    return len(data) >= UNCOPIED_MIN and np.frombuffer(data, dtype=np.uint8).ctypes.data % ALIGN == 0


class _Stream:
    def __init__(self, key: object, start: int, buffer: np.ndarray):
        self.key = key  # the file
        self.start = start  # file offset of the staged bytes, block-aligned
        self.length = 0
        self.buffer = buffer


class DirectWrites:
    """Writes to a few files past the page cache: each run of consecutive writes to a file is a stream,
    staged in an aligned buffer and written in whole :data:`STREAM_CHUNK` pieces on a thread of its own,
    :data:`IN_FLIGHT` at a time, so that the disk writes one piece while the next is staged. At most
    :data:`STREAMS` are staged at once (the least recently written is written out for a new one), so memory
    stays at ``(STREAMS + IN_FLIGHT) * STREAM_CHUNK`` however many files. A file's ordinary descriptor takes
    its partial blocks."""

    def __init__(self) -> None:
        self.files: dict[object, tuple[int, int | None]] = {}  # key -> (ordinary fd, direct fd or None)
        self.streams: list[_Stream] = []  # least recently written first
        self.spare: list[np.ndarray] = []
        self.pending: collections.deque[tuple[Future, np.ndarray]] = collections.deque()
        self.io = ThreadPoolExecutor(1, thread_name_prefix="ossconv-direct-write")

    def add(self, key: object, path: str | Path, fd: int) -> None:
        """Take writes to ``key``: the file at ``path``, open as ``fd``."""
        self.files[key] = (fd, open_direct(path, os.O_WRONLY))

    def write(self, key: object, data: memoryview, position: int) -> None:
        fd, direct_fd = self.files[key]
        if direct_fd is None:
            pwrite_all(fd, data, position)
            return
        stream = next((s for s in self.streams if s.key == key and s.start + s.length == position), None)
        fill = min(-position % ALIGN, len(data))  # bytes to the next block boundary
        if _lines_up(data[fill:]):  # whole blocks go to the disk from the caller's memory
            if stream is not None:
                self._stage(stream, data[:fill])
                self._close(stream)  # whole blocks now
            else:
                pwrite_all(fd, data[:fill], position)
            whole = (len(data) - fill) // ALIGN * ALIGN
            self._write_direct(key, np.frombuffer(data[fill : fill + whole], dtype=np.uint8), position + fill)
            data, position, stream = data[fill + whole :], position + fill + whole, None
            fill = 0
        if stream is None:
            pwrite_all(fd, data[:fill], position)  # up to the next block boundary, through the cache
            data, position = data[fill:], position + fill
            if not data:
                return
            if len(self.streams) == STREAMS:
                self._close(self.streams[0])
            stream = _Stream(key, position, self._buffer())
        else:
            self.streams.remove(stream)
        self.streams.append(stream)
        self._stage(stream, data)

    def _stage(self, stream: _Stream, data: memoryview) -> None:
        while data:
            count = min(STREAM_CHUNK - stream.length, len(data))
            stream.buffer[stream.length : stream.length + count] = data[:count]
            stream.length += count
            data = data[count:]
            if stream.length == STREAM_CHUNK:
                self._submit(stream.key, stream.buffer, stream.buffer, stream.start)
                stream.buffer, stream.start, stream.length = self._buffer(), stream.start + STREAM_CHUNK, 0

    def _buffer(self) -> np.ndarray:
        if not self.spare and len(self.pending) >= IN_FLIGHT:
            self._retire()
        return self.spare.pop() if self.spare else direct_buffer(STREAM_CHUNK).numpy()[:STREAM_CHUNK]

    def _submit(self, key: object, buffer: np.ndarray, data: np.ndarray, position: int) -> None:
        """Write ``data`` (whole blocks of ``buffer``) on the I/O thread; ``buffer`` is spare once done."""
        while len(self.pending) >= IN_FLIGHT:
            self._retire()
        self.pending.append((self.io.submit(self._write_direct, key, data, position), buffer))

    def _retire(self) -> None:
        future, buffer = self.pending.popleft()
        self.spare.append(buffer)
        future.result()

    def _write_direct(self, key: object, data: np.ndarray, position: int) -> None:
        fd, direct_fd = self.files[key]
        try:
            pwrite_all(direct_fd, memoryview(data), position)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            pwrite_all(fd, memoryview(data), position)  # a device with blocks larger than ALIGN

    def _close(self, stream: _Stream) -> None:
        self.streams.remove(stream)
        whole = stream.length - stream.length % ALIGN
        pwrite_all(self.files[stream.key][0], memoryview(stream.buffer[whole : stream.length]), stream.start + whole)
        if whole:
            self._submit(stream.key, stream.buffer, stream.buffer[:whole], stream.start)
        else:
            self.spare.append(stream.buffer)

    def flush(self) -> None:
        """Write every staged byte, and wait until it is written."""
        while self.streams:
            self._close(self.streams[0])
        while self.pending:
            self._retire()

    def close(self) -> None:
        """Wait for writes under way, then close the direct descriptors, staged bytes unwritten
        (:meth:`flush` first to keep them); the ordinary descriptors are the caller's."""
        self.streams = []
        self.io.shutdown(wait=True)
        self.pending.clear()
        for _, direct_fd in self.files.values():
            if direct_fd is not None:
                os.close(direct_fd)
        self.files = {}
