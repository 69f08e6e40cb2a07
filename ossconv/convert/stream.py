"""Rewrite a checkpoint into a layout and an expert precision, one tensor (one expert slice) at a time.

Every command that writes a checkpoint (convert, pack, unpack) is this one plan: for each tensor of the
output, either byte ranges to copy from the source (renames, the qkv row split/fuse, MXFP4 blocks and scales,
which are the same bytes in both layouts), or an expert weight to re-express expert by expert (decode,
encode, transpose between ``[E, out, in]`` and HF's ``[E, in, out]``). Copies run file to file in the
kernel; expert work holds one expert slice in memory. Peak memory is therefore one expert slice plus small
buffers, whatever the size of the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ossconv.checkpoint import CONFIG_NAME, DTYPES_NAME, Checkpoint, TensorInfo
from ossconv.errors import CheckpointError
from ossconv.formats import layouts, mxfp4
from ossconv.formats.layouts import MXFP4, OPENAI, ExpertWeight, TensorSpec
from ossconv.inspection import find_problems
from ossconv.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, check_output_apart, dtypes_json

TORCH_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass
class ConversionResult:
    """What a command wrote; the CLI renders it as text or JSON."""

    command: str
    source: str
    output: str
    source_layout: str
    layout: str
    source_precision: str
    precision: str
    tensors: int
    files: int
    bytes_written: int
    seconds: float
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class CopyJob:
    """One output tensor assembled from source byte ranges: (source, start, nbytes, offset in the output)."""

    target: str
    segments: tuple[tuple[TensorInfo, int, int, int], ...]


@dataclass(frozen=True)
class ExpertJob:
    """One fused expert weight re-expressed expert by expert."""

    source: ExpertWeight
    target: ExpertWeight


# ---------------------------------------------------------------------------------------------- expert slices


def expert_float_slices(ckpt: Checkpoint, weight: ExpertWeight, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Yield each expert's weight as ``[out, in]`` of ``dtype``, decoding MXFP4 or un-transposing HF floats.

    The yielded tensor is a reused buffer: consume it before asking for the next one.
    """
    buffer = torch.empty((weight.out_features, weight.in_features), dtype=dtype)
    for expert in range(weight.num_experts):
        yield ckpt.get_expert(weight, expert, dtype, out=buffer)


def write_expert_weight(
    writer: CheckpointWriter,
    weight: ExpertWeight,
    target: str | torch.dtype,
    slices: Iterator[torch.Tensor],
    *,
    rule: str = "up",
    source_file: Path | None = None,
) -> None:
    """Write ``[out, in]`` expert slices as ``weight`` in ``target`` precision (MXFP4 or a float dtype)."""
    if target == MXFP4:
        blocks_spec, scales_spec = weight.packed_specs()
        blocks = torch.empty(blocks_spec.shape[1:], dtype=torch.uint8)
        scales = torch.empty(scales_spec.shape[1:], dtype=torch.uint8)
        for expert, matrix in enumerate(slices):
            try:
                mxfp4.encode(matrix, rule, out=(blocks, scales))
            except mxfp4.NonFiniteError as error:
                raise CheckpointError(f"{weight.float_name} expert {expert}: {error}", source_file) from None
            writer.write(weight.blocks, blocks, expert * blocks.numel())
            writer.write(weight.scales, scales, expert * scales.numel())
        return
    per_expert = weight.out_features * weight.in_features * target.itemsize
    buffer = torch.empty((weight.out_features, weight.in_features), dtype=target)
    transposed = torch.empty((weight.in_features, weight.out_features), dtype=target)
    for expert, matrix in enumerate(slices):
        if weight.transposed:
            data = transposed.copy_(matrix.T)  # the one unavoidable pass: HF stores [in, out]
        else:
            data = matrix if matrix.dtype == target else buffer.copy_(matrix)
        writer.write(weight.float_name, data, expert * per_expert)


# ---------------------------------------------------------------------------------------------- planning


# A tensor's bytes as stored: (stored tensor, first byte there, first byte, stop byte in the tensor's bytes).
ByteMap = list[tuple[TensorInfo, int, int, int]]


