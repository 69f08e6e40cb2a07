"""pack / unpack: change the precision of the expert weights, keep the layout and every other byte.

Both are :func:`ossconv.convert.stream.rewrite` into the source's own layout: experts are re-expressed one
expert at a time, everything else is copied file to file.
"""

from __future__ import annotations

from pathlib import Path

from ossconv.checkpoint import open_checkpoint
from ossconv.convert.stream import ConversionResult, rewrite
from ossconv.errors import OssconvError
from ossconv.formats import mxfp4
from ossconv.formats.layouts import FLOAT_PRECISIONS, MXFP4


def unpack(src: str | Path, out: str | Path, dtype: str = "bf16", **options: object) -> ConversionResult:
    """MXFP4 (or other float) experts -> ``dtype`` experts; options: overwrite, max_shard_size, progress.

    Example:
        >>> unpack("gpt-oss-20b/original", "gpt-oss-20b-bf16", dtype="bf16")  # doctest: +SKIP
    """
    if dtype not in FLOAT_PRECISIONS:
        raise OssconvError(f"unknown dtype {dtype!r}; choose bf16, fp16 or fp32")
    ckpt = open_checkpoint(src)
    if ckpt.expert_format == FLOAT_PRECISIONS[dtype]:
        raise OssconvError(f"expert weights are already {dtype}; nothing to unpack", ckpt.path)
    return rewrite(ckpt, out, command="unpack", layout=ckpt.layout, experts=FLOAT_PRECISIONS[dtype], **options)


def pack(src: str | Path, out: str | Path, rule: str = "up", **options: object) -> ConversionResult:
    """Float experts -> MXFP4 (``rule`` ``up``: triton_kernels' ROUND_UP; ``floor``: OCP MX / torchao).

    Example:
        >>> pack("finetuned-bf16", "finetuned-mxfp4")  # doctest: +SKIP
    """
    if rule not in mxfp4.RULES:
        raise OssconvError(f"unknown rule {rule!r}; choose up or floor")
    ckpt = open_checkpoint(src)
    if ckpt.expert_format == MXFP4:
        raise OssconvError("expert weights are already MXFP4; nothing to pack", ckpt.path)
    return rewrite(ckpt, out, command="pack", layout=ckpt.layout, experts=MXFP4, rule=rule, **options)
