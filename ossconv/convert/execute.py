"""Carry out a plan: copies run file to file in the kernel, re-encodes hold one expert slice in memory.

Peak memory is one expert slice plus small buffers, whatever the size of the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ossconv.checkpoint import Checkpoint
from ossconv.convert.plan import Copy, Plan, Reencode
from ossconv.convert.target import ConversionResult, WriteOptions
from ossconv.errors import CheckpointError
from ossconv.formats import mxfp4
from ossconv.formats.layouts import ExpertWeight
from ossconv.formats.precision import Precision
from ossconv.writer import CheckpointWriter, check_output_apart


def execute(plan: Plan, writer: CheckpointWriter) -> None:
    """Write every planned tensor into ``writer`` (which was opened with ``plan.specs``)."""
    for step in plan.steps:
        if isinstance(step, Copy):
            offset = 0
            for piece in step.sources:
                writer.copy(step.target, piece.tensor, start=piece.start, nbytes=piece.nbytes, offset=offset)
                offset += piece.nbytes
        else:
            _reencode(plan, step, writer)


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
        execute(plan, writer)
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
    )


def expert_slices(ckpt: Checkpoint, weight: ExpertWeight, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Each expert's weight as ``[out, in]`` of ``dtype`` (MXFP4 decoded, HF floats un-transposed).

    The yielded tensor is a reused buffer: consume it before asking for the next one.
    """
    buffer = torch.empty((weight.out_features, weight.in_features), dtype=dtype)
    for expert in range(weight.num_experts):
        yield ckpt.get_expert(weight, expert, dtype, out=buffer)


def write_expert_weight(
    writer: CheckpointWriter,
    weight: ExpertWeight,
    precision: Precision,
    slices: Iterator[torch.Tensor],
    *,
    rule: str = "up",
    source_file: Path | None = None,
) -> None:
    """Write ``[out, in]`` expert slices as ``weight`` in ``precision``, expert after expert."""
    if precision is Precision.MXFP4:
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
    dtype = precision.torch_dtype
    stored = torch.empty(weight.float_spec(precision).shape[1:], dtype=dtype)
    per_expert = stored.numel() * stored.element_size()
    for expert, matrix in enumerate(slices):
        if weight.transposed or matrix.dtype != dtype:
            data = stored.copy_(weight.to_stored(matrix))  # HF's [in, out]: the one unavoidable pass
        else:
            data = matrix
        writer.write(weight.float_name, data, expert * per_expert)


def _reencode(plan: Plan, step: Reencode, writer: CheckpointWriter) -> None:
    ckpt, target = plan.source, plan.target
    # Encoding reads source floats as they are (MXFP4 sources decode to fp32, exactly).
    if target.precision is Precision.MXFP4:
        dtype = ckpt.precision.torch_dtype if ckpt.precision.is_float else torch.float32
    else:
        dtype = target.precision.torch_dtype
    stored = step.source.blocks if ckpt.precision is Precision.MXFP4 else step.source.float_name
    slices = expert_slices(ckpt, step.source, dtype)
    write_expert_weight(
        writer, step.target, target.precision, slices, rule=target.rule, source_file=ckpt.info(stored).file
    )
