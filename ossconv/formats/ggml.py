"""gpt-oss in llama.cpp's GGUF: tensor names, shapes, ggml types, and the block_mxfp4 repacking. Pure.

These are the facts of llama.cpp's own converter (``convert_hf_to_gguf.py``, ``GptOssModel``, in the
llama-cpp-python 0.3.36 sdist), checked byte for byte against it in the tests:

- gate and up, interleaved by row in the checkpoints (even rows gate), become two tensors
  ``ffn_gate_exps``/``ffn_up_exps`` (rows ``0::2`` and ``1::2``; the biases likewise);
- experts are stored ``[E, out, in]`` (numpy order; GGUF lists dims reversed), like OpenAI's layout;
- MXFP4 experts become ggml ``block_mxfp4`` rows: per block of 32, the E8M0 scale byte, then 16 bytes holding
  element j in the low nibble and element j + 16 in the high one (the checkpoints hold consecutive pairs,
  element 2i low and 2i + 1 high). The 4-bit codes and scale bytes themselves are unchanged;
- F32 for every 1-D tensor, norms, the router (weight and bias) and every bias; 2-D weights keep the source's
  float type (BF16 for the released checkpoints).
"""

from __future__ import annotations

import re

import torch
from gguf import GGMLQuantizationType, LlamaFileType

from ossconv.formats.mxfp4 import BYTES_PER_BLOCK
from ossconv.formats.precision import Precision

ARCH = "gpt-oss"
GGML_MXFP4_BLOCK_BYTES = 1 + BYTES_PER_BLOCK  # scale byte, then 16 bytes of codes
HALF_BYTES = BYTES_PER_BLOCK // 2  # the first 16 elements of a block are in its first 8 bytes

# ggml types for float tensors, and the file type llama.cpp records for each choice of weights.
FLOAT_TYPES = {
    torch.bfloat16: GGMLQuantizationType.BF16,
    torch.float16: GGMLQuantizationType.F16,
    torch.float32: GGMLQuantizationType.F32,
}
TORCH_OF_TYPE = {ggml: dtype for dtype, ggml in FLOAT_TYPES.items()}
FILE_TYPES = {
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
}


def expert_type(precision: Precision) -> GGMLQuantizationType:
    return GGMLQuantizationType.MXFP4 if precision is Precision.MXFP4 else FLOAT_TYPES[precision.torch_dtype]


def file_type(experts: Precision, dense: torch.dtype) -> LlamaFileType:
    """llama.cpp records MOSTLY_MXFP4_MOE for MXFP4 experts, else the type of the 2-D weights."""
    return LlamaFileType.MOSTLY_MXFP4_MOE if experts is Precision.MXFP4 else FILE_TYPES[FLOAT_TYPES[dense]]


def keeps_f32(name: str, dims: int) -> bool:
    """llama.cpp's rule: 1-D tensors, norms, the router and every non-``.weight`` tensor stay F32."""
    return dims <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight")


# ---------------------------------------------------------------------------------------------- names

_GLOBAL = {
    "embedding.weight": "token_embd.weight",
    "unembedding.weight": "output.weight",
    "norm.scale": "output_norm.weight",
}
# canonical suffix within block N -> GGUF suffix within blk.N
_BLOCK = {
    "attn.norm.scale": "attn_norm.weight",
    "attn.sinks": "attn_sinks.weight",
    "attn.out.weight": "attn_output.weight",
    "attn.out.bias": "attn_output.bias",
    "mlp.norm.scale": "post_attention_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.bias": "ffn_gate_inp.bias",
    "mlp.mlp2_bias": "ffn_down_exps.bias",
    "mlp.mlp2_weight": "ffn_down_exps.weight",
}
_QKV = ("attn_q", "attn_k", "attn_v")
_BLOCK_NAME = re.compile(r"block\.(\d+)\.(.+)")

# How a GGUF tensor is cut from its canonical tensor.
WHOLE = "whole"
GATE = "gate"  # rows 0::2 of a gate/up weight (for the bias: entries 0::2 of the last axis)
UP = "up"  # rows 1::2


