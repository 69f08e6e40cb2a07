"""The precisions an expert weight can be stored in, and every spelling of each.

One table for what is written in five places otherwise: command-line names (``bf16``), safetensors header
dtypes (``BF16``), transformers' config spelling (``bfloat16``) and the torch dtype. MXFP4 has no torch dtype
of its own: its blocks and scales are stored as ``U8``.
"""

from __future__ import annotations

import enum

import torch


class Precision(enum.Enum):
    """Expert-weight precision: MXFP4 (blocks + scales) or one of three float dtypes."""

    MXFP4 = "mxfp4"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def is_float(self) -> bool:
        return self is not Precision.MXFP4

    @property
    def torch_dtype(self) -> torch.dtype:
        """The float dtype (MXFP4 has none: ask ``is_float`` first)."""
        if self is Precision.MXFP4:
            raise ValueError("MXFP4 is stored as uint8 blocks and scales, not one torch dtype")
        return _TORCH[self]

    @property
    def config_name(self) -> str:
        """transformers' ``torch_dtype`` spelling."""
        return _CONFIG_NAMES[self]

    @classmethod
    def parse(cls, text: str | Precision) -> Precision:
        """``mxfp4``/``bf16``/``fp16``/``fp32`` (also ``bfloat16``, ``float16``, ``f32``...)."""
        if isinstance(text, Precision):
            return text
        found = _ALIASES.get(str(text).lower())
        if found is None:
            raise ValueError(f"unknown precision {text!r}; choose mxfp4, bf16, fp16 or fp32")
        return found

    @classmethod
    def of_dtype(cls, dtype: torch.dtype) -> Precision:
        for precision, torch_dtype in _TORCH.items():
            if torch_dtype == dtype:
                return precision
        raise ValueError(f"{dtype} is not an expert precision")

    @classmethod
    def floats(cls) -> tuple[Precision, ...]:
        return (cls.BF16, cls.FP16, cls.FP32)


_TORCH = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16, Precision.FP32: torch.float32}
_CONFIG_NAMES = {Precision.BF16: "bfloat16", Precision.FP16: "float16", Precision.FP32: "float32"}
_ALIASES = {p.value: p for p in Precision} | {
    "bfloat16": Precision.BF16,
    "float16": Precision.FP16,
    "f16": Precision.FP16,
    "float32": Precision.FP32,
    "f32": Precision.FP32,
}

# Every dtype a safetensors header may name, both ways (checkpoint headers hold more than expert weights).
SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = tuple(_TORCH.values())  # the float precisions as torch dtypes
