"""Carry out a plan: copies run file to file in the kernel, re-encodes hold one expert slice in memory.

Peak memory is one expert slice plus small buffers, whatever the size of the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ossconv.adapters import expert_delta_norm, merge_expert, merge_rows, release_expert
from ossconv.checkpoint import Checkpoint
from ossconv.convert.plan import Copy, Merge, Plan, Reencode, Repack, Step
from ossconv.convert.target import ConversionResult, WriteOptions
from ossconv.direct_io import direct_buffer
from ossconv.errors import CheckpointError
from ossconv.files import ReadAhead, cached_share
from ossconv.formats import mxfp4
from ossconv.formats.layouts import ExpertWeight
from ossconv.formats.precision import Precision
from ossconv.prefetch import READ_AHEAD, prefetch, ring, ring_prefetch
from ossconv.writer import CheckpointWriter, check_output_apart

DIRECT_COPY_MIN = 64 << 20  # smaller copies stay in the kernel, hinted ahead: a direct read of each on its own
# leaves the disk idle between them (expert-parallel pieces of 8 MB: merge 0.67x cp, against 0.8-1.0x)
MERGE_ROWS = 16384  # rows of a dense tensor merged at a time: an embedding never sits whole in fp32


def execute(plan: Plan, writer: CheckpointWriter) -> list[dict[str, object]]:
    """Write every planned tensor into ``writer`` (which was opened with ``plan.specs``); returns what merging
    adapters did to each tensor it touched (empty without adapters)."""
    merged: list[dict[str, object]] = []
    direct = [writer.writes_direct and _reads_direct(plan, step) for step in plan.steps]
    ranges = [
        [] if past_cache else _step_ranges(plan.source, step)
        for step, past_cache in zip(plan.steps, direct, strict=True)
    ]
    with ReadAhead(ranges) as read_ahead:
        for index, step in enumerate(plan.steps):
            read_ahead.reached(index)
            if isinstance(step, Copy):
                offset = 0
                for piece in step.sources:
                    writer.copy(
                        step.target, piece.tensor, start=piece.start, nbytes=piece.nbytes, offset=offset,
                        direct=direct[index],
                    )  # fmt: skip
                    offset += piece.nbytes
            elif isinstance(step, Merge):
                report = _merge_dense(plan, step, writer)
                if plan.target.adapters:
                    merged.append(report)
            elif isinstance(step, Repack):
                _repack(plan, step, writer)
            else:
                report = _reencode(plan, step, writer, direct=direct[index])
                if report:
                    merged.append(report)
    return merged


def _reads_direct(plan: Plan, step: Step) -> bool:
    """Whether a step reads its bytes past the page cache, not (mostly) cached already: a copy of at least
    DIRECT_COPY_MIN bytes, or float experts encoded to MXFP4 as they are stored
    (:meth:`Checkpoint.read_direct`). Such a step gets no read-ahead hints (the bytes would be read twice);
    its own reads run ahead on a thread of their own."""
    ckpt = plan.source
    if isinstance(step, Copy):
        return (
            sum(piece.nbytes for piece in step.sources) >= DIRECT_COPY_MIN
            and cached_share(_step_ranges(ckpt, step)) < 0.5
        )
    return (
        isinstance(step, Reencode)
        and isinstance(ckpt, Checkpoint)
        and plan.target.precision is Precision.MXFP4
        and ckpt.precision.is_float
        and not plan.target.merges_into(step.source)
        and step.source.float_name in ckpt.tensors
        and ckpt.info(step.source.float_name).dtype == ckpt.precision.torch_dtype
        and ckpt.cached(step.source) < 0.5
    )


def _step_ranges(ckpt: Checkpoint, step: Step) -> list[tuple[Path, int, int]]:
    """The source bytes a step reads."""
    if isinstance(step, Copy):
        return [(p.tensor.file, p.tensor.offset + p.start, p.nbytes) for p in step.sources]
    if not isinstance(ckpt, Checkpoint):  # a GGUF file is read as it comes
        return []
    return ckpt.stored(step.canonical if isinstance(step, Merge) else step.source)


def run(
    plan: Plan, out: str | Path, options: WriteOptions, *, command: str, gate: Callable[[], object] | None = None
) -> ConversionResult:
    """Execute ``plan`` into a new checkpoint folder ``out``. ``gate`` runs before the output is moved into
    place; if it raises, nothing is left behind (merge checks its input this way while it copies)."""
    started = time.perf_counter()
    out = Path(out)
    ckpt = plan.source
    check_output_apart(ckpt.path, out)
    with CheckpointWriter(
        out, plan.specs, max_shard_size=options.max_shard_size, overwrite=options.overwrite, progress=options.progress
    ) as writer:
        merged = execute(plan, writer)
        if gate is not None:
            gate()
        writer.finish(plan.json_files, ckpt.side_files)
    return ConversionResult(
        command=command,
        source=str(ckpt.path),
        output=str(out),
        source_layout=ckpt.layout,
        layout=plan.target.layout,
        source_precision=ckpt.precision.value,
        precision=plan.target.precision.value,
        tensors=len(plan.specs),
        files=len(writer.files),
        bytes_written=sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors"),
        seconds=time.perf_counter() - started,
        details={"lora": {"adapters": [a.describe() for a in plan.target.adapters], "tensors": merged}}
        if plan.target.adapters
        else {},
    )


def expert_slices(
    ckpt: Checkpoint, weight: ExpertWeight, dtype: torch.dtype, *, stored_views: bool = False, direct: bool = False
) -> Iterator[torch.Tensor]:
    """Each expert's weight as ``[out, in]`` of ``dtype`` (MXFP4 decoded, HF floats un-transposed), read and
    decoded ahead on a second thread while the current one is written. A slice is valid until the next one
    is taken. With ``stored_views``, float experts stored in ``dtype`` come as views of the page cache
    (:meth:`Checkpoint.map_rows`), HF's transposed: the MXFP4 encoder reads them in place, where a copy out
    of the page cache, and HF's transpose, would cost as much CPU as the encoding. With ``direct`` too, they
    are read past the page cache into a ring of reused buffers instead (:meth:`Checkpoint.read_direct`; for
    experts not cached already: 8 layers of 20b shape, cold, 21 s -> 16-18 s, at 0.9x the disk reading them
    while it writes the output)."""
    if stored_views and weight.float_name in ckpt.tensors and ckpt.info(weight.float_name).dtype == dtype:
        if direct:
            per_expert = math.prod(ckpt.info(weight.float_name).shape[1:]) * dtype.itemsize
            return ring_prefetch(
                lambda expert, out: weight.from_stored(ckpt.read_direct(weight.float_name, expert, out)[0]),
                weight.num_experts,
                ring(lambda: direct_buffer(per_expert)),
            )
        return prefetch(
            (weight.from_stored(ckpt.map_rows(weight.float_name, expert)[0]) for expert in range(weight.num_experts)),
            depth=READ_AHEAD,
        )
    shape = (weight.out_features, weight.in_features)
    return ring_prefetch(
        lambda expert, out: ckpt.get_expert(weight, expert, dtype, out=out),
        weight.num_experts,
        ring(lambda: torch.empty(shape, dtype=dtype)),
    )


def _stored_slices(weight: ExpertWeight, dtype: torch.dtype, slices: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each ``[out, in]`` slice as ``weight`` stores it in ``dtype`` (HF's ``[in, out]`` transposed), made on
    a thread of its own: the transpose, the decode before it and the writing after it overlap."""
    shape = weight.float_spec(Precision.of_dtype(dtype)).shape[1:]
    return ring_prefetch(
        lambda _, out: out.copy_(weight.to_stored(next(slices))),
        weight.num_experts,
        ring(lambda: torch.empty(shape, dtype=dtype)),
    )


