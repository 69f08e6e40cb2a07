"""pack / unpack: change the precision of the expert weights, keep the layout and every other byte.

Both are a plan into the source's own layout: experts are re-expressed one expert at a time, everything
else is copied file to file.
"""

from __future__ import annotations

from pathlib import Path

from ossconv.checkpoint import open_folder_checkpoint
from ossconv.convert.execute import run
from ossconv.convert.plan import plan
from ossconv.convert.target import ConversionResult, Target, WriteOptions, precision_of
from ossconv.errors import OssconvError
from ossconv.formats.precision import Precision
from ossconv.progress import Progress
from ossconv.units import DEFAULT_MAX_SHARD_SIZE


def unpack(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | Precision = "bf16",
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Progress | None = None,
) -> ConversionResult:
    """MXFP4 (or other float) experts -> ``dtype`` experts.

    Example:
        >>> unpack("gpt-oss-20b/original", "gpt-oss-20b-bf16", dtype="bf16")  # doctest: +SKIP
    """
    precision = precision_of(dtype)
    if not precision.is_float:
        raise OssconvError(f"unknown dtype {dtype!r}; choose bf16, fp16 or fp32")
    ckpt = open_folder_checkpoint(src, "unpack")
    if ckpt.precision is precision:
        raise OssconvError(f"expert weights are already {precision.value}; nothing to unpack", ckpt.path)
    options = WriteOptions(overwrite, max_shard_size, progress)
    return run(plan(ckpt, Target(ckpt.layout, precision)), out, options, command="unpack")


def pack(
    src: str | Path,
    out: str | Path,
    *,
    rule: str = "up",
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Progress | None = None,
) -> ConversionResult:
    """Float experts -> MXFP4 (``rule`` ``up``: triton_kernels' ROUND_UP; ``floor``: OCP MX / torchao).

    Example:
        >>> pack("finetuned-bf16", "finetuned-mxfp4")  # doctest: +SKIP
    """
    Target("openai", Precision.MXFP4, rule)  # refuse a bad rule before reading anything
    ckpt = open_folder_checkpoint(src, "pack")
    if ckpt.precision is Precision.MXFP4:
        raise OssconvError("expert weights are already MXFP4; nothing to pack", ckpt.path)
    options = WriteOptions(overwrite, max_shard_size, progress)
    return run(plan(ckpt, Target(ckpt.layout, Precision.MXFP4, rule)), out, options, command="pack")
