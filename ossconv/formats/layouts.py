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
from ossconv.formats.precision import Precision

OPENAI = "openai"
HF = "hf"
LAYOUTS = (OPENAI, HF)
GGUF = "gguf"  # llama.cpp's single-file format: an output of convert, and read as a model (ossconv.gguf_file)
# The two fused expert weights of a layer: OpenAI name, HF name (gate_up has interleaved gate/up rows).
EXPERT_PROJECTIONS = (("mlp1", "gate_up_proj"), ("mlp2", "down_proj"))


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

    def float_spec(self, precision: Precision) -> TensorSpec:
        matrix = (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)
        return TensorSpec(self.float_name, (self.num_experts, *matrix), precision.torch_dtype)

    def specs(self, precision: Precision) -> list[TensorSpec]:
        """The stored tensor(s) of this weight: MXFP4 blocks and scales, or one float tensor."""
        return list(self.packed_specs()) if precision is Precision.MXFP4 else [self.float_spec(precision)]

    def stored_names(self) -> tuple[str, str, str]:
        return (self.blocks, self.scales, self.float_name)

    def to_stored(self, matrix: torch.Tensor) -> torch.Tensor:
        """One expert's float ``[out, in]`` matrix as this layout stores it (a view: HF's is ``[in, out]``)."""
        return matrix.T if self.transposed else matrix

    def from_stored(self, stored: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_stored`: a stored float expert slice as ``[out, in]`` (a view)."""
        return stored.T if self.transposed else stored


def expert_weights(layout: str, cfg: ModelConfig) -> list[ExpertWeight]:
    """Every fused expert weight of the model, in layer order."""
    hidden, inter, experts = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    found = []
    for n in range(cfg.num_hidden_layers):
        shapes = {"mlp1": (2 * inter, hidden), "mlp2": (hidden, inter)}
        for proj, hf_name in EXPERT_PROJECTIONS:
            out_f, in_f = shapes[proj]
            if layout == OPENAI:
                base = f"block.{n}.mlp.{proj}_weight"
                names = (f"{base}.blocks", f"{base}.scales", base)
            else:
                base = f"model.layers.{n}.mlp.experts.{hf_name}"
                names = (f"{base}_blocks", f"{base}_scales", base)
            found.append(ExpertWeight(n, proj, *names, experts, out_f, in_f, transposed=layout == HF))  # the one place
    return found


def canonical_tensors(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec | ExpertWeight]:
    """The model's logical tensors in OpenAI naming and file order: a TensorSpec for every dense tensor
    (``dtype``: bf16 in the released checkpoints) and an ExpertWeight where a fused expert weight goes,
    whatever its precision."""
    h, e = cfg.hidden_size, cfg.num_experts
    qkv = cfg.q_dim + 2 * cfg.kv_dim
    weights = {(w.layer, w.proj): w for w in expert_weights(OPENAI, cfg)}
    found: list[TensorSpec | ExpertWeight] = [TensorSpec("embedding.weight", (cfg.vocab_size, h), dtype)]
    for n in range(cfg.num_hidden_layers):
        p = f"block.{n}."
        found += [
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
        for proj, _ in EXPERT_PROJECTIONS:
            weight = weights[(n, proj)]
            found += [weight, TensorSpec(f"{p}mlp.{proj}_bias", (e, weight.out_features), dtype)]
    found += [TensorSpec("norm.scale", (h,), dtype), TensorSpec("unembedding.weight", (cfg.vocab_size, h), dtype)]
    return found


def layout_specs(
    layout: str, cfg: ModelConfig, precision: Precision, dtype: torch.dtype = torch.bfloat16
) -> list[TensorSpec]:
    """Every stored tensor of ``layout`` in file order, expert weights in ``precision``."""
    layout_weights = {(w.layer, w.proj): w for w in expert_weights(layout, cfg)}
    specs = []
    for item in canonical_tensors(cfg, dtype):
        if isinstance(item, ExpertWeight):
            specs += layout_weights[(item.layer, item.proj)].specs(precision)
            continue
        for part, start, stop in layout_parts(layout, item.name, cfg):
            rows = (stop if stop is not None else item.shape[0]) - start
            specs.append(TensorSpec(part, (rows, *item.shape[1:]), item.dtype))
    return specs


# ---------------------------------------------------------------------------------------------- naming

_HF_LAYER = "model.layers.{n}."
# canonical suffix within a block -> HF suffix within a layer (qkv and expert weights are handled apart)
_BLOCK_TO_HF = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
_GLOBAL_TO_HF = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "unembedding.weight": "lm_head.weight",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_BLOCK_NAME = re.compile(r"block\.(\d+)\.(.+)")


def layout_parts(layout: str, name: str, cfg: ModelConfig) -> list[tuple[str, int, int | None]]:
    """The stored tensors a canonical dense tensor is made of in ``layout``, as ``(name, first row, stop
    row)`` along its first axis (stop None: all rows). The OpenAI layout stores each whole; in the HF one
    only qkv has more than one part: a plain row split q | k | v."""
    if layout == OPENAI:
        return [(name, 0, None)]
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


def split_dense(layout: str, name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One canonical dense tensor -> the tensor(s) ``layout`` stores (HF splits qkv into q/k/v rows)."""
    return [(part, tensor[start:stop]) for part, start, stop in layout_parts(layout, name, cfg)]


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
