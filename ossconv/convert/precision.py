"""pack / unpack: change the precision of the expert weights, keep every other byte.

Each fused expert tensor is processed one expert at a time: read one expert's slice, decode or encode it,
and write it at its planned offset, so memory holds one expert slice (about 33 MB of bf16 for gpt-oss'
gate_up) whatever the model size. Every other tensor is copied file to file by the kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ossconv.checkpoint import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    DTYPES_NAME,
    Checkpoint,
    CheckpointWriter,
    check_output_apart,
    dtypes_json,
    open_checkpoint,
)
from ossconv.errors import CheckpointError, OssconvError
from ossconv.formats import layouts, mxfp4
from ossconv.formats.layouts import FLOAT_PRECISIONS, MXFP4, ExpertWeight, TensorSpec


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

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def expert_float_slices(ckpt: Checkpoint, weight: ExpertWeight, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Yield each expert's weight as ``[out, in]`` of ``dtype``, decoding MXFP4 or un-transposing HF floats.

    The yielded tensor may be a reused buffer: consume it before asking for the next one.
    """
    buffer = torch.empty((weight.out_features, weight.in_features), dtype=dtype)
    packed = weight.blocks in ckpt.tensors
    for expert in range(weight.num_experts):
        if packed:
            blocks = ckpt.get_rows(weight.blocks, expert)[0]
            scales = ckpt.get_rows(weight.scales, expert)[0]
            yield mxfp4.decode(blocks, scales, dtype, out=buffer)
        else:
            matrix = ckpt.get_rows(weight.float_name, expert)[0]
            yield buffer.copy_(matrix.T if weight.transposed else matrix)


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
        data = buffer.copy_(matrix)
        if weight.transposed:
            data = transposed.copy_(data.T)
        writer.write(weight.float_name, data, expert * per_expert)


def output_specs(ckpt: Checkpoint, target: str | torch.dtype) -> list[TensorSpec]:
    """The source's tensors in order, with every expert weight replaced by its ``target`` form."""
    weights = {}
    for weight in layouts.expert_weights(ckpt.layout, ckpt.config):
        for name in (weight.blocks, weight.scales, weight.float_name):
            weights[name] = weight
    specs, done = [], set()
    for name, info in ckpt.tensors.items():
        weight = weights.get(name)
        if weight is None:
            specs.append(info.spec)
        elif weight.float_name not in done:
            done.add(weight.float_name)
            specs += list(weight.packed_specs()) if target == MXFP4 else [weight.float_spec(target)]
    return specs


def output_config_files(ckpt: Checkpoint, specs: list[TensorSpec], target: str | torch.dtype) -> dict[str, dict]:
    """config.json (and dtypes.json) of the same layout for the new expert precision."""
    if ckpt.layout == layouts.OPENAI:
        return {CONFIG_NAME: dict(ckpt.raw_config), DTYPES_NAME: dtypes_json(specs)}
    config = dict(ckpt.raw_config)
    config.pop("quantization_config", None)
    if target == MXFP4:
        config["quantization_config"] = ckpt.config.to_hf(mxfp4=True)["quantization_config"]
    return {CONFIG_NAME: config}


def change_precision(
    ckpt: Checkpoint,
    out: str | Path,
    target: str | torch.dtype,
    *,
    rule: str = "up",
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Rewrite ``ckpt`` into ``out`` with experts in ``target``; returns (tensors, files) written."""
    check_output_apart(ckpt.path, Path(out))
    specs = output_specs(ckpt, target)
    by_name = {}
    for weight in layouts.expert_weights(ckpt.layout, ckpt.config):
        for name in (weight.blocks, weight.scales, weight.float_name):
            by_name[name] = weight
    # Encoding reads the source floats as they are; decoding produces the target dtype directly.
    slice_dtype = ckpt.expert_format if target == MXFP4 else target
    done = set()
    with CheckpointWriter(out, specs, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress) as writer:
        for name, info in ckpt.tensors.items():
            weight = by_name.get(name)
            if weight is None:
                writer.copy(name, info)
            elif weight.float_name not in done:
                done.add(weight.float_name)
                slices = expert_float_slices(ckpt, weight, slice_dtype)
                write_expert_weight(writer, weight, target, slices, rule=rule, source_file=info.file)
        writer.finish(output_config_files(ckpt, specs, target), ckpt.side_files)
    return len(specs), len(writer.files)


def _run(command: str, src: str | Path, out: str | Path, target: str | torch.dtype, **kwargs) -> ConversionResult:
    started = time.perf_counter()
    ckpt = open_checkpoint(src)
    source_precision = ckpt.precision
    if command == "pack" and ckpt.expert_format == MXFP4:
        raise OssconvError("expert weights are already MXFP4; nothing to pack", ckpt.path)
    if command == "unpack" and ckpt.expert_format == target:
        raise OssconvError(f"expert weights are already {source_precision}; nothing to unpack", ckpt.path)
    tensors, files = change_precision(ckpt, out, target, **kwargs)
    written = sum(p.stat().st_size for p in Path(out).iterdir() if p.suffix == ".safetensors")
    return ConversionResult(
        command,
        str(src),
        str(out),
        ckpt.layout,
        ckpt.layout,
        source_precision,
        layouts.precision_name(target),
        tensors,
        files,
        written,
        time.perf_counter() - started,
    )


def unpack(src: str | Path, out: str | Path, dtype: str = "bf16", **kwargs) -> ConversionResult:
    """MXFP4 (or another float precision) experts -> ``dtype`` experts, same layout, other tensors unchanged.

    Example:
        >>> unpack("gpt-oss-20b/original", "gpt-oss-20b-bf16", dtype="bf16")  # doctest: +SKIP
    """
    if dtype not in FLOAT_PRECISIONS:
        raise OssconvError(f"unknown dtype {dtype!r}; choose bf16, fp16 or fp32")
    return _run("unpack", src, out, FLOAT_PRECISIONS[dtype], **kwargs)


def pack(src: str | Path, out: str | Path, rule: str = "up", **kwargs) -> ConversionResult:
    """Float experts -> MXFP4 experts (``rule`` ``up``: triton_kernels' scale rule; ``floor``: OCP/torchao).

    Example:
        >>> pack("finetuned-bf16", "finetuned-mxfp4")  # doctest: +SKIP
    """
    if rule not in mxfp4.RULES:
        raise OssconvError(f"unknown rule {rule!r}; choose up or floor")
    return _run("pack", src, out, MXFP4, rule=rule, **kwargs)
