"""The two gpt-oss checkpoint layouts as data: tensor names, shapes, dtypes, and the mapping between them.

The canonical naming is OpenAI's original one (``block.{n}.attn.qkv.weight``...), with float expert weights
``[E, out, in]``. The Hugging Face layout splits qkv into q/k/v rows, renames everything, and stores float
expert weights transposed (``[E, in, out]``, transformers computes ``x @ W[e]``); MXFP4 blocks and scales
are the same bytes in both. Gate and up stay interleaved by row (even rows gate, odd rows up) everywhere.
Facts and sources: GPT_OSS_FACTS.md section 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ossconv.formats.config import ModelConfig
from ossconv.formats.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK

OPENAI = "openai"
HF = "hf"
LAYOUTS = (OPENAI, HF)
MXFP4 = "mxfp4"

# Float precisions by their command-line names; safetensors dtype strings for headers and dtypes.json.
FLOAT_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
PRECISION_NAMES = {v: k for k, v in FLOAT_PRECISIONS.items()}


def precision_name(expert_format: str | torch.dtype) -> str:
    """``mxfp4`` or ``bf16``/``fp16``/``fp32``."""
    return expert_format if isinstance(expert_format, str) else PRECISION_NAMES[expert_format]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertWeight:
    """One fused expert weight of one layer: its MXFP4 pair, its float name and the float orientation."""

    layer: int
    proj: str  # "mlp1" (gate_up, interleaved rows) or "mlp2" (down)
    blocks: str
    scales: str
    float_name: str
    num_experts: int
    out_features: int
    in_features: int
    transposed: bool  # float tensor stored [E, in, out] (HF) instead of [E, out, in]

    @property
    def groups(self) -> int:
        return self.in_features // BLOCK_SIZE

    def packed_specs(self) -> tuple[TensorSpec, TensorSpec]:
        rows = (self.num_experts, self.out_features, self.groups)
        return (
            TensorSpec(self.blocks, (*rows, BYTES_PER_BLOCK), torch.uint8),
            TensorSpec(self.scales, rows, torch.uint8),
        )

    def float_spec(self, dtype: torch.dtype) -> TensorSpec:
        matrix = (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)
        return TensorSpec(self.float_name, (self.num_experts, *matrix), dtype)


def expert_weights(layout: str, cfg: ModelConfig) -> list[ExpertWeight]:
    """Every fused expert weight of the model, in layer order."""
    hidden, inter, experts = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    found = []
    for n in range(cfg.num_hidden_layers):
        for proj, out_f, in_f, hf_name in (
            ("mlp1", 2 * inter, hidden, "gate_up_proj"),
            ("mlp2", hidden, inter, "down_proj"),
        ):
            if layout == OPENAI:
                base = f"block.{n}.mlp.{proj}_weight"
                names = (f"{base}.blocks", f"{base}.scales", base)
            else:
                base = f"model.layers.{n}.mlp.experts.{hf_name}"
                names = (f"{base}_blocks", f"{base}_scales", base)
            found.append(ExpertWeight(n, proj, *names, experts, out_f, in_f, transposed=layout == HF))
    return found


def canonical_specs(
    cfg: ModelConfig, experts: str | torch.dtype, dtype: torch.dtype = torch.bfloat16
) -> list[TensorSpec]:
    """Every tensor of the model in OpenAI naming and file order; ``experts`` is ``"mxfp4"`` or a float dtype,
    ``dtype`` the precision of everything else (bf16 in the released checkpoints)."""
    h, e = cfg.hidden_size, cfg.num_experts
    qkv = cfg.q_dim + 2 * cfg.kv_dim
    weights = {w.float_name: w for w in expert_weights(OPENAI, cfg)}
    specs = [TensorSpec("embedding.weight", (cfg.vocab_size, h), dtype)]
    for n in range(cfg.num_hidden_layers):
        p = f"block.{n}."
        specs += [
            TensorSpec(p + "attn.norm.scale", (h,), dtype),
            TensorSpec(p + "attn.qkv.weight", (qkv, h), dtype),
            TensorSpec(p + "attn.qkv.bias", (qkv,), dtype),
            TensorSpec(p + "attn.sinks", (cfg.num_attention_heads,), dtype),
            TensorSpec(p + "attn.out.weight", (h, cfg.q_dim), dtype),
            TensorSpec(p + "attn.out.bias", (h,), dtype),
            TensorSpec(p + "mlp.norm.scale", (h,), dtype),
            TensorSpec(p + "mlp.gate.weight", (e, h), dtype),
            TensorSpec(p + "mlp.gate.bias", (e,), dtype),
        ]
        for proj in ("mlp1", "mlp2"):
            weight = weights[f"{p}mlp.{proj}_weight"]
            specs += list(weight.packed_specs()) if experts == MXFP4 else [weight.float_spec(experts)]
            specs.append(TensorSpec(f"{p}mlp.{proj}_bias", (e, weight.out_features), dtype))
    specs += [TensorSpec("norm.scale", (h,), dtype), TensorSpec("unembedding.weight", (cfg.vocab_size, h), dtype)]
    return specs


# ---------------------------------------------------------------------------------------------- naming

_HF_LAYER = "model.layers.{n}."
# canonical suffix within a block -> HF suffix within a layer (qkv and float experts are handled apart)
_BLOCK_TO_HF = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_weight": "mlp.experts.gate_up_proj",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_weight": "mlp.experts.down_proj",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
_GLOBAL_TO_HF = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "unembedding.weight": "lm_head.weight",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_BLOCK_NAME = re.compile(r"block\.(\d+)\.(.+)")


def hf_parts(name: str, cfg: ModelConfig) -> list[tuple[str, int, int | None]]:
    """The HF tensors a canonical tensor is made of, as ``(hf name, first row, stop row)`` along its first
    axis (stop None: all rows). Only qkv has more than one part: a plain row split q | k | v."""
    if name in _GLOBAL_TO_HF:
        return [(_GLOBAL_TO_HF[name], 0, None)]
    match = _BLOCK_NAME.fullmatch(name)
    if not match:
        raise KeyError(name)
    n, suffix = match.groups()
    prefix = _HF_LAYER.format(n=n)
    if suffix in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        bounds = (0, cfg.q_dim, cfg.q_dim + cfg.kv_dim, cfg.q_dim + 2 * cfg.kv_dim)
        return [(f"{prefix}self_attn.{proj}.{kind}", bounds[i], bounds[i + 1]) for i, proj in enumerate(_QKV)]
    return [(prefix + _BLOCK_TO_HF[suffix], 0, None)]


def layout_parts(layout: str, name: str, cfg: ModelConfig) -> list[tuple[str, int, int | None]]:
    """:func:`hf_parts` for either layout (the OpenAI layout stores every canonical tensor whole)."""
    return [(name, 0, None)] if layout == OPENAI else hf_parts(name, cfg)


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One canonical tensor -> its HF tensor(s): qkv splits into q/k/v rows, float experts transpose."""
    if name.endswith(("mlp.mlp1_weight", "mlp.mlp2_weight")):
        tensor = tensor.transpose(-1, -2)
    return [(part, tensor[start:stop]) for part, start, stop in hf_parts(name, cfg)]


