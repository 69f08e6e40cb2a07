"""convert: OpenAI's original layout <-> the Hugging Face transformers layout, at any expert precision.

The mapping is data (:mod:`ossconv.formats.layouts`); the streaming is :mod:`ossconv.convert.stream`.
Converting to the same layout at the same precision copies every byte unchanged.
"""

from __future__ import annotations

from pathlib import Path

from ossconv.checkpoint import open_checkpoint
from ossconv.convert.stream import ConversionResult, rewrite
from ossconv.errors import OssconvError
from ossconv.formats import mxfp4
from ossconv.formats.layouts import FLOAT_PRECISIONS, LAYOUTS, MXFP4


def convert(
    src: str | Path, out: str | Path, to: str, dtype: str | None = None, rule: str = "up", **options: object
) -> ConversionResult:
    """Write ``src`` in layout ``to`` (``openai`` or ``hf``); ``dtype`` (``mxfp4``, ``bf16``, ``fp16``,
    ``fp32``, default: as the source) sets the expert weights' precision, every other tensor keeps its dtype.
    Options: overwrite, max_shard_size, progress.

    Example:
        >>> convert("gpt-oss-20b/original", "gpt-oss-20b-hf", to="hf")  # doctest: +SKIP
    """
    if to not in LAYOUTS:
        raise OssconvError(f"unknown layout {to!r}; choose openai or hf")
    if dtype is not None and dtype != MXFP4 and dtype not in FLOAT_PRECISIONS:
        raise OssconvError(f"unknown dtype {dtype!r}; choose mxfp4, bf16, fp16 or fp32")
    if rule not in mxfp4.RULES:
        raise OssconvError(f"unknown rule {rule!r}; choose up or floor")
    ckpt = open_checkpoint(src)
    experts = ckpt.expert_format if dtype is None else MXFP4 if dtype == MXFP4 else FLOAT_PRECISIONS[dtype]
    return rewrite(ckpt, out, command="convert", layout=to, experts=experts, rule=rule, **options)