def write_expert_weight(
    writer: CheckpointWriter,
    weight: ExpertWeight,
    precision: Precision,
    slices: Iterator[torch.Tensor],
    *,
    rule: str = "up",
    source_file: Path | None = None,
    encoded: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> None:
    """Write ``[out, in]`` expert slices as ``weight`` in ``precision``, expert after expert; ``encoded`` is
    shown each slice with its MXFP4 blocks and scales."""
    if precision is Precision.MXFP4:
        blocks_spec, scales_spec = weight.packed_specs()
        source = iter(slices)

        def encode(expert: int, out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            matrix = next(source)
            try:
                mxfp4.encode(matrix, rule, out=out)
            except mxfp4.NonFiniteError as error:
                raise CheckpointError(f"{weight.float_name} expert {expert}: {error}", source_file) from None
            if encoded is not None:
                encoded(matrix, *out)
            return out

        # Encoded on a thread of their own while this one writes: a write can wait on the disk's dirty-page
        # limit, and the next expert's encoding should not wait with it.
        packed = ring_prefetch(
            encode,
            weight.num_experts,
            ring(
                lambda: (
                    torch.empty(blocks_spec.shape[1:], dtype=torch.uint8),
                    torch.empty(scales_spec.shape[1:], dtype=torch.uint8),
                )
            ),
        )
        for expert, (blocks, scales) in enumerate(packed):
            writer.write(weight.blocks, blocks, expert * blocks.numel())
            writer.write(weight.scales, scales, expert * scales.numel())
        return
    _write_stored(writer, weight, _stored_slices(weight, precision.torch_dtype, iter(slices)))


def _write_stored(writer: CheckpointWriter, weight: ExpertWeight, stored: Iterator[torch.Tensor]) -> None:
    """Write float expert slices already in ``weight``'s stored layout, expert after expert."""
    for expert, data in enumerate(stored):
        writer.write(weight.float_name, data, expert * data.numel() * data.element_size())


def _decoded_transposed(
    ckpt: Checkpoint, weight: ExpertWeight, dtype: torch.dtype, block_offset: int
) -> Iterator[torch.Tensor]:
    """Each MXFP4 expert decoded straight into HF's ``[in, out]`` (:func:`mxfp4.decode_transposed`), read
    into reused buffers and decoded ahead on a second thread; the decoded ones start ``block_offset`` bytes
    into a page, where the output tensor starts in its disk block, so the writer sends them uncopied."""
    blocks_shape, scales_shape = (s.shape[1:] for s in weight.packed_specs())
    matrix = weight.in_features * weight.out_features * dtype.itemsize
    block_offset = block_offset if block_offset % dtype.itemsize == 0 else 0  # else staged: a copy, no harm

    def decode(expert: int, out: tuple[torch.Tensor, ...]) -> torch.Tensor:
        blocks = ckpt.get_rows(weight.blocks, expert, out=out[0])[0]
        scales = ckpt.get_rows(weight.scales, expert, out=out[1])[0]
        return mxfp4.decode_transposed(blocks, scales, out=out[2])

    return ring_prefetch(
        decode,
        weight.num_experts,
        ring(
            lambda: (
                torch.empty(blocks_shape, dtype=torch.uint8),
                torch.empty(scales_shape, dtype=torch.uint8),
                direct_buffer(matrix)[block_offset : block_offset + matrix]
                .view(dtype)
                .view(weight.in_features, weight.out_features),
            )
        ),
    )


class _MergeStats:
    """||delta|| / ||W|| over a whole tensor and, when it is re-quantized, the relative RMS error that cost."""

    def __init__(self, name: str):
        self.name, self.base, self.delta, self.error, self.merged = name, 0.0, 0.0, 0.0, 0.0

    def add(self, base_norm: float, delta_norm: float) -> None:
        self.base += base_norm**2
        self.delta += delta_norm**2

    def quantized(self, merged: torch.Tensor, stored: torch.Tensor) -> None:
        self.merged += float(torch.linalg.vector_norm(merged)) ** 2
        self.error += float(torch.linalg.vector_norm(stored.sub_(merged))) ** 2

    def report(self) -> dict[str, object]:
        ratio = (self.delta / self.base) ** 0.5 if self.base else 0.0
        found: dict[str, object] = {"tensor": self.name, "delta_ratio": ratio}
        if self.merged:
            found["quantization_rms_error"] = (self.error / self.merged) ** 0.5
        return found


def _merge_dense(plan: Plan, step: Merge, writer: CheckpointWriter) -> dict[str, object]:
    ckpt, adapters = plan.source, plan.target.adapters
    stats = _MergeStats(step.target)
    dtype = writer.slots[step.target].spec.dtype
    row_bytes = writer.slots[step.target].spec.nbytes // max(1, step.stop - step.start)
    for lo in range(step.start, step.stop, MERGE_ROWS):
        hi = min(step.stop, lo + MERGE_ROWS)
        values = ckpt.canonical_rows(step.canonical, lo, hi)
        if adapters:  # without adapters (a GGUF source) this only changes the type
            base = values.float()
            values = merge_rows(adapters, step.canonical, lo, hi, base.clone())
            stats.add(float(torch.linalg.vector_norm(base)), float(torch.linalg.vector_norm(values - base)))
        writer.write(step.target, values.to(dtype), (lo - step.start) * row_bytes)
    return stats.report()


def _merged_slices(plan: Plan, weight: ExpertWeight, stats: _MergeStats) -> Iterator[torch.Tensor]:
    """Each expert as fp32 ``[out, in]`` with the adapters' deltas added."""
    for expert in range(weight.num_experts):
        merged = plan.source.get_expert(weight, expert, torch.float32)
        adapters = plan.target.adapters
        stats.add(
            float(torch.linalg.vector_norm(merged)), expert_delta_norm(adapters, weight.layer, weight.proj, expert)
        )
        yield merge_expert(adapters, weight.layer, weight.proj, expert, merged)


def _repack(plan: Plan, step: Repack, writer: CheckpointWriter) -> None:
    for expert in range(step.source.num_experts):
        blocks, scales = plan.source.get_expert_packed(step.source, expert)
        writer.write(step.target.blocks, blocks, expert * blocks.numel())
        writer.write(step.target.scales, scales, expert * scales.numel())


def _source_file(ckpt: Checkpoint, weight: ExpertWeight) -> Path:
    stored = weight.blocks if ckpt.precision is Precision.MXFP4 else weight.float_name
    return ckpt.info(stored).file if stored in ckpt.tensors else ckpt.path


def _reencode(
    plan: Plan, step: Reencode, writer: CheckpointWriter, *, direct: bool = False
) -> dict[str, object] | None:
    ckpt, target = plan.source, plan.target
    source_file = _source_file(ckpt, step.source)
    if target.merges_into(step.source):
        stats = _MergeStats(step.target.blocks if target.precision is Precision.MXFP4 else step.target.float_name)

        def encoded(merged: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> None:
            stats.quantized(merged, mxfp4.decode(blocks, scales, torch.float32))

        slices = prefetch(_merged_slices(plan, step.source, stats))
        write_expert_weight(
            writer, step.target, target.precision, slices, rule=target.rule, source_file=source_file, encoded=encoded
        )
        release_expert(target.adapters, step.source.layer, step.source.proj)
        return stats.report()
    # Encoding reads source floats as they are (MXFP4 sources decode to fp32, exactly).
    if target.precision is Precision.MXFP4:
        dtype = ckpt.precision.torch_dtype if ckpt.precision.is_float else torch.float32
    else:
        dtype = target.precision.torch_dtype
    if target.precision.is_float and step.target.transposed and ckpt.precision is Precision.MXFP4:
        if isinstance(ckpt, Checkpoint) and step.source.blocks in ckpt.tensors:
            decoded = _decoded_transposed(ckpt, step.source, dtype, writer.block_offset(step.target.float_name))
            _write_stored(writer, step.target, decoded)
            return None
    slices = expert_slices(ckpt, step.source, dtype, stored_views=target.precision is Precision.MXFP4, direct=direct)
    write_expert_weight(writer, step.target, target.precision, slices, rule=target.rule, source_file=source_file)
    return None
