"""Small (or real-shaped) gpt-oss checkpoints built from a seed, in either layout and expert precision.

They carry the real tensor names, dtypes, encodings and config files, so every command and both reference
implementations load them. Each tensor (each expert slice, for experts) is drawn from its own generator
seeded by the seed and its canonical name: the same seed gives the same model in every layout, and float
experts are exactly the decoded MXFP4 experts, so ``build(..., experts="bf16")`` equals ``unpack`` of
``build(..., experts="mxfp4")``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from ossconv.checkpoint import CONFIG_NAME, DTYPES_NAME
from ossconv.formats import layouts, mxfp4
from ossconv.formats.config import ModelConfig
from ossconv.formats.layouts import OPENAI, ExpertWeight
from ossconv.formats.precision import Precision
from ossconv.units import DEFAULT_MAX_SHARD_SIZE
from ossconv.writer import CheckpointWriter, dtypes_json

# Small enough for tests and the demo, shaped so that mistakes show: no square expert matrix
# (2I = 192 rows x H = 64 in gate_up, H = 64 x I = 96 in down), top-k > 1, a sliding window shorter than
# the test sequences, GQA with 2 query heads per KV head.
TINY = ModelConfig(
    num_hidden_layers=2,
    num_experts=4,
    experts_per_token=2,
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=8,
)
# Scale bytes of the synthetic experts: values up to 6 * 2^(s - 127), weights around 0.01-0.1 like real ones.
SCALE_RANGE = (118, 124)


def tiny_config(**overrides: object) -> ModelConfig:
    return dataclasses.replace(TINY, **overrides)


def _generator(seed: int, name: str, part: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}#{part}".encode()))


def _dense(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A non-expert tensor in fp32, scaled like a trained model's (unit-ish activations)."""
    g = _generator(seed, name)
    x = torch.randn(shape, generator=g)
    if name.endswith("norm.scale"):
        return 1.0 + 0.1 * x
    if name.endswith("bias"):
        return 0.05 * x
    if name.endswith("sinks") or name == "embedding.weight":
        return x
    return x / math.sqrt(shape[-1])


def _expert_packed(name: str, expert: int, rows: int, groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes and scales; every block is canonical (its largest |code| is 4.0 or 6.0, as a quantizer
    produces), so float round trips give back the exact bytes and the demo can check byte identity."""
    g = _generator(seed, name, expert + 1)
    blocks = torch.randint(0, 256, (rows, groups, mxfp4.BYTES_PER_BLOCK), generator=g, dtype=torch.uint8)
    scales = torch.randint(*SCALE_RANGE, (rows, groups), generator=g, dtype=torch.uint8)
    byte = torch.randint(0, mxfp4.BYTES_PER_BLOCK, (rows, groups, 1), generator=g)
    chosen = blocks.gather(-1, byte)
    blocks.scatter_(-1, byte, chosen | 0x06)  # low nibble magnitude 6 or 7
    return blocks, scales


def build(
    out: str | Path,
    config: ModelConfig = TINY,
    *,
    layout: str = OPENAI,
    experts: str | Precision = Precision.MXFP4,
    dtype: str | Precision = Precision.BF16,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a synthetic checkpoint to ``out``; ``experts`` is the expert weights' precision, ``dtype``
    the precision of the other tensors.

    Example:
        >>> build("/tmp/tiny-openai", layout="openai")  # doctest: +SKIP
    """
    problems = config.problems()
    if problems:
        raise ValueError(problems[0])
    precision, dense = Precision.parse(experts), Precision.parse(dtype)
    specs = layouts.layout_specs(layout, config, precision, dense.torch_dtype)
    targets = {(w.layer, w.proj): w for w in layouts.expert_weights(layout, config)}
    with CheckpointWriter(out, specs, max_shard_size=max_shard_size, overwrite=overwrite) as writer:
        for item in layouts.canonical_tensors(config, dense.torch_dtype):
            if isinstance(item, ExpertWeight):
                _write_experts(writer, item, targets[(item.layer, item.proj)], precision, seed)
                continue
            tensor = _dense(item.name, item.shape, seed).to(dense.torch_dtype)
            for name, part in layouts.split_dense(layout, item.name, tensor, config):
                writer.write(name, part)
        files = {CONFIG_NAME: _config_json(config, layout, precision, dense)}
        if layout == OPENAI:
            files[DTYPES_NAME] = dtypes_json(specs)
        return writer.finish(files)


def _write_experts(
    writer: CheckpointWriter, weight: ExpertWeight, target: ExpertWeight, precision: Precision, seed: int
) -> None:
    """Draw one expert at a time (seeded by the canonical name) and write it in the target form."""
    for expert in range(weight.num_experts):
        blocks, scales = _expert_packed(weight.blocks, expert, weight.out_features, weight.groups, seed)
        if precision is Precision.MXFP4:
            writer.write(target.blocks, blocks, expert * blocks.numel())
            writer.write(target.scales, scales, expert * scales.numel())
        else:
            matrix = target.to_stored(mxfp4.decode(blocks, scales, precision.torch_dtype)).contiguous()
            writer.write(target.float_name, matrix, expert * matrix.numel() * matrix.element_size())


def _config_json(config: ModelConfig, layout: str, precision: Precision, dense: Precision) -> dict:
    if layout == OPENAI:
        return config.to_openai()
    return config.to_hf(mxfp4=precision is Precision.MXFP4, torch_dtype=dense.config_name)


def build_lora(
    out: str | Path,
    config: ModelConfig = TINY,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 1,
    layers: list[int] | None = None,
    attention: bool = True,
    experts: bool = True,
) -> Path:
    """Write a LoRA adapter for ``config`` in the form PEFT (0.17+) saves for gpt-oss: attention q/k/v/o
    through ``target_modules``, both expert weights through ``target_parameters`` (gate_up under
    ``.base_layer``, expert-major A and rank-major B). The tests check this form against PEFT itself; the
    demo uses it so that it needs no PEFT.

    Example:
        >>> build_lora("/tmp/tiny-adapter", layers=[1])  # doctest: +SKIP
    """
    h, e, inter = config.hidden_size, config.num_experts, config.intermediate_size
    tensors: dict[str, torch.Tensor] = {}

    def pair(key: str, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> None:
        g = _generator(seed, key)
        tensors[f"{key}.lora_A.weight"] = torch.randn(a_shape, generator=g) / math.sqrt(a_shape[1])
        tensors[f"{key}.lora_B.weight"] = 0.05 * torch.randn(b_shape, generator=g)

    chosen = range(config.num_hidden_layers) if layers is None else layers
    for n in chosen:
        p = f"base_model.model.model.layers.{n}."
        if attention:
            for proj, out_f, in_f in (
                ("q_proj", config.q_dim, h),
                ("k_proj", config.kv_dim, h),
                ("v_proj", config.kv_dim, h),
                ("o_proj", h, config.q_dim),
            ):
                pair(f"{p}self_attn.{proj}", (rank, in_f), (out_f, rank))
        if experts:
            pair(f"{p}mlp.experts.base_layer", (rank * e, h), (2 * inter, rank * e))  # gate_up_proj
            pair(f"{p}mlp.experts", (rank * e, inter), (h, rank * e))  # down_proj
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    scopes = [""] if layers is None else [f"{n}." for n in chosen]
    adapter_config = {
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"] if attention else None,
        "target_parameters": [f"{s}mlp.experts.{w}" for s in scopes for w in ("gate_up_proj", "down_proj")]
        if experts
        else None,
        "layers_to_transform": None if layers is None else list(chosen),
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return folder
