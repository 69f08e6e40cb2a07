"""verify on text: prompts and Harmony chats through the checkpoint's own tokenizer and template, greedy
continuations against transformers' generate, and planted bugs showing where the continuations part."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import WIDER, one_error

from ossconv import convert, harmony, synthetic, verify

CHAT = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "What is a fox?"}]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """OpenAI's layout in ``model/original`` with the tokenizer and template in ``model/`` (as released), and an
    HF fp32 copy of the same values with its own tokenizer files, for transformers."""
    root = tmp_path_factory.mktemp("text")
    original = synthetic.build(root / "model" / "original", WIDER, seed=11)
    harmony.build_tokenizer(root / "model", WIDER.vocab_size)
    hf = synthetic.build(root / "hf", WIDER, layout="hf", experts="fp32", dtype="fp32", seed=11)
    harmony.build_tokenizer(hf, WIDER.vocab_size)
    (root / "chat.json").write_text(json.dumps(CHAT))
    return {"root": root, "original": original, "hf": hf, "chat": root / "chat.json"}


def test_greedy_continuation_equals_transformers_generate(text_model):
    from transformers import AutoTokenizer, GptOssForCausalLM

    prompt = "The quick brown fox"
    report = verify(text_model["hf"], text_model["hf"], prompts=[prompt], generate=8)
    ours = report.cases[0]
    tokenizer = AutoTokenizer.from_pretrained(text_model["hf"])
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.tokens  # the same tokenization
    hf = GptOssForCausalLM.from_pretrained(text_model["hf"], dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    margins = [float(torch.topk(s[0], 2).values[0] - torch.topk(s[0], 2).values[1]) for s in out.scores]
    assert min(margins) > 1e-3  # no near-tie at any step: the greedy choice is well defined
    assert out.sequences[0, ids.shape[1] :].tolist() == ours.generation.a == ours.generation.b
    assert ours.generation.text_a == tokenizer.decode(ours.generation.a)


def test_exact_conversion_keeps_every_case_and_continuation(text_model, tmp_path, run_cli):
    convert(text_model["original"], tmp_path / "hf", to="hf", dtype="bf16")
    cases = tmp_path / "cases.jsonl"
    lines = [{"id": "fox", "text": "The quick brown fox"}, {"messages": CHAT}, {"text": "Hello world"}]
    cases.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = run_cli("verify", text_model["original"], tmp_path / "hf", "--prompts", cases, "--generate", "6", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [c["id"] for c in report["cases"]] == ["fox", "line-2", "line-3"]
    assert all(c["generation"]["parted_at"] is None and len(c["generation"]["a"]) == 6 for c in report["cases"])
    assert report["cases"][1]["text"].startswith("<|start|>system<|message|>")
    text = run_cli("verify", text_model["original"], tmp_path / "hf", "--prompts", cases, "--generate", "2")
    assert text.code == 0 and text.out.count("continuations identical") == 3 and text.out.endswith("verdict: same\n")


def test_chat_with_reasoning_effort_is_rendered_by_the_template(text_model, run_cli):
    result = run_cli(
        "verify", text_model["original"], text_model["original"], "--chat", text_model["chat"],
        "--reasoning-effort", "high", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    case = json.loads(result.out)["cases"][0]
    assert "Reasoning: high" in case["text"] and case["text"].endswith("<|start|>assistant")
    special = harmony.special_token_ids(WIDER.vocab_size)
    assert case["tokens"][0] == special["<|start|>"]


def test_a_planted_bug_parts_the_continuations(text_model, tmp_path, run_cli):
    from safetensors.torch import load_file, save_file

    planted = tmp_path / "planted"
    shutil.copytree(text_model["original"], planted)
    tensors = load_file(planted / "model.safetensors")
    for name in ("block.1.mlp.mlp1_weight.blocks", "block.1.mlp.mlp1_weight.scales", "block.1.mlp.mlp1_bias"):
        t = tensors[name]
        t[:, 0::2], t[:, 1::2] = t[:, 1::2].clone(), t[:, 0::2].clone()  # gate and up swapped in every expert
    save_file(tensors, planted / "model.safetensors")
    args = ["--prompt", "The quick brown fox", "--prompt", "Hello world", "--generate", "6"]
    result = run_cli("verify", text_model["original"], planted, "--tokenizer", text_model["root"] / "model", *args)
    assert result.code == 1
    report = json.loads(
        run_cli(
            "verify", text_model["original"], planted, "--tokenizer", text_model["root"] / "model", *args, "--json"
        ).out
    )
    assert all(c["first_divergent_layer"] == 1 for c in report["cases"])
    assert any(c["generation"]["parted_at"] is not None for c in report["cases"])
    assert "continuations part at token" in result.out and "verdict: DIFFER (2 of 2 cases)" in result.out


def test_text_errors_are_one_line(text_model, tmp_path, run_cli):
    no_tokenizer = synthetic.build(tmp_path / "bare", WIDER, seed=11)
    one_error(run_cli("verify", no_tokenizer, no_tokenizer, "--prompt", "hi"), "no tokenizer.json")
    broken = tmp_path / "broken"
    shutil.copytree(text_model["root"] / "model", broken)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content ")
    one_error(
        run_cli("verify", broken / "original", broken / "original", "--chat", text_model["chat"]), "chat template"
    )
    small = tmp_path / "small"  # a tokenizer with more ids than the model's vocabulary
    synthetic.build(small / "original", synthetic.tiny_config(vocab_size=WIDER.vocab_size - 20), seed=1)
    harmony.build_tokenizer(small, WIDER.vocab_size)
    one_error(
        run_cli("verify", small / "original", small / "original", "--chat", text_model["chat"]),
        "outside the vocabulary",
    )
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('{"text": "ok"}\n{"neither": 1}\n')
    one_error(run_cli("verify", text_model["original"], text_model["original"], "--prompts", bad_lines), "line 2")
    one_error(
        run_cli("verify", text_model["original"], text_model["original"], "--prompt", "x", "--tokens", "1"), "not both"
    )
