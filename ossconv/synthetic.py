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