def hf_specs(cfg: ModelConfig, experts: str | torch.dtype, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec]:
    """Every tensor of the HF layout, in file order (the canonical order mapped through :func:`to_hf`)."""
    specs = []
    for spec in canonical_specs(cfg, experts, dtype):
        meta = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        specs += [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in to_hf(spec.name, meta, cfg)]
    return specs


def layout_specs(
    layout: str, cfg: ModelConfig, experts: str | torch.dtype, dtype: torch.dtype = torch.bfloat16
) -> list[TensorSpec]:
    return canonical_specs(cfg, experts, dtype) if layout == OPENAI else hf_specs(cfg, experts, dtype)


# Fused expert tensors (first axis = expert) and their split form, one tensor per expert j:
#   OpenAI  block.{n}.mlp.mlp1_weight.blocks          -> block.{n}.mlp.experts.{j}.mlp1_weight.blocks
#   HF      model.layers.{n}.mlp.experts.down_proj_bias -> model.layers.{n}.mlp.experts.{j}.down_proj_bias
_FUSED_EXPERT = re.compile(
    r"(block\.\d+\.mlp\.)(mlp[12]_(?:weight(?:\.blocks|\.scales)?|bias))"
    r"|(model\.layers\.\d+\.mlp\.experts\.)((?:gate_up|down)_proj(?:_blocks|_scales|_bias)?)"
)
_SPLIT_EXPERT = re.compile(  # expert numbers without leading zeros: one name per expert
    r"(block\.\d+\.mlp\.)experts\.(0|[1-9]\d*)\.(mlp[12]_(?:weight(?:\.blocks|\.scales)?|bias))"
    r"|(model\.layers\.\d+\.mlp\.experts\.)(0|[1-9]\d*)\.((?:gate_up|down)_proj(?:_blocks|_scales|_bias)?)"
)


def is_expert_tensor(name: str) -> bool:
    """True for fused per-expert tensors (weights in any precision and biases), both layouts."""
    return _FUSED_EXPERT.fullmatch(name) is not None


def split_name(fused: str, expert: int) -> str:
    """The name of expert ``expert``'s slice of a fused expert tensor."""
    match = _FUSED_EXPERT.fullmatch(fused)
    if not match:
        raise KeyError(fused)
    if match.group(1):
        return f"{match.group(1)}experts.{expert}.{match.group(2)}"
    return f"{match.group(3)}{expert}.{match.group(4)}"


def parse_split_name(name: str) -> tuple[str, int] | None:
    """(fused name, expert) for a split expert tensor name, else None."""
    match = _SPLIT_EXPERT.fullmatch(name)
    if not match:
        return None
    if match.group(1):
        return match.group(1) + match.group(3), int(match.group(2))
    return match.group(4) + match.group(6), int(match.group(5))


def detect_layout(names: list[str] | set[str]) -> str | None:
    """``openai``, ``hf`` or None, from tensor names alone."""
    if any(n.startswith("block.") for n in names) or "embedding.weight" in names:
        return OPENAI
    if any(n.startswith("model.layers.") for n in names) or "model.embed_tokens.weight" in names:
        return HF
    return None


def layer_of(name: str) -> int | None:
    """The layer index a tensor belongs to (both layouts), or None for globals."""
    match = re.match(r"(?:block|model\.layers)\.(\d+)\.", name)
    return int(match.group(1)) if match else None


_GLOBAL_ORDER = {
    "embedding.weight": (0, 0),
    "model.embed_tokens.weight": (0, 0),
    "norm.scale": (2, 0),
    "model.norm.weight": (2, 0),
    "unembedding.weight": (2, 1),
    "lm_head.weight": (2, 1),
}


def order_key(name: str) -> tuple[int, int, str]:
    """Sort key giving file order: embedding, layers in order, final norm, unembedding, anything else."""
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, name)
    group, rank = _GLOBAL_ORDER.get(name, (3, 0))
    return (group, rank, name)
