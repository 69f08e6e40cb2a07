"""One model configuration, read from and written to either layout's config.json.

OpenAI's ``original/config.json`` and transformers' ``config.json`` name the same hyper-parameters
differently (GPT_OSS_FACTS.md section 6); ``ModelConfig`` holds them once so a conversion never loses one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

HF_MODULES_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]
SWIGLU_ALPHA = 1.702  # the sigmoid's slope in gpt-oss's SwiGLU (transformers' swiglu_alpha)
RMS_NORM_EPS = 1e-5
KNOWN_MODELS = {
    "gpt-oss-20b": {"num_hidden_layers": 24, "num_experts": 32},
    "gpt-oss-120b": {"num_hidden_layers": 36, "num_experts": 128},
}


_POSITIVE_INTS = (
    "num_hidden_layers",
    "num_experts",
    "experts_per_token",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "initial_context_length",
)
_POSITIVE_NUMBERS = ("swiglu_limit", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta")
# Far above any real model (gpt-oss-120b: 36 layers, 128 experts, vocab 201088, hidden 2880), far below what
# would make a loop over layers or experts, or an allocation, run away on a hostile config.
LIMITS = {
    "num_hidden_layers": 4096,
    "num_experts": 65536,
    "experts_per_token": 65536,
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 20,
    "head_dim": 1 << 16,
    "num_attention_heads": 1 << 16,
    "num_key_value_heads": 1 << 16,
    "initial_context_length": 1 << 30,
    "sliding_window": 1 << 30,
    "swiglu_limit": 1e6,
    "rope_theta": 1e15,
    "rope_scaling_factor": 1e6,
    "rope_ntk_alpha": 1e6,
    "rope_ntk_beta": 1e6,
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        """gpt-oss alternates: even layers attend within the sliding window, odd layers to every token."""
        return layer % 2 == 0 and self.sliding_window > 0

    def layer_types(self) -> list[str]:
        """transformers' ``layer_types``, the same fact as :meth:`is_sliding`."""
        return ["sliding_attention" if layer % 2 == 0 else "full_attention" for layer in range(self.num_hidden_layers)]

    def problems(self) -> list[str]:
        """Constraints the two layouts, the MXFP4 encoding and the forward pass need; empty when usable."""
        found = []
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                found.append(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.sliding_window) or self.sliding_window < 0:
            found.append(f"sliding_window must be a non-negative integer, got {self.sliding_window!r}")
        for name in _POSITIVE_NUMBERS:
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or value != value:
                found.append(f"{name} must be a positive number, got {value!r}")
        if found:
            return found
        for name, limit in LIMITS.items():
            if getattr(self, name) > limit:
                found.append(f"{name} is {getattr(self, name)!r}, beyond any real model (at most {limit:g})")
        if found:
            return found
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                found.append(f"{name} ({getattr(self, name)}) is not a multiple of the MXFP4 block size (32)")
        if self.num_attention_heads % self.num_key_value_heads:
            found.append(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.experts_per_token > self.num_experts:
            found.append(f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if self.head_dim % 2:
            found.append(f"head_dim ({self.head_dim}) must be even (rotary embedding rotates halves)")
        if self.rope_theta <= 1:
            found.append(f"rope_theta ({self.rope_theta}) must be greater than 1")
        if self.rope_scaling_factor > 1 and self.rope_ntk_beta <= self.rope_ntk_alpha:
            found.append(
                f"rope_ntk_beta ({self.rope_ntk_beta}) must exceed rope_ntk_alpha ({self.rope_ntk_alpha}) for YaRN"
            )
        return found

    def known_model(self) -> str:
        """``gpt-oss-20b``, ``gpt-oss-120b`` or ``custom``, judged on every shape the released models fix."""
        for name, fixed in KNOWN_MODELS.items():
            if dataclasses.replace(ModelConfig(), **fixed) == self:
                return name
        return "custom"

    # ------------------------------------------------------------------ OpenAI original/config.json

    @classmethod
    def from_openai(cls, raw: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - raw.keys() - {"rope_ntk_alpha", "rope_ntk_beta", "swiglu_limit"})
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        return cls(**{k: raw[k] for k in fields if k in raw})

    def to_openai(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ transformers config.json

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        try:
            return cls._from_hf(raw)
        except (TypeError, ZeroDivisionError, AttributeError, KeyError) as error:
            raise ValueError(
                f"config.json has a value of the wrong type or range ({type(error).__name__}: {error})"
            ) from None

    @classmethod
    def _from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_scaling must be an object, got {rope!r}")
        required = (
            "num_hidden_layers",
            "num_local_experts",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
        )
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        defaults = cls()
        return cls(
            num_hidden_layers=raw["num_hidden_layers"],
            num_experts=raw["num_local_experts"],
            experts_per_token=raw.get("num_experts_per_tok", raw.get("experts_per_token", defaults.experts_per_token)),
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            swiglu_limit=raw.get("swiglu_limit", defaults.swiglu_limit),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"],
            sliding_window=raw.get("sliding_window", defaults.sliding_window),
            initial_context_length=rope.get(
                "original_max_position_embeddings", raw.get("initial_context_length", defaults.initial_context_length)
            ),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", defaults.rope_theta)),
            rope_scaling_factor=rope.get("factor", defaults.rope_scaling_factor),
            rope_ntk_alpha=rope.get("beta_slow", defaults.rope_ntk_alpha),
            rope_ntk_beta=rope.get("beta_fast", defaults.rope_ntk_beta),
        )

    def to_hf(self, *, mxfp4: bool, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """transformers' config.json, in the form the published gpt-oss configs use (``rope_scaling`` with
        ``truncate: false``: without it YaRN silently rounds its correction bounds)."""
        config: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "experts_per_token": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": self.layer_types(),
            "max_position_embeddings": int(self.initial_context_length * self.rope_scaling_factor),
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "rms_norm_eps": RMS_NORM_EPS,
            "rope_scaling": {
                "beta_fast": float(self.rope_ntk_beta),
                "beta_slow": float(self.rope_ntk_alpha),
                "factor": float(self.rope_scaling_factor),
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": float(self.rope_theta),
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": float(self.swiglu_limit),
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        # The released tokenizer's ids (HF convert script); a synthetic vocabulary too small for them has none.
        for key, token in (("bos_token_id", 199998), ("eos_token_id", 200002), ("pad_token_id", 199999)):
            config[key] = token if token < self.vocab_size else None
        if mxfp4:
            config["quantization_config"] = {
                "modules_to_not_convert": list(HF_MODULES_NOT_CONVERTED),
                "quant_method": "mxfp4",
            }
        return config