def _byte_map(ckpt: Checkpoint, names: list[str]) -> ByteMap:
    """The bytes of the concatenation of ``names`` (a row split never reorders bytes), as stored."""
    mapped, position = [], 0
    for name in names:
        for info, start, nbytes in ckpt.byte_pieces(name):
            mapped.append((info, start, position, position + nbytes))
            position += nbytes
    return mapped


def _copy_job(target: str, mapped: ByteMap, lo: int, hi: int) -> CopyJob:
    """Bytes ``lo:hi`` of a mapped tensor, as the whole of output tensor ``target``."""
    segments = tuple(
        (info, start + max(lo, begin) - begin, min(hi, end) - max(lo, begin), max(lo, begin) - lo)
        for info, start, begin, end in mapped
        if begin < hi and end > lo
    )
    return CopyJob(target, segments)


def _outputs(spec: TensorSpec, split: bool, experts: range | None) -> list[tuple[TensorSpec, int, int]]:
    """The output tensor(s) for one logical tensor: itself, or one per expert (``split``), limited to
    ``experts`` (an expert-parallel rank): (spec, first byte, stop byte) of the logical tensor."""
    if not (split and layouts.is_expert_tensor(spec.name)):
        return [(spec, 0, spec.nbytes)]
    per_expert = spec.nbytes // spec.shape[0]
    chosen = range(spec.shape[0]) if experts is None else experts
    return [
        (TensorSpec(layouts.split_name(spec.name, j), spec.shape[1:], spec.dtype), j * per_expert, (j + 1) * per_expert)
        for j in chosen
    ]


def _dense_parts(ckpt: Checkpoint, name: str, layout: str) -> list[tuple[TensorSpec, ByteMap, int, int]]:
    """One canonical non-expert tensor in ``layout``: each part's spec and its window of the canonical bytes."""
    sources = [part for part, _, _ in layouts.layout_parts(ckpt.layout, name, ckpt.config)]
    infos = [ckpt.info(part) for part in sources]
    if len({info.dtype for info in infos}) > 1:
        raise CheckpointError(f"the parts of {name} have different dtypes", ckpt.path)
    first = infos[0]
    row_bytes = first.nbytes // first.shape[0] if first.shape else first.nbytes
    mapped = _byte_map(ckpt, sources)
    rows = mapped[-1][3] // row_bytes
    parts = []
    for part, start, stop in layouts.layout_parts(layout, name, ckpt.config):
        stop = rows if stop is None else stop
        shape = (stop - start, *first.shape[1:]) if first.shape else ()
        parts.append((TensorSpec(part, shape, first.dtype), mapped, start * row_bytes, stop * row_bytes))
    return parts


def plan(
    ckpt: Checkpoint,
    layout: str,
    experts: str | torch.dtype,
    *,
    split: bool = False,
    expert_range: range | None = None,
) -> tuple[list[TensorSpec], list[object]]:
    """The output's tensors in file order, and the jobs that produce them. ``split`` writes one tensor per
    expert (``expert_range``: only those experts, for an expert-parallel rank); splitting copies bytes, so
    it cannot be combined with a change of layout or precision."""
    problems = find_problems(ckpt)
    if problems:
        more = f" (and {len(problems) - 1} more problems; see ossconv inspect)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more, ckpt.path)
    source_format = ckpt.expert_format
    if split and (layout != ckpt.layout or experts != source_format):
        raise ValueError("splitting experts keeps layout and precision")
    cfg = ckpt.config
    pairs = zip(layouts.expert_weights(ckpt.layout, cfg), layouts.expert_weights(layout, cfg), strict=True)
    by_canonical = {f"block.{s.layer}.mlp.{s.proj}_weight": (s, t) for s, t in pairs}
    specs: list[TensorSpec] = []
    jobs: list[object] = []

    def copy(spec: TensorSpec, mapped: ByteMap, lo: int, hi: int) -> None:
        for out_spec, begin, end in _outputs(spec, split, expert_range):
            specs.append(out_spec)
            jobs.append(_copy_job(out_spec.name, mapped, lo + begin, lo + end))

    def copy_whole(target_spec: TensorSpec, source_name: str) -> None:
        copy(target_spec, _byte_map(ckpt, [source_name]), 0, target_spec.nbytes)

    for canonical in layouts.canonical_specs(cfg, MXFP4):
        if canonical.name.endswith(".scales"):
            continue
        weight_name = canonical.name.removesuffix(".blocks")
        if weight_name not in by_canonical:
            for spec, mapped, lo, hi in _dense_parts(ckpt, canonical.name, layout):
                copy(spec, mapped, lo, hi)
            continue
        source, target = by_canonical[weight_name]
        if experts == MXFP4 and source_format == MXFP4:  # the same bytes in both layouts
            blocks_spec, scales_spec = target.packed_specs()
            copy_whole(blocks_spec, source.blocks)
            copy_whole(scales_spec, source.scales)
        elif experts == source_format and source.transposed == target.transposed:
            copy_whole(target.float_spec(experts), source.float_name)
        else:
            specs += list(target.packed_specs()) if experts == MXFP4 else [target.float_spec(experts)]
            jobs.append(ExpertJob(source, target))
    return specs, jobs


