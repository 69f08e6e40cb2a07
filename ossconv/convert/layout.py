"""convert: OpenAI's original layout <-> the Hugging Face transformers layout, at any expert precision.

The mapping is data (:mod:`ossconv.formats.layouts`); the plan and its execution are
:mod:`ossconv.convert.plan` and :mod:`ossconv.convert.execute`. Converting to the same layout at the same
precision copies every byte unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ossconv.adapters import load_adapters
from ossconv.checkpoint import open_checkpoint
from ossconv.convert.execute import run
from ossconv.convert.plan import plan
from ossconv.convert.target import ConversionResult, Target, WriteOptions, precision_of
from ossconv.errors import OssconvError
from ossconv.formats import layouts
from ossconv.formats.precision import Precision
from ossconv.progress import Progress
from ossconv.units import DEFAULT_MAX_SHARD_SIZE


def convert(
    src: str | Path,
    out: str | Path,
    *,
    to: str,
    dtype: str | Precision | None = None,
    rule: str = "up",
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Progress | None = None,
    lora: Sequence[str | Path] = (),
) -> ConversionResult:
    """Write ``src`` in layout ``to`` (``openai``, ``hf``, or ``gguf``: one file for llama.cpp). ``dtype``
    (``mxfp4``, ``bf16``, ``fp16``, ``fp32``; default: as the source, MXFP4 for GGUF) sets the expert weights'
    precision, every other tensor keeps its dtype; ``rule`` is the MXFP4 scale rule when float experts are
    encoded. ``lora``: PEFT LoRA adapter folders merged, in order, on the way (``W + s * B @ A`` in fp32,
    then written in the output precision); every tensor no adapter touches is copied as bytes.

    Example:
        >>> convert("gpt-oss-20b/original", "gpt-oss-20b-hf", to="hf")  # doctest: +SKIP
    """
    precision = None if dtype is None else precision_of(dtype)
    if to == layouts.GGUF:
        from ossconv.convert.to_gguf import convert_to_gguf

        if lora:
            raise OssconvError("merge adapters into a checkpoint first (--to openai or hf), then convert that to gguf")
        experts = precision or Precision.MXFP4
        return convert_to_gguf(src, out, dtype=experts, rule=rule, overwrite=overwrite, progress=progress)
    Target(to, precision or Precision.MXFP4, rule)  # refuse bad options before reading anything
    ckpt = open_checkpoint(src)
    target = Target(to, precision or ckpt.precision, rule, adapters=load_adapters(lora, ckpt))
    options = WriteOptions(overwrite, max_shard_size, progress)
    return run(plan(ckpt, target), out, options, command="convert")
