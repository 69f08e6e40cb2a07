"""LoRA adapters merged while converting, checked against PEFT itself (merge_and_unload, the unmerged model's
logits), transformers and OpenAI's reference; every refusal is one line, exit 2, and leaves no output."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
import torch
from helpers import TOKENS, WIDER, one_error, raw

from ossconv import convert, synthetic, verify
from ossconv.checkpoint import open_checkpoint
from ossconv.verify import model

warnings.filterwarnings("ignore")
logging.getLogger("peft").setLevel(logging.ERROR)


def make_peft_adapter(base, folder, seed: int, **lora: object):
    """A PEFT LoRA adapter on our HF checkpoint ``base`` (fp32), saved to ``folder``; returns the PEFT model
    (adapter active). lora_B starts at zero in PEFT: drawn here so that the delta is not."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM

    base_model = GptOssForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    peft_model = get_peft_model(base_model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=g))
            elif "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=g))
    peft_model.save_pretrained(folder)
    return peft_model.eval()


FULL = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight"],
)
PATTERNS = dict(
    r=4,
    lora_alpha=8,
    use_rslora=True,
    rank_pattern={"experts.down_proj": 2, "layers.1.self_attn.q_proj": 3},
    alpha_pattern={"o_proj": 3},
    target_modules=["q_proj", "o_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    modules_to_save=["lm_head"],
)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = synthetic.build(root / "base", WIDER, layout="hf", experts="fp32", dtype="fp32", seed=5)
    made = {"root": root, "base": base, "models": {}}
    for name, options, seed in (("full", FULL, 1), ("patterns", PATTERNS, 2), ("other", FULL, 3)):
        made["models"][name] = make_peft_adapter(base, root / name, seed, **options)
        made[name] = root / name
    layer1 = dict(r=4, lora_alpha=16, target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"])
    make_peft_adapter(base, root / "layer1", 4, **layer1)
    made["layer1"] = root / "layer1"
    return made


@pytest.mark.parametrize("adapter", ["full", "patterns"])
def test_merged_tensors_equal_peft_merge_and_unload(lora, tmp_path, adapter):
    import copy

    merged = copy.deepcopy(lora["models"][adapter]).merge_and_unload().state_dict()
    result = convert(lora["base"], tmp_path / "ours", to="hf", dtype="fp32", lora=[lora[adapter]])
    ours, base = open_checkpoint(tmp_path / "ours"), open_checkpoint(lora["base"])
    changed = 0
    for name, theirs in merged.items():
        mine = ours.get(name)
        assert mine.dtype == torch.float32, name
        assert ((mine - theirs).norm() / theirs.norm()).item() <= 1e-6, name
        changed += not torch.equal(mine, base.get(name))
    assert changed >= 4 * WIDER.num_hidden_layers  # the deltas are there, not merely both sides unchanged
    reported = {t["tensor"] for t in result.details["lora"]["tensors"]}
    assert "model.layers.1.mlp.experts.gate_up_proj" in reported and all(
        t["delta_ratio"] > 0 for t in result.details["lora"]["tensors"]
    )


def test_transformers_logits_on_our_merge_match_the_unmerged_peft_model(lora, tmp_path):
    from transformers import GptOssForCausalLM

    convert(lora["base"], tmp_path / "ours", to="hf", dtype="fp32", lora=[lora["full"]])
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        theirs = lora["models"]["full"](ids).logits[0]
        merged = GptOssForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32, attn_implementation="eager")
        ours = merged(ids).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4


def test_openai_reference_loads_the_merged_mxfp4_openai_output(lora, tmp_path):
    from gpt_oss.torch.model import Transformer

    # bf16 dense tensors, as released (OpenAI's reference computes in bf16 weights whatever the file holds)
    base = synthetic.build(tmp_path / "base", WIDER, layout="hf", experts="bf16", dtype="bf16", seed=5)
    result = convert(base, tmp_path / "mx", to="openai", dtype="mxfp4", lora=[lora["full"]])
    errors = [t["quantization_rms_error"] for t in result.details["lora"]["tensors"] if ".blocks" in t["tensor"]]
    assert len(errors) == 2 * WIDER.num_hidden_layers and all(0 < e < 0.2 for e in errors)
    reference = Transformer.from_checkpoint(str(tmp_path / "mx"), device=torch.device("cpu")).float()
    with torch.no_grad():
        theirs = reference(torch.tensor(TOKENS))
    ours = model.forward(open_checkpoint(tmp_path / "mx"), torch.tensor(TOKENS))
    assert (ours - theirs).abs().max().item() < 1e-3


def test_an_adapter_on_layer_1_experts_leaves_everything_else_byte_identical(lora, tmp_path):
    plain = convert(lora["base"], tmp_path / "plain", to="openai", dtype="mxfp4")
    merged = convert(lora["base"], tmp_path / "merged", to="openai", dtype="mxfp4", lora=[lora["layer1"]])
    a, b = open_checkpoint(plain.output), open_checkpoint(merged.output)
    touched = {"block.1.mlp.mlp1_weight.blocks", "block.1.mlp.mlp1_weight.scales"}
    touched |= {"block.1.mlp.mlp2_weight.blocks", "block.1.mlp.mlp2_weight.scales"}
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        same = raw(a.get(name)) == raw(b.get(name))
        assert same == (name not in touched) or name.endswith(".scales"), name
    assert raw(a.get("block.1.mlp.mlp1_weight.blocks")) != raw(b.get("block.1.mlp.mlp1_weight.blocks"))


def test_two_adapters_in_order_equal_merging_one_after_the_other(lora, tmp_path):
    convert(lora["base"], tmp_path / "both", to="hf", dtype="fp32", lora=[lora["full"], lora["other"]])
    convert(lora["base"], tmp_path / "first", to="hf", dtype="fp32", lora=[lora["full"]])
    convert(tmp_path / "first", tmp_path / "second", to="hf", dtype="fp32", lora=[lora["other"]])
    a, b = open_checkpoint(tmp_path / "both"), open_checkpoint(tmp_path / "second")
    for name in a.tensors:
        assert raw(a.get(name)) == raw(b.get(name)), name


def test_verify_proves_a_merge_without_writing_a_float_model(lora, tmp_path, run_cli):
    convert(lora["base"], tmp_path / "merged", to="openai", dtype="fp32", lora=[lora["full"]])
    same = run_cli("verify", lora["base"], tmp_path / "merged", "--a-lora", lora["full"], "--json")
    assert same.code == 0, same.out + same.err
    assert json.loads(same.out)["a"]["adapters"] == [str(lora["full"])]
    other = run_cli("verify", lora["base"], tmp_path / "merged", "--a-lora", lora["other"], "--json")
    assert other.code == 1 and json.loads(other.out)["first_divergent_layer"] == 0


def test_synthetic_adapter_has_the_form_peft_writes(lora, tmp_path):
    from safetensors import safe_open

    ours = synthetic.build_lora(tmp_path / "ours", WIDER)
    with (
        safe_open(ours / "adapter_model.safetensors", "pt") as a,
        safe_open(lora["other"] / "adapter_model.safetensors", "pt") as b,
    ):
        peft_router = {k for k in b.keys() if ".router." in k}
        assert {k: a.get_slice(k).get_shape() for k in a.keys()} == {
            k: b.get_slice(k).get_shape() for k in b.keys() if k not in peft_router
        }
    # and it merges as PEFT's adapters do: verify against the merge on the fly
    convert(lora["base"], tmp_path / "merged", to="hf", dtype="fp32", lora=[ours])
    assert verify(lora["base"], tmp_path / "merged", TOKENS, a_lora=[ours], exact=True).same


# ---------------------------------------------------------------------------------------------- refusals


def _adapter_copy(lora, tmp_path, change_config=None, change_tensors=None):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "adapter"
    shutil.copytree(lora["full"], folder)
    if change_config:
        config = json.loads((folder / "adapter_config.json").read_text())
        change_config(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if change_tensors:
        tensors = load_file(folder / "adapter_model.safetensors")
        change_tensors(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def _swap_experts(tensors):
    """Expert LoRA factored the other way round, as PEFT 0.19.0 wrote it: A [r*E, out], B [in, r*E]."""
    for key in [k for k in tensors if ".experts." in k and ".lora_A." in k]:
        a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        tensors[key] = torch.randn(a.shape[0], b.shape[0])
        tensors[key.replace("lora_A", "lora_B")] = torch.randn(a.shape[1], b.shape[1])


def _rename(tensors, old, new):
    for key in [k for k in tensors if old in k]:
        tensors[key.replace(old, new)] = tensors.pop(key)


REFUSALS = {
    "unknown names": (None, lambda t: _rename(t, "self_attn.q_proj", "self_attn.qq_proj"), "match nothing"),
    "shape": (None, lambda t: t.update({k: v[:, :-1].clone() for k, v in t.items() if "o_proj.lora_A" in k}), "shape"),
    "dora": (lambda c: c.update(use_dora=True), None, "use_dora"),
    "bias": (lambda c: c.update(bias="all"), None, "bias 'all'"),
    "peft 0.19.0": (lambda c: c.update(peft_version="0.19.0"), None, "PEFT 0.19.0"),
    "swapped": (None, lambda t: _swap_experts(t), "swapped"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_adapters_are_refused(lora, tmp_path, run_cli, case):
    change_config, change_tensors, fragment = REFUSALS[case]
    adapter = _adapter_copy(lora, tmp_path, change_config, change_tensors)
    result = run_cli("convert", lora["base"], tmp_path / "out", "--to", "hf", "--lora", adapter)
    one_error(result, fragment)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_missing_config_pickles_and_another_model_are_refused(lora, tmp_path, run_cli, checkpoints):
    no_config = _adapter_copy(lora, tmp_path)
    (no_config / "adapter_config.json").unlink()
    one_error(
        run_cli("convert", lora["base"], tmp_path / "out", "--to", "hf", "--lora", no_config), "adapter_config.json"
    )
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    one_error(run_cli("convert", lora["base"], tmp_path / "out", "--to", "hf", "--lora", pickled), "pickle")
    # an adapter for the WIDER model against the TINY one: shapes disagree
    one_error(
        run_cli("convert", checkpoints["hf-bf16"], tmp_path / "out", "--to", "hf", "--lora", lora["full"]),
        "another model",
    )
    assert not (tmp_path / "out").exists()
