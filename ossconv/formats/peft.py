"""PEFT's LoRA adapter format for gpt-oss, as facts and pure functions (no I/O).

What PEFT (0.17 - 0.21, with transformers 5.x) writes in ``adapter_model.safetensors``, every key prefixed
``base_model.model.`` and the adapter name stripped:

- a linear module (``target_modules``: q/k/v/o_proj, lm_head; or a 2-D ``target_parameters`` entry such as
  ``mlp.router.weight``): ``{module}.lora_A.weight`` [r, in] and ``{module}.lora_B.weight`` [out, r];
  ``W[out, in] += s * B @ A``;
- an embedding: ``{module}.lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [hidden, r];
  ``W[vocab, hidden] += s * (B @ A).T``;
- the experts (``target_parameters`` ``mlp.experts.gate_up_proj`` / ``down_proj``, PEFT's ParamWrapper):
  ``...mlp.experts[.base_layer].lora_A.weight`` [r * E, in] with row ``e * r + k`` (expert-major) and
  ``lora_B.weight`` [out, r * E] with column ``k * E + e`` (rank-major). "in"/"out" are transformers' axes
  (its experts are ``[E, in, out]``), so expert e's ``[out, in]`` delta is ``s * B3[:, :, e] @ A3[e]``.
  With both expert parameters targeted, the first wrapped (gate_up) gains ``.base_layer``; tell them
  apart by shape, as PEFT's own key order is an accident of wrapping;
- ``modules_to_save``: the whole tensor under its plain parameter name, replacing the base tensor.

``s = lora_alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``); ``r`` and alpha from ``rank_pattern`` /
``alpha_pattern``: the first key, in file order, that matches a dotted suffix of the module (or parameter)
path. PEFT 0.19.0 stored expert LoRA with in and out swapped (fixed in 0.19.1, huggingface/peft#3165).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt")
SWAPPED_EXPERTS_VERSIONS = ("0.19.0",)

LINEAR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<half>[AB])\.weight")
EMBEDDING_KEY = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<half>[AB])")
EXPERTS_MODULE = re.compile(r"model\.layers\.(?P<layer>\d+)\.mlp\.experts(?:\.base_layer)*")


def pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern (a regex) matching a dotted suffix of ``path``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def scaling(config: dict[str, Any], path: str) -> tuple[int, float]:
    """(r, s) for the module or parameter at ``path`` (without the ``base_model.model.`` prefix)."""
    r = pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
    return int(r), float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def embedding_delta_rows(a: torch.Tensor, b: torch.Tensor, scale: float, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of an embedding's ``s * (B @ A).T`` without forming the whole [vocab, hidden]."""
    return scale * (a[:, start:stop].float().T @ b.float().T)


def expert_factors(a: torch.Tensor, b: torch.Tensor, rank: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ParamWrapper's A [r * E, in] and B [out, r * E] regrouped per expert in fp32: ``A[e]`` ``[r, in]`` and
    ``B[e]`` ``[out, r]``, so that expert e's ``[out, in]`` delta is ``s * B[e] @ A[e]``."""
    grouped_a = a.float().view(experts, rank, a.shape[-1]).contiguous()  # row e * r + k
    grouped_b = b.float().view(b.shape[0], rank, experts).permute(2, 0, 1).contiguous()  # column k * E + e
    return grouped_a, grouped_b


def base_version(version: object) -> str | None:
    """``0.19.1.dev0@abc123`` -> ``0.19.1.dev0``; None when the adapter does not say (PEFT < 0.18)."""
    return version.partition("@")[0] if isinstance(version, str) else None
