"""The files of a checkpoint folder, read safely: safetensors headers, the shard index, JSON side files.

Headers are parsed here (shapes, dtypes, byte offsets) and checked by safetensors' own reader; tensor data
is read through ``safe_open``, whose memory map is closed after each read so resident memory never
accumulates. Pickled weights are refused, never loaded, and no index entry or symlink may lead outside
the folder. :mod:`ossconv.checkpoint` builds the model view on top.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import mmap
import os
import stat
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ossconv import direct_io
from ossconv.errors import CheckpointError
from ossconv.formats import layouts
from ossconv.formats.precision import TORCH_DTYPES

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_JSON_BYTES = 64 * 1024 * 1024  # an index, config or manifest of the largest model is well under 1 MB


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start, header dict) of a safetensors file, checked for sizes that could not be right."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError("not a safetensors file (shorter than its 8-byte header length)", path)
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise CheckpointError(f"not a safetensors file (header length {length} for a {size}-byte file)", path)
        raw = handle.read(length)
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", path)
    return 8 + length, header


def tensor_infos(path: Path) -> dict[str, TensorInfo]:
    start, header = read_header(path)
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = TORCH_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"tensor {name!r} has a malformed header entry", path) from None
        infos[name] = TensorInfo(name, shape, dtype, path, start + begin, end - begin)
    try:  # safetensors' own reader checks offsets, coverage and sizes
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as error:
        raise CheckpointError(str(error).replace("Error while deserializing header: ", ""), path) from None
    return infos


def parse_json(raw: bytes | str, path: Path, what: str = "file") -> Any:
    """The one JSON parser for everything read from a checkpoint, adapter or manifest: whatever the input
    (nesting thousands deep, integers of thousands of digits, bad UTF-8), the outcome is a value or one
    CheckpointError naming the file."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{what} is not valid JSON ({str(error).splitlines()[0]})", path) from None
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply to be a real one", path) from None
    except ValueError as error:  # Python's limit on the digits of an integer
        raise CheckpointError(f"{what} holds an absurd value ({str(error).splitlines()[0][:80]})", path) from None


def check_regular(path: Path, folder: Path | None = None) -> None:
    """Refuse anything but a regular file (a FIFO would block the read forever; a device or folder is no
    checkpoint file), and, with ``folder``, a path whose symlinks lead outside it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise CheckpointError(f"cannot read: {error.strerror}", path) from None
    if not stat.S_ISREG(mode):
        raise CheckpointError("is not a regular file", path)
    if folder is not None and not inside_folder(folder, path):
        raise CheckpointError("symlink points outside the checkpoint folder", path)


def _row_bytes(info: TensorInfo, start: int, stop: int) -> tuple[int, int]:
    """(absolute offset, byte count) of rows ``start:stop`` along the first axis of a stored tensor."""
    rows = info.shape[0] if info.shape else 1
    row_bytes = info.nbytes // rows if rows else 0
    return info.offset + start * row_bytes, (stop - start) * row_bytes


def read_rows(info: TensorInfo, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``start:stop`` (first axis) of a stored tensor, read with one ``pread`` at offsets the header
    gave: no header is parsed again and no memory map stays behind. ``out``, a contiguous uint8 buffer of at
    least that many bytes, is filled and viewed instead of a new tensor: a loop that reads thousands of expert
    slices into a few reused buffers skips a fresh allocation's page faults for every one of them."""
    position, count = _row_bytes(info, start, stop)
    if out is not None and (out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() < count):
        raise ValueError(f"a read buffer for {info.name} must be contiguous uint8 of at least {count} bytes")
    fd = os.open(info.file, os.O_RDONLY)
    try:
        data = torch.empty(count, dtype=torch.uint8) if out is None else out.view(-1)[:count]
        view, done = memoryview(data.numpy()), 0
        while done < count:
            got = os.preadv(fd, [view[done:]], position + done)
            if got == 0:
                raise CheckpointError(f"file ended inside tensor {info.name}", info.file)
            done += got
    except OSError as error:
        raise CheckpointError(f"cannot read {info.name}: {error.strerror}", info.file) from None
    finally:
        os.close(fd)
    tensor = data.view(info.dtype) if count else torch.empty(0, dtype=info.dtype)
    return tensor.view(stop - start, *info.shape[1:]) if info.shape else tensor.view(())


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.11 lacks the name


