"""The streaming, atomic checkpoint writer.

safetensors' ``save_file`` needs every tensor of a file in memory at once, so the writer plans all shards up
front (names, dtypes and shapes are known before the data), writes each shard's header when the shard is
created, then places tensor bytes (whole tensors, expert slices, or kernel-side copies of source bytes) at
their planned offsets. Everything goes into a temporary folder beside the output that is renamed into place
only after every byte of every tensor has been written; safetensors' own reader checks the result in the tests.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ossconv import direct_io
from ossconv.errors import CheckpointError, OssconvError, OutputExistsError
from ossconv.files import INDEX_NAME, TensorInfo
from ossconv.formats.layouts import TensorSpec
from ossconv.formats.precision import SAFETENSORS_DTYPES
from ossconv.outputs import place, temporary
from ossconv.prefetch import ring, ring_prefetch
from ossconv.progress import NoProgress, Progress
from ossconv.units import DEFAULT_MAX_SHARD_SIZE

COPY_CHUNK = 1 << 30  # bytes per copy_file_range call
FALLBACK_CHUNK = 1 << 20  # bytes per read/write where the kernel cannot copy between the two files
WRITE_CHUNK = 1 << 20
COPY_BUFFER = 16 << 20  # bytes per read of a copy past the page cache
# dtypes.json tags OpenAI's loader expects for MXFP4 tensors (stored as U8).
DTYPES_JSON_TAGS = {".blocks": "FP4", ".scales": "UE8"}


def _shard_plan(
    specs: list[TensorSpec], max_shard_size: int, apart: frozenset[str] = frozenset()
) -> list[list[TensorSpec]]:
    """Consecutive runs of tensors of at most ``max_shard_size`` bytes (a bigger tensor gets its own shard).
    Tensors named in ``apart`` come first, in shards of their own: such shards are byte-identical between
    outputs that share those tensors (the non-expert tensors of expert-parallel ranks)."""
    shards: list[list[TensorSpec]] = []
    for group in ([s for s in specs if s.name in apart], [s for s in specs if s.name not in apart]):
        size = 0
        for index, spec in enumerate(group):
            if index == 0 or size + spec.nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
    return shards or [[]]


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _encode_header(specs: list[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets = {}
    position = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [position, position + spec.nbytes],
        }
        offsets[spec.name] = position
        position += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw, offsets


class ShardWatcher(Protocol):
    """Told when a shard file is created and how far from its start it is written (see
    :class:`ossconv.digests.TrailingHash`, which hashes right behind the writer)."""

    def opened(self, shard: int, fd: int, name: str) -> None: ...

    def written(self, shard: int, frontier: int) -> None: ...


class WriterState(enum.Enum):
    OPEN = "open"  # the temporary folder exists and takes writes
    FINISHED = "finished"  # renamed into place
    ABORTED = "aborted"  # the temporary folder and open files are gone


@dataclass
class _Slot:
    spec: TensorSpec
    shard: int
    offset: int  # absolute offset of the data in the shard file
    written: int = 0


class CheckpointWriter:
    """Streams tensors into planned shards inside a temporary folder; :meth:`finish` renames it into place.

    Use as a context manager: leaving the block without :meth:`finish` (an exception, or a return) aborts,
    removing the temporary folder and closing its files, so an output folder exists only when complete.
    """

    def __init__(
        self,
        out: str | Path,
        specs: list[TensorSpec],
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        overwrite: bool = False,
        progress: Progress | None = None,
        apart: frozenset[str] = frozenset(),
        watcher: ShardWatcher | None = None,
    ):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise OutputExistsError(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise OssconvError("exists and is not a folder", self.out)
        self.progress = progress or NoProgress()
        plan = _shard_plan(specs, max_shard_size, apart)
        self.files = shard_file_names(len(plan))
        self.slots: dict[str, _Slot] = {}
        self.headers: list[bytes] = []
        for shard, shard_specs in enumerate(plan):
            header, offsets = _encode_header(shard_specs)
            self.headers.append(header)
            for spec in shard_specs:
                if spec.name in self.slots:
                    raise ValueError(f"tensor {spec.name} planned twice")
                self.slots[spec.name] = _Slot(spec, shard, len(header) + offsets[spec.name])
        self.fds: dict[int, int] = {}
        # Each shard's slots by offset and the first not yet complete: how far a shard is written from its
        # start, told to ``watcher``.
        self.watcher = watcher
        self._in_order: list[list[_Slot]] = [[] for _ in plan]
        for slot in self.slots.values():  # planned in offset order within each shard
            self._in_order[slot.shard].append(slot)
        self._first_incomplete = [0] * len(plan)
        self.adopted: set[int] = set()  # shards taken whole from an existing file (see adopt)
        self.kernel_copy = hasattr(os, "copy_file_range")
        self.overwrite = overwrite
        # Written tensor bytes go past the page cache, except where a watcher reads the files behind us.
        self.direct = direct_io.DirectWrites() if watcher is None else None
        self._copy_ring: list[np.ndarray] | None = None
        try:  # last, so that nothing before can fail and leave it behind
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.temp = temporary(self.out)
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp.mkdir()
        except OSError as error:
            raise OssconvError(f"cannot create the output folder: {error.strerror}", self.out) from None
        self.state = WriterState.OPEN
        self.progress.add_total(sum(spec.nbytes for spec in specs))

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.state is WriterState.OPEN:
            self.abort()

    def _fd(self, shard: int) -> int:
        if self.state is not WriterState.OPEN:
            raise RuntimeError(f"the writer is {self.state.value}")
        if shard in self.adopted:  # its file may be another output's: never write through it
            raise RuntimeError(f"shard {self.files[shard]} was adopted whole and takes no writes")
        if shard not in self.fds:
            path = self.temp / self.files[shard]
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, self.headers[shard], 0)  # no ftruncate to full size: sparse files write slower here
            self.fds[shard] = fd
            if self.direct is not None:
                self.direct.add(shard, path, fd)
            if self.watcher is not None:
                self.watcher.opened(shard, fd, self.files[shard])
                self._advance(shard)
        return self.fds[shard]

    def _slot(self, name: str, offset: int, nbytes: int) -> _Slot:
        slot = self.slots[name]
        if offset < 0 or offset + nbytes > slot.spec.nbytes:
            raise ValueError(f"write of {nbytes} bytes at {offset} overruns {name} ({slot.spec.nbytes} bytes)")
        return slot

    def write(self, name: str, tensor: torch.Tensor, offset: int = 0) -> None:
        """Place ``tensor``'s bytes at byte ``offset`` of the planned tensor ``name`` (0: the whole tensor)."""
        data = tensor.detach().contiguous()
        expected = self.slots[name].spec.dtype
        if data.dtype != expected:
            raise ValueError(f"{name}: got {data.dtype}, planned {expected}")
        view = memoryview(data.view(-1).view(torch.uint8).numpy())
        slot = self._slot(name, offset, len(view))
        try:
            fd = self._fd(slot.shard)
            position = slot.offset + offset
            if self.direct is not None:
                self.direct.write(slot.shard, view, position)
            else:
                while view:  # 1 MiB writes: several times faster than one large write into the page cache
                    count = os.pwrite(fd, view[:WRITE_CHUNK], position)
                    view, position = view[count:], position + count
        except OSError as error:
            raise OssconvError(f"cannot write {name}: {error.strerror or error}", self.out) from None
        self._account(slot, data.numel() * data.element_size())

    @property
    def writes_direct(self) -> bool:
        """Whether tensor bytes go past the page cache (not where a watcher reads the files behind us)."""
        return self.direct is not None

    def block_offset(self, name: str) -> int:
        """Where in a disk block tensor ``name`` starts: a producer whose buffers start at this offset from a
        page boundary (see :func:`ossconv.direct_io.direct_buffer`) has its writes go to the disk straight
        from them, uncopied, when they are sizes of whole blocks."""
        return self.slots[name].offset % direct_io.ALIGN

    def copy(
        self,
        name: str,
        source: TensorInfo,
        *,
        start: int = 0,
        nbytes: int | None = None,
        offset: int = 0,
        direct: bool = False,
    ) -> None:
        """Copy ``nbytes`` of a source tensor's bytes from byte ``start`` to byte ``offset`` of ``name``,
        file to file inside the kernel (no Python buffer). Defaults: the whole tensor. With ``direct``, for
        bytes not in the page cache and not hinted into it, past the cache both ways (:meth:`_copy_direct`)."""
        nbytes = source.nbytes - start if nbytes is None else nbytes
        if start < 0 or start + nbytes > source.nbytes:
            raise ValueError(f"copy of {nbytes} bytes at {start} overruns {source.name} ({source.nbytes} bytes)")
        if source.dtype != self.slots[name].spec.dtype:
            raise ValueError(f"{name}: source is {source.dtype}, planned {self.slots[name].spec.dtype}")
        slot = self._slot(name, offset, nbytes)
        try:
            fd = self._fd(slot.shard)
            src_pos, dst_pos, left = source.offset + start, slot.offset + offset, nbytes
            if direct and self.direct is not None:
                done = self._copy_direct(slot.shard, source, src_pos, dst_pos, nbytes)
                src_pos, dst_pos, left = src_pos + done, dst_pos + done, left - done
            with open(source.file, "rb") as handle:
                while left:
                    count = self._copy_range(handle.fileno(), fd, min(left, COPY_CHUNK), src_pos, dst_pos)
                    if count == 0:
                        raise CheckpointError(f"file ended inside tensor {source.name}", source.file)
                    src_pos, dst_pos, left = src_pos + count, dst_pos + count, left - count
        except OSError as error:
            raise OssconvError(
                f"cannot copy {source.name} from {source.file}: {error.strerror or error}", self.out
            ) from None
        self._account(slot, nbytes)

    def _copy_direct(self, shard: int, source: TensorInfo, src_pos: int, dst_pos: int, nbytes: int) -> int:
        """Copy past the page cache both ways (see :mod:`ossconv.direct_io`): a kernel copy of cold bytes
        fills fresh pages on both sides, which cost more CPU than the copying (8 layers of 20b shape to HF
        bf16: 5 s of 13). The reads run ahead on a second thread into a ring of reused buffers, as the
        kernel's read-ahead would. Returns the bytes copied: all of them, or fewer where the source's file
        system refuses ``O_DIRECT``."""
        fd = direct_io.open_direct(source.file, os.O_RDONLY)
        if fd is None:
            return 0
        if self._copy_ring is None:
            self._copy_ring = ring(lambda: direct_io.direct_buffer(COPY_BUFFER).numpy())

        def read(index: int, buffer: np.ndarray) -> memoryview:
            count = min(COPY_BUFFER, nbytes - index * COPY_BUFFER)
            data = direct_io.read_direct(fd, src_pos + index * COPY_BUFFER, count, buffer)
            if len(data) < count:
                raise CheckpointError(f"file ended inside tensor {source.name}", source.file)
            return data

        chunks = ring_prefetch(read, -(-nbytes // COPY_BUFFER), self._copy_ring)
        done = 0
        try:
            for data in chunks:
                self.direct.write(shard, data, dst_pos + done)
                done += len(data)
        except OSError as error:
            if error.errno != errno.EINVAL:  # a device with blocks larger than ALIGN: the kernel copies the rest
                raise
        finally:
            chunks.close()  # the reading thread has stopped before its descriptor is closed
            os.close(fd)
        return done

    def _copy_range(self, src: int, dst: int, count: int, src_pos: int, dst_pos: int) -> int:
        """copy_file_range where the kernel and file systems allow it (across file systems they often do
        not), else a plain read and write of at most COPY_CHUNK bytes."""
        if self.kernel_copy:
            try:
                return os.copy_file_range(src, dst, count, src_pos, dst_pos)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM):
                    raise
                self.kernel_copy = False
        data = os.pread(src, min(count, FALLBACK_CHUNK), src_pos)
        view = memoryview(data)
        while view:
            written = os.pwrite(dst, view, dst_pos)
            view, dst_pos = view[written:], dst_pos + written
        return len(data)

    def shard_names(self, shard: int) -> list[str]:
        return [slot.spec.name for slot in self._in_order[shard]]

    def adopt(self, shard: int, existing: Path) -> bool:
        """Take ``existing``, a complete shard file written by another writer with the same header (the same
        tensors), as this shard: hard-linked, so its bytes are neither written nor read again; copied in the
        kernel where the file system refuses links. False, with nothing done, when the header or size differ.
        The shard's tensors then count as written and take no writes."""
        names = self.shard_names(shard)
        size = len(self.headers[shard]) + sum(self.slots[name].spec.nbytes for name in names)
        try:
            with open(existing, "rb") as handle:
                same = (
                    os.fstat(handle.fileno()).st_size == size
                    and handle.read(len(self.headers[shard])) == (self.headers[shard])
                )
        except OSError:
            return False
        if not same or shard in self.fds:
            return False
        target = self.temp / self.files[shard]
        try:
            os.link(existing, target)
        except OSError:  # no hard links here (another file system, FAT, a link limit): copy it instead
            fd, position = self._fd(shard), 0
            try:
                with open(existing, "rb") as handle:
                    while position < size:
                        left = min(size - position, COPY_CHUNK)
                        count = self._copy_range(handle.fileno(), fd, left, position, position)
                        if count == 0:
                            raise OssconvError("ended while being copied", existing)
                        position += count
            except OSError as error:
                raise OssconvError(f"cannot copy: {error.strerror or error}", existing) from None
        self.adopted.add(shard)
        for name in names:
            self._account(self.slots[name], self.slots[name].spec.nbytes - self.slots[name].written)
        return True

    def _account(self, slot: _Slot, nbytes: int) -> None:
        slot.written += nbytes
        self.progress(nbytes)
        if self.watcher is not None and slot.written == slot.spec.nbytes and slot.shard in self.fds:
            self._advance(slot.shard)

    def _advance(self, shard: int) -> None:
        """Tell the watcher how far from the start this shard is complete."""
        slots, index = self._in_order[shard], self._first_incomplete[shard]
        while index < len(slots) and slots[index].written == slots[index].spec.nbytes:
            index += 1
        self._first_incomplete[shard] = index
        frontier = slots[index - 1].offset + slots[index - 1].spec.nbytes if index else len(self.headers[shard])
        self.watcher.written(shard, frontier)

    def finish(self, json_files: dict[str, dict[str, Any]], side_files: list[Path] = ()) -> Path:
        """Check every planned byte was written, add index/config/side files, and move into place."""
        incomplete = [s.spec.name for s in self.slots.values() if s.written != s.spec.nbytes]
        if incomplete:
            raise RuntimeError(f"{len(incomplete)} tensor(s) not fully written, first {incomplete[0]}")
        if self.direct is not None:
            try:
                self.direct.flush()
            except OSError as error:
                raise OssconvError(f"cannot write: {error.strerror or error}", self.out) from None
            self.direct.close()
            self.direct = None
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        for shard in range(len(self.files)):  # shards with no tensors are impossible, but keep files consistent
            if not (self.temp / self.files[shard]).exists():
                self._fd(shard)
                os.close(self.fds.pop(shard))
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(s.spec.nbytes for s in self.slots.values())},
                "weight_map": {name: self.files[s.shard] for name, s in self.slots.items()},
            }
            json_files = {INDEX_NAME: index, **json_files}
        for filename, value in json_files.items():
            try:
                (self.temp / filename).write_text(json.dumps(value, indent=2) + "\n")
            except OSError as error:
                raise OssconvError(f"cannot write {filename}: {error.strerror or error}", self.out) from None
        for side in side_files:
            try:
                shutil.copyfile(side, self.temp / side.name)
            except OSError as error:
                raise OssconvError(f"cannot copy {side.name}: {error.strerror or error}", self.out) from None
        place(self.temp, self.out, overwrite=self.overwrite)
        self.state = WriterState.FINISHED
        return self.out

    def abort(self) -> None:
        if self.direct is not None:
            self.direct.close()
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        shutil.rmtree(self.temp, ignore_errors=True)
        self.state = WriterState.ABORTED


def dtypes_json(specs: list[TensorSpec]) -> dict[str, str]:
    """OpenAI's ``dtypes.json``: FP4/UE8 for MXFP4 blocks/scales, the safetensors dtype otherwise."""
    tags = {}
    for spec in specs:
        suffix = next((s for s in DTYPES_JSON_TAGS if spec.name.endswith(s)), None)
        tags[spec.name] = DTYPES_JSON_TAGS[suffix] if suffix else SAFETENSORS_DTYPES[spec.dtype]
    return tags


def check_output_apart(source: Path, out: Path) -> None:
    """Refuse an output that is, or lies inside, or contains the source folder."""
    src, dst = source.resolve(), out.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise OssconvError(f"output must not overlap the source checkpoint {source}", out)


def write_file_atomically(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """One file (a report, saved logits) written beside its place and renamed into it when complete."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    temp = temporary(path)
    try:
        temp.write_bytes(data)
        place(temp, path, overwrite=overwrite)
    except OSError as error:
        raise OssconvError(f"cannot write: {error.strerror}", path) from None
    finally:
        temp.unlink(missing_ok=True)
    return path
