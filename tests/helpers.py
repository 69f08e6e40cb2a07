"""Helpers shared by several test modules."""

from __future__ import annotations

import torch

from ossconv import synthetic
from ossconv.checkpoint import open_checkpoint

# 3 layers (a bug planted in layer 1 must leave layer 0 alone), 8 experts top-4, 3 query heads per KV head,
# window 4: down_proj [E, 96, 64] vs gate_up [E, 128, 96], no square expert matrix; attention 6 x 24 = 144
# wide against hidden 96 (as gpt-oss: 4096 vs 2880), so a transposed o_proj or qkv cannot pass.
WIDER = synthetic.tiny_config(
    num_hidden_layers=3,
    num_experts=8,
    experts_per_token=4,
    hidden_size=96,
    intermediate_size=64,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=24,
    sliding_window=4,
    vocab_size=300,
)
TOKENS = [3, 17, 200, 5, 9, 31, 64, 1, 2, 250, 128, 77, 6, 42, 99, 11, 13, 180, 7, 3]  # longer than the windows


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def assert_byte_identical(a_path, b_path) -> None:
    """Same tensor names in the same order, same dtypes and shapes, same bytes."""
    a, b = open_checkpoint(a_path), open_checkpoint(b_path)
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert a.info(name).dtype == b.info(name).dtype and a.info(name).shape == b.info(name).shape, name
        assert raw(a.get(name)) == raw(b.get(name)), name


def one_error(result, *fragments: str) -> None:
    """The bad-input contract: exit 2, exactly one stderr line starting "Error: ", no traceback, and the
    line names each of ``fragments``."""
    assert result.code == 2, (result.code, result.err)
    assert result.err.count("\n") == 1 and result.err.startswith("Error: "), result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err, result.err


def messages(result) -> list[str]:
    """The problem messages of an ``inspect --json`` result."""
    import json

    return [problem["message"] for problem in json.loads(result.out)["problems"]]