def map_rows(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a stored tensor, mapped from the page cache instead of copied out of it: for data
    read once, ``pread``'s copy costs the kernel more CPU than reading the disk does (cold bf16 experts, 4.9
    GB: 1.7-2.2 s of system time with ``pread``, 0.1 s mapped, and a second less wall time). The pages are
    faulted in here, on the caller's (prefetch) thread, in one call where the kernel can; the mapping is
    private (writes never reach the file) and lives as long as the returned tensor."""
    position, count = _row_bytes(info, start, stop)
    if count == 0:
        return read_rows(info, start, stop)
    aligned = position - position % mmap.ALLOCATIONGRANULARITY
    try:
        with open(info.file, "rb") as handle:
            if os.fstat(handle.fileno()).st_size < position + count:  # mapped past its end, a read would SIGBUS
                raise CheckpointError(f"file ended inside tensor {info.name}", info.file)
            mapping = mmap.mmap(handle.fileno(), position + count - aligned, offset=aligned, access=mmap.ACCESS_COPY)
    except OSError as error:
        raise CheckpointError(f"cannot read {info.name}: {error.strerror}", info.file) from None
    try:
        mapping.madvise(MADV_POPULATE_READ)
    except OSError:  # an older kernel: the pages come in as they are touched
        pass
    data = torch.from_numpy(np.frombuffer(mapping, dtype=np.uint8, count=count, offset=position - aligned))
    return data.view(info.dtype).view(stop - start, *info.shape[1:])


def read_rows_direct(info: TensorInfo, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """:func:`read_rows` past the page cache (:mod:`ossconv.direct_io`), into ``out`` from
    :func:`~ossconv.direct_io.direct_buffer`: for bytes read once and not cached. Mapped, cold bf16 experts
    of 20b shape took 21-34 ms each to encode, from a reused buffer 11-13 ms. Where the file system refuses
    ``O_DIRECT`` the read is buffered."""
    position, count = _row_bytes(info, start, stop)
    first = position - position % direct_io.ALIGN
    length = direct_io.round_up(position + count - first)
    if out.numel() < length or out.data_ptr() % direct_io.ALIGN:
        raise ValueError(f"a direct read of {info.name} needs a direct_buffer of at least {length} bytes")
    try:
        fd = direct_io.open_direct(info.file, os.O_RDONLY)
    except OSError as error:
        raise CheckpointError(f"cannot read {info.name}: {error.strerror}", info.file) from None
    if fd is None:
        return read_rows(info, start, stop, out)
    try:
        got = len(direct_io.read_direct(fd, position, count, out.numpy()))
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise CheckpointError(f"cannot read {info.name}: {error.strerror}", info.file) from None
        return read_rows(info, start, stop, out)
    finally:
        os.close(fd)
    if got < count:
        raise CheckpointError(f"file ended inside tensor {info.name}", info.file)
    data = out[position - first : position - first + count]
    return data.view(info.dtype).view(stop - start, *info.shape[1:])


def cached_fraction(file: Path, offset: int, nbytes: int) -> float:
    """The fraction of a file's byte range in the page cache now (``mincore``); 1.0 where that cannot be
    told, so that a caller keeps to the page cache."""
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset + nbytes - aligned
    if nbytes <= 0 or not hasattr(os, "posix_fadvise"):
        return 1.0
    try:
        with open(file, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), length, offset=aligned, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return 1.0
    try:
        pages = np.zeros(-(-length // mmap.PAGESIZE), dtype=np.uint8)
        address = np.frombuffer(mapping, dtype=np.uint8)
        failed = _LIBC.mincore(
            ctypes.c_void_p(address.ctypes.data), ctypes.c_size_t(length), pages.ctypes.data_as(ctypes.c_void_p)
        )
        del address
        return 1.0 if failed else float((pages & 1).mean())
    finally:
        mapping.close()


def cached_share(ranges: Iterable[tuple[Path, int, int]]) -> float:
    """The fraction of these ``(file, offset, nbytes)`` ranges' bytes in the page cache now."""
    ranges = list(ranges)
    total = sum(nbytes for _, _, nbytes in ranges)
    return sum(cached_fraction(*r) * r[2] for r in ranges) / total if total else 1.0


_LIBC = ctypes.CDLL(None, use_errno=True)


# Linux reads at most max(read-ahead, largest I/O) bytes per WILLNEED hint (8 MB here, about 1 MB by default):
# one hint of a 0.5 GB layer read almost nothing, 1 MiB hints read it all.
HINT_CHUNK = 1 << 20


