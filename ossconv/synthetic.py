"""Small (or real-shaped) gpt-oss checkpoints built from a seed, in either layout and expert precision.

They carry the real tensor names, dtypes, encodings and config files, so every command and both reference
implementations load them. Each tensor (each expert slice, for experts) is drawn from its own generator
seeded by the seed and its canonical name: the same seed gives the same model in every layout, and float
experts are exactly the decoded MXFP4 experts, so ``build(..., experts="bf16")`` equals ``unpack`` of
``build(..., experts="mxfp4")``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path

import torch

from ossconv.checkpoint import CONFIG_NAME, DTYPES_NAME
from ossconv.formats import layouts, mxfp4
from ossconv.formats.config import ModelConfig
from ossconv.formats.layouts import FLOAT_PRECISIONS, MXFP4, OPENAI
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
    experts: str = MXFP4,
    dtype: str = "bf16",
    seed: int = 0,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
) -> Path:
    """Write a synthetic checkpoint to ``out``; ``experts`` is ``mxfp4`` or a float precision name,
    ``dtype`` the precision of the other tensors.

    Example:
        >>> build("/tmp/tiny-openai", layout="openai")  # doctest: +SKIP
    """
    problems = config.problems()
    if problems:
        raise ValueError(problems[0])
    expert_format = MXFP4 if experts == MXFP4 else FLOAT_PRECISIONS[experts]
    dense_dtype = FLOAT_PRECISIONS[dtype]
    specs = layouts.layout_specs(layout, config, expert_format, dense_dtype)
    canonical = layouts.canonical_specs(config, expert_format, dense_dtype)
    # canonical expert weight name -> (canonical weight, the same weight in the target layout)
    weights = {
        ours.float_name: (ours, theirs)
        for ours, theirs in zip(
            layouts.expert_weights(OPENAI, config), layouts.expert_weights(layout, config), strict=True
        )
    }
    with CheckpointWriter(out, specs, max_shard_size=max_shard_size, overwrite=overwrite) as writer:
        for spec in canonical:
            base = spec.name.removesuffix(".blocks").removesuffix(".scales")
            if base in weights:
                if not spec.name.endswith(".scales"):
                    _write_experts(writer, *weights[base], expert_format, seed)
                continue
            tensor = _dense(spec.name, spec.shape, seed).to(dense_dtype)
            for name, part in _to_layout(layout, spec.name, tensor, config):
                writer.write(name, part)
        files = {CONFIG_NAME: _config_json(config, layout, expert_format, dtype)}
        if layout == OPENAI:
            files[DTYPES_NAME] = dtypes_json(specs)
        return writer.finish(files)


def _to_layout(layout: str, name: str, tensor: torch.Tensor, config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor)] if layout == OPENAI else layouts.to_hf(name, tensor, config)


def _write_experts(
    writer: CheckpointWriter,
    weight: layouts.ExpertWeight,
    target: layouts.ExpertWeight,
    expert_format: object,
    seed: int,
) -> None:
    """Draw one expert at a time (seeded by the canonical name) and write it in the target form."""
    for expert in range(weight.num_experts):
        blocks, scales = _expert_packed(weight.blocks, expert, weight.out_features, weight.groups, seed)
        if expert_format == MXFP4:
            writer.write(target.blocks, blocks, expert * blocks.numel())
            writer.write(target.scales, scales, expert * scales.numel())
        else:
            matrix = mxfp4.decode(blocks, scales, expert_format)
            if target.transposed:
                matrix = matrix.T.contiguous()
            writer.write(target.float_name, matrix, expert * matrix.numel() * matrix.element_size())


def _config_json(config: ModelConfig, layout: str, expert_format: object, dtype: str) -> dict:
    if layout == OPENAI:
        return config.to_openai()
    torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    return config.to_hf(mxfp4=expert_format == MXFP4, torch_dtype=torch_dtype)
