"""verify: our forward pass against both reference implementations, and planted bugs found at their layer."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import TOKENS, WIDER, one_error
from safetensors.torch import load_file, save_file

from ossconv import convert, synthetic
from ossconv.checkpoint import open_checkpoint
from ossconv.verify import model
from ossconv.verify.lockstep import verify

SQUARE = synthetic.tiny_config(num_hidden_layers=3, hidden_size=64, intermediate_size=64)  # down_proj is square


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    return {
        "openai": synthetic.build(root / "openai", WIDER, seed=3),
        "hf-bf16": synthetic.build(root / "hf-bf16", WIDER, layout="hf", experts="bf16", seed=3),
        "square": synthetic.build(root / "square", SQUARE, experts="bf16", seed=4),
    }


def test_forward_matches_openai_reference(wider):
    from gpt_oss.torch.model import Transformer

    reference = Transformer.from_checkpoint(str(wider["openai"]), device=torch.device("cpu")).float()
    with torch.no_grad():
        theirs = reference(torch.tensor(TOKENS))
    ours = model.forward(open_checkpoint(wider["openai"]), torch.tensor(TOKENS))
    assert (ours - theirs).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_forward_matches_transformers_on_the_hf_layout(wider):
    from transformers import GptOssForCausalLM

    reference = GptOssForCausalLM.from_pretrained(wider["hf-bf16"], dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = reference(torch.tensor([TOKENS])).logits[0]
    ours = model.forward(open_checkpoint(wider["hf-bf16"]), torch.tensor(TOKENS))
    assert (ours - theirs).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_same_values_in_other_layouts_and_precisions_verify_exactly(wider, tmp_path):
    convert(wider["openai"], tmp_path / "hf", to="hf")
    for target in (tmp_path / "hf", wider["hf-bf16"]):
        report = verify(wider["openai"], target, TOKENS, exact=True)
        assert report.same and report.first_divergent_layer is None
        assert all(s.identical for s in report.states) and report.logits.identical


# Expert weights of several PRODUCT_ROWS chunks (mlp1: 640 rows, not a multiple of 256), split over threads.
MANY_ROWS = dataclasses.replace(WIDER, num_hidden_layers=2, num_experts=4, experts_per_token=2, intermediate_size=320)


def test_expert_products_in_chunks_on_two_threads_match_transformers_and_verify_exactly(tmp_path, monkeypatch):
    from transformers import GptOssForCausalLM

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # split over threads even on a 1-core runner
    assert 2 * MANY_ROWS.intermediate_size > 2 * model.PRODUCT_ROWS
    source = synthetic.build(tmp_path / "openai", MANY_ROWS, seed=6)
    convert(source, tmp_path / "bf16", to="hf", dtype="bf16")
    report = verify(source, tmp_path / "bf16", TOKENS, exact=True)  # MXFP4 decoded vs bf16 upcast: same bits
    assert report.same and all(s.identical for s in report.states)
    reference = GptOssForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = reference(torch.tensor([TOKENS])).logits[0]
    ours = model.forward(open_checkpoint(source), torch.tensor(TOKENS))
    assert (ours - theirs).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_tolerance_passes_equal_values_and_fails_changed_weights(wider, tmp_path):
    convert(wider["openai"], tmp_path / "fp16", to="hf", dtype="fp16")  # MXFP4 -> fp16 is exact here too
    report = verify(wider["openai"], tmp_path / "fp16", TOKENS)
    assert report.same
    # A float model packed to MXFP4 changes values: a real difference, reported from layer 0.
    bf16 = load_file(wider["hf-bf16"] / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    bf16[name] = (bf16[name].float() * 1.01).to(torch.bfloat16)
    save_file(bf16, tmp_path / "model.safetensors")
    (tmp_path / "perturbed").mkdir()
    (tmp_path / "model.safetensors").rename(tmp_path / "perturbed" / "model.safetensors")
    (tmp_path / "perturbed" / "config.json").write_text((wider["hf-bf16"] / "config.json").read_text())
    report = verify(wider["hf-bf16"], tmp_path / "perturbed", TOKENS)
    assert not report.same and report.first_divergent_layer == 0


def plant(source, tmp_path, change) -> object:
    """A copy of a single-file checkpoint with ``change(tensors)`` applied."""
    target = tmp_path / "planted"
    target.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            (target / file.name).write_bytes(file.read_bytes())
    tensors = load_file(source / "model.safetensors")
    change(tensors)
    save_file(tensors, target / "model.safetensors")
    return target


def routed_expert(folder, layer: int) -> int:
    """An expert the router picks for the first token at ``layer`` (so a bug in it must show)."""
    weights = model.WeightReader(open_checkpoint(folder))
    x = model.embed(weights, torch.tensor(TOKENS))
    rotary = model.rotary_cos_sin(weights.config, len(TOKENS))
    for n in range(layer):
        x = model.block(x, weights, n, rotary)
    x = model.attention(x, weights, layer, *rotary)
    t = model.rms_norm(x, weights.dense(f"block.{layer}.mlp.norm.scale"))
    logits = t @ weights.dense(f"block.{layer}.mlp.gate.weight").T + weights.dense(f"block.{layer}.mlp.gate.bias")
    return int(logits[0].argmax())


def swap_nibbles(tensors, layer, expert):
    blocks = tensors[f"block.{layer}.mlp.mlp1_weight.blocks"]
    blocks[expert] = (blocks[expert] >> 4) | (blocks[expert] << 4)


def swap_gate_up(tensors, layer):
    for name in (
        f"block.{layer}.mlp.mlp1_weight.blocks",
        f"block.{layer}.mlp.mlp1_weight.scales",
        f"block.{layer}.mlp.mlp1_bias",
    ):
        t = tensors[name]
        even, odd = t[:, 0::2].clone(), t[:, 1::2].clone()
        t[:, 0::2], t[:, 1::2] = odd, even


@pytest.mark.parametrize("bug", ["nibbles", "gate_up", "router_bias"])
def test_planted_bug_is_found_at_its_layer(wider, tmp_path, run_cli, bug):
    layer = 1
    expert = routed_expert(wider["openai"], layer)
    changes = {
        "nibbles": lambda t: swap_nibbles(t, layer, expert),
        "gate_up": lambda t: swap_gate_up(t, layer),
        "router_bias": lambda t: t[f"block.{layer}.mlp.gate.bias"].zero_(),
    }
    planted = plant(wider["openai"], tmp_path, changes[bug])
    result = run_cli("verify", wider["openai"], planted, "--tokens", ",".join(map(str, TOKENS)), "--json")
    assert result.code == 1, result.err
    report = json.loads(result.out)
    assert (report["verdict"], report["first_divergent_layer"]) == ("differ", layer)
    assert report["states"][layer]["max_abs_error"] == 0.0  # states[0] is the embedding: layers before k agree


def test_transposed_square_down_proj_is_found(wider, tmp_path, run_cli):
    def transpose(tensors):
        name = "block.1.mlp.mlp2_weight"
        tensors[name] = tensors[name].transpose(1, 2).contiguous()  # same shape: a shape check cannot see it

    planted = plant(wider["square"], tmp_path, transpose)
    result = run_cli("verify", wider["square"], planted, "--num-tokens", "24", "--json")
    assert result.code == 1
    assert json.loads(result.out)["first_divergent_layer"] == 1


def test_report_files_and_text(wider, tmp_path, run_cli):
    (tmp_path / "prompt.txt").write_text("[5, 6, 7, 8, 9]")
    result = run_cli(
        "verify",
        wider["openai"],
        wider["hf-bf16"],
        "--prompt-tokens",
        tmp_path / "prompt.txt",
        "--report",
        tmp_path / "r.json",
        "--save-logits",
        tmp_path / "logits.safetensors",
    )
    assert result.code == 0, result.err
    assert "verdict: same" in result.out and "layer 2" in result.out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokens"] == [5, 6, 7, 8, 9] and report["first_divergent_layer"] is None
    assert report["a"]["layout"] == "openai" and report["b"]["precision"] == "bf16"
    assert len(report["a"]["config_sha256"]) == 64
    logits = load_file(tmp_path / "logits.safetensors")
    assert logits["a"].shape == logits["b"].shape == (5, 300) and logits["a"].dtype == torch.float32
    assert torch.equal(logits["a"], logits["b"])


def test_bad_input_exits_2(wider, checkpoints, tmp_path, run_cli):
    one_error(run_cli("verify", wider["openai"], tmp_path / "missing"), "no such folder")
    one_error(
        run_cli("verify", wider["openai"], checkpoints["openai-mxfp4"]), "different configs: num_hidden_layers 3 vs 2"
    )
    one_error(run_cli("verify", wider["openai"], wider["hf-bf16"], "--tokens", "1,2,300"), "token id 300 is outside")
    one_error(run_cli("verify", wider["openai"], wider["hf-bf16"], "--tokens", "1,x"), "token ids must be integers")
    one_error(run_cli("verify", wider["openai"], wider["hf-bf16"], "--exact", "--atol", "1"), "exact or atol")
    one_error(run_cli("verify", wider["openai"], wider["hf-bf16"], "--tokens", "1", "--num-tokens", "3"), "choose one")