def will_need(ranges: Iterable[tuple[Path, int, int]]) -> None:
    """Ask the kernel to start reading these ``(file, offset, nbytes)`` ranges into the page cache, and
    return at once (no memory of ours holds them): a reader that hints what it reads next finds it read (a
    cold 20b converted in 24 s instead of 41 s). A hint that cannot be given is skipped; reading still works,
    only slower."""
    if not hasattr(os, "posix_fadvise"):
        return
    for file, offset, nbytes in ranges:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            for start in range(offset, offset + nbytes, HINT_CHUNK):
                os.posix_fadvise(fd, start, min(HINT_CHUNK, offset + nbytes - start), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


class ReadAhead:
    """Keeps the kernel reading ``window`` bytes ahead of a reader that goes through ``items`` (each a list
    of byte ranges) in order: :meth:`reached` before item ``i`` hints the items after it that fit the window.
    A window, not the whole input: a 65 GB checkpoint hinted at once would evict its own first bytes."""

    def __init__(self, items: list[list[tuple[Path, int, int]]], window: int = 1 << 30):
        self.items, self.window, self.hinted = items, window, 0
        self.ends = list(itertools.accumulate(sum(n for _, _, n in item) for item in items))
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ossconv-read-ahead")

    def reached(self, index: int) -> None:
        start = self.ends[index - 1] if index else 0
        while self.hinted < len(self.items) and (self.hinted <= index or self.ends[self.hinted] - start <= self.window):
            self.worker.submit(will_need, self.items[self.hinted])  # a hint may wait for the disk's queue
            self.hinted += 1

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)


def inside_folder(folder: Path, candidate: Path) -> bool:
    """Whether ``candidate`` exists and, symlinks resolved, lies inside ``folder``."""
    try:
        candidate.resolve(strict=True).relative_to(folder.resolve())
    except (FileNotFoundError, ValueError, OSError):
        return False
    return True


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and the index's weight map (None without an index)."""
    index_path = folder / INDEX_NAME
    if index_path.exists() or index_path.is_symlink():
        index = read_json(index_path, folder, "index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError("not a valid index (expected a JSON object with a 'weight_map')", index_path)
        files = []
        for relative in dict.fromkeys(weight_map.values()):
            candidate = folder / relative
            if Path(relative).is_absolute() or not inside_folder(folder, candidate):
                if not candidate.exists() and inside_folder(folder, candidate.parent):
                    raise CheckpointError(f"the index names {relative!r}, which does not exist", index_path)
                raise CheckpointError(f"the index points outside the checkpoint folder: {relative!r}", index_path)
            check_regular(candidate, folder)
            files.append(candidate)
        return files, weight_map
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"holds only pickled weights ({', '.join(pickles[:3])}); ossconv never loads pickles "
                "(they can run code): use safetensors weights",
                folder,
            )
        raise CheckpointError("no .safetensors files in this folder", folder)
    for file in files:
        check_regular(file, folder)
    return files, None


class open_file:
    """``safe_open`` whose failures are our one-line CheckpointError naming the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self.handle = safe_open(self.path, framework="pt")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read: {error}", self.path) from None
        return self.handle.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.handle.__exit__(*exc)


def read_json(path: Path, folder: Path | None = None, what: str = "file") -> dict[str, Any]:
    """A JSON object from a regular file (inside ``folder`` when given), of a sane size."""
    check_regular(path, folder)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{what} of {size} bytes is too large to be a real one", path)
    value = parse_json(path.read_bytes(), path, what)
    if not isinstance(value, dict):
        raise CheckpointError("expected a JSON object", path)
    return value


def read_folder_tensors(
    folder: Path, shared_ok: bool = False, into: dict[str, TensorInfo] | None = None
) -> dict[str, TensorInfo]:
    """Every tensor of one folder (checked against its index); ``shared_ok`` lets non-expert tensors that
    an earlier folder already gave (expert-parallel ranks each carry them) be skipped."""
    tensors = {} if into is None else into
    files, weight_map = weight_files(folder)
    seen: dict[str, Path] = {}
    for file in files:
        for name, info in tensor_infos(file).items():
            if name in seen:
                raise CheckpointError(f"tensor {name!r} is stored twice (also in {seen[name].name})", file)
            seen[name] = file
            if name in tensors:
                if shared_ok and layouts.parse_split_name(name) is None:
                    continue
                raise CheckpointError(f"tensor {name!r} is stored twice (also in {tensors[name].file})", file)
            tensors[name] = info
    if weight_map is not None:
        for name, relative in weight_map.items():
            if name not in seen or seen[name].name != Path(relative).name:
                raise CheckpointError(
                    f"the index places {name!r} in {relative}, which does not hold it", folder / INDEX_NAME
                )
    return tensors