def config_files(ckpt: Checkpoint, layout: str, experts: str | torch.dtype, specs: list[TensorSpec]) -> dict[str, dict]:
    """config.json (and dtypes.json) for the output; a source config of the same layout keeps its extra keys."""
    if layout == OPENAI:
        config = dict(ckpt.raw_config) if ckpt.layout == OPENAI else ckpt.config.to_openai()
        return {CONFIG_NAME: config, DTYPES_NAME: dtypes_json(specs)}
    if ckpt.layout == layouts.HF:
        config = dict(ckpt.raw_config)
    else:
        dense = ckpt.tensors[next(iter(ckpt.tensors))].dtype
        config = ckpt.config.to_hf(mxfp4=False, torch_dtype=TORCH_DTYPE_NAMES.get(dense, "bfloat16"))
    config.pop("quantization_config", None)
    if experts == MXFP4:
        config["quantization_config"] = ckpt.config.to_hf(mxfp4=True)["quantization_config"]
    else:
        dense = ckpt.tensors[next(iter(ckpt.tensors))].dtype
        if experts.itemsize > dense.itemsize:  # loading in torch_dtype must not round the experts
            config["torch_dtype"] = TORCH_DTYPE_NAMES[experts]
    return {CONFIG_NAME: config}


# ---------------------------------------------------------------------------------------------- running


def rewrite(
    ckpt: Checkpoint,
    out: str | Path,
    *,
    command: str,
    layout: str,
    experts: str | torch.dtype,
    rule: str = "up",
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Callable[[int], None] | None = None,
    split: bool = False,
    expert_range: range | None = None,
    gate: Callable[[], object] | None = None,
) -> ConversionResult:
    """Write ``ckpt`` to ``out`` in ``layout`` with expert weights in ``experts`` (``"mxfp4"`` or a dtype);
    ``split``/``expert_range`` as in :func:`plan`. ``gate`` runs before the output is moved into place; if it
    raises, nothing is left behind (merge checks its input this way while it copies)."""
    started = time.perf_counter()
    out = Path(out)
    check_output_apart(ckpt.path, out)
    specs, jobs = plan(ckpt, layout, experts, split=split, expert_range=expert_range)
    source_format = ckpt.expert_format
    slice_dtype = source_format if experts == MXFP4 else experts  # encode reads source floats as they are
    with CheckpointWriter(out, specs, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress) as writer:
        for job in jobs:
            if isinstance(job, CopyJob):
                for info, start, nbytes, offset in job.segments:
                    writer.copy(job.target, info, start=start, nbytes=nbytes, offset=offset)
            else:
                source_file = ckpt.info(job.source.blocks if source_format == MXFP4 else job.source.float_name).file
                slices = expert_float_slices(ckpt, job.source, slice_dtype)
                write_expert_weight(writer, job.target, experts, slices, rule=rule, source_file=source_file)
        if gate is not None:
            gate()
        writer.finish(config_files(ckpt, layout, experts, specs), ckpt.side_files)
    written = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    return ConversionResult(
        command=command,
        source=str(ckpt.path),
        output=str(out),
        source_layout=ckpt.layout,
        layout=layout,
        source_precision=ckpt.precision,
        precision=layouts.precision_name(experts),
        tensors=len(specs),
        files=len(writer.files),
        bytes_written=written,
        seconds=time.perf_counter() - started,
    )