def gguf_parts(canonical: str, q_dim: int, kv_dim: int) -> list[tuple[str, str, tuple[int, int] | None]]:
    """The GGUF tensors one canonical tensor becomes: ``(gguf name, cut, row range or None)``; qkv is a row
    split q | k | v, mlp1 weight and bias a gate/up de-interleave."""
    if canonical in _GLOBAL:
        return [(_GLOBAL[canonical], WHOLE, None)]
    match = _BLOCK_NAME.fullmatch(canonical)
    if not match:
        raise KeyError(canonical)
    n, suffix = match.groups()
    blk = f"blk.{n}."
    if suffix in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        bounds = (0, q_dim, q_dim + kv_dim, q_dim + 2 * kv_dim)
        return [(f"{blk}{part}.{kind}", WHOLE, (bounds[i], bounds[i + 1])) for i, part in enumerate(_QKV)]
    if suffix in ("mlp.mlp1_weight", "mlp.mlp1_bias"):
        kind = suffix.removeprefix("mlp.mlp1_")
        return [(f"{blk}ffn_gate_exps.{kind}", GATE, None), (f"{blk}ffn_up_exps.{kind}", UP, None)]
    return [(blk + _BLOCK[suffix], WHOLE, None)]


def cut(tensor: torch.Tensor, how: str, rows: tuple[int, int] | None, axis: int = 0) -> torch.Tensor:
    """Apply a :func:`gguf_parts` cut along ``axis`` (the output-feature axis)."""
    if rows is not None:
        return tensor.narrow(axis, rows[0], rows[1] - rows[0])
    if how == WHOLE:
        return tensor
    index = [slice(None)] * tensor.dim()
    index[axis] = slice(0 if how == GATE else 1, None, 2)
    return tensor[tuple(index)]


# ---------------------------------------------------------------------------------------------- block_mxfp4


def to_block_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Checkpoint MXFP4 ``blocks [..., G, 16]`` + ``scales [..., G]`` -> ggml rows ``[..., G * 17]``.

    Checkpoint byte i holds elements 2i (low) and 2i + 1 (high); ggml byte j holds elements j (low) and
    j + 16 (high). So ggml byte 2i = low(b[i]) | low(b[8 + i]) << 4 and byte 2i + 1 = high(b[i]) |
    high(b[8 + i]) << 4: nibble moves on whole bytes, no element-wise unpacking.

    Example (one block: element 0 = code 1, element 16 = code 2):
        >>> b = torch.zeros(1, 16, dtype=torch.uint8); b[0, 0] = 0x01; b[0, 8] = 0x02
        >>> to_block_mxfp4(b, torch.tensor([127], dtype=torch.uint8)).tolist()
        [127, 33, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    """
    first, second = blocks[..., :HALF_BYTES], blocks[..., HALF_BYTES:]
    out = torch.empty((*blocks.shape[:-1], GGML_MXFP4_BLOCK_BYTES), dtype=torch.uint8)
    out[..., 0] = scales
    out[..., 1::2] = (first & 0x0F) | (second << 4)
    out[..., 2::2] = (first >> 4) | (second & 0xF0)
    return out.flatten(-2)


def from_block_mxfp4(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`to_block_mxfp4`: ggml rows ``[..., G * 17]`` -> ``(blocks, scales)``."""
    grouped = rows.unflatten(-1, (-1, GGML_MXFP4_BLOCK_BYTES))
    even, odd = grouped[..., 1::2], grouped[..., 2::2]  # ggml bytes 2i and 2i + 1
    blocks = torch.empty((*grouped.shape[:-1], BYTES_PER_BLOCK), dtype=torch.uint8)
    blocks[..., :HALF_BYTES] = (even & 0x0F) | (odd << 4)
    blocks[..., HALF_BYTES:] = (even >> 4) | (odd & 0xF0)
    return blocks, grouped[..., 0].contiguous()
