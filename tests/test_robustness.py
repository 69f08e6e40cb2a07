"""Malformed inputs found in review: each must be one line and exit 2 (or a listed problem, exit 1)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import messages, one_error
from safetensors.torch import load_file, save_file

from ossconv.convert.reshard import reshard


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"num_attention_heads": 0, "head_dim": None}, "config.json"),
        ({"rope_scaling": [1]}, "rope_scaling must be an object"),
        ({"sliding_window": "8"}, "sliding_window must be a non-negative integer"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be a positive integer"),
    ],
)
def test_bad_hf_config_values(run_cli, checkpoints, copy_of, change, fragment):
    folder = copy_of(checkpoints["hf-mxfp4"])
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    one_error(run_cli("inspect", folder), fragment)
    one_error(run_cli("verify", checkpoints["hf-mxfp4"], folder), fragment)


def test_bad_openai_rope_values(run_cli, checkpoints, copy_of):
    folder = copy_of(checkpoints["openai-mxfp4"])
    config = json.loads((folder / "config.json").read_text())
    config["rope_ntk_beta"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    one_error(run_cli("verify", folder, folder), "rope_ntk_beta must be a positive number")


def test_hf_config_without_truncate_false_is_a_problem(run_cli, checkpoints, copy_of, tmp_path):
    folder = copy_of(checkpoints["hf-mxfp4"])
    config = json.loads((folder / "config.json").read_text())
    del config["rope_scaling"]["truncate"]
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("inspect", folder, "--json")
    assert result.code == 1
    assert any("truncate is not false" in p for p in messages(result))
    one_error(run_cli("convert", folder, tmp_path / "out", "--to", "openai"), "truncate is not false")


def test_expert_numbers_with_leading_zeros_are_not_the_same_expert(run_cli, checkpoints, tmp_path):
    reshard(checkpoints["openai-mxfp4"], tmp_path / "split", experts="split")
    file = tmp_path / "split" / "model.safetensors"
    tensors = load_file(file)
    tensors["block.0.mlp.experts.01.mlp1_bias"] = torch.full_like(tensors["block.0.mlp.experts.1.mlp1_bias"], 7.0)
    save_file(tensors, file)
    result = run_cli("inspect", tmp_path / "split", "--json")
    assert result.code == 1
    assert "unexpected tensor block.0.mlp.experts.01.mlp1_bias" in messages(result)
    one_error(run_cli("reshard", "--merge", tmp_path / "split", tmp_path / "out"), "unexpected tensor")


def test_mixed_float_expert_dtypes_are_a_problem(run_cli, checkpoints, copy_of, tmp_path):
    folder = copy_of(checkpoints["openai-bf16"])
    tensors = load_file(folder / "model.safetensors")
    tensors["block.1.mlp.mlp2_weight"] = tensors["block.1.mlp.mlp2_weight"].to(torch.float16)
    save_file(tensors, folder / "model.safetensors")
    result = run_cli("inspect", folder, "--json")
    assert result.code == 1
    assert "block.1.mlp.mlp2_weight is F16, other expert weights are BF16" in messages(result)
    one_error(run_cli("convert", folder, tmp_path / "out", "--to", "hf"), "is F16")
    one_error(run_cli("reshard", folder, tmp_path / "out2", "--experts", "split"), "is F16")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m["ranks"][0].update(experts="0-2"), "experts must be [first, stop)"),
        (lambda m: m["ranks"][0].pop("experts"), "experts must be [first, stop)"),
        (lambda m: m["ranks"][1]["files"].update({"model.safetensors": 5}), "sha256 hex digests"),
        (lambda m: m.update(num_experts="4"), "num_experts must be a positive integer"),
        (lambda m: m["ranks"][0].update(files=["model.safetensors"]), "sha256 hex digests"),
    ],
)
def test_malformed_manifest(run_cli, checkpoints, tmp_path, edit, fragment):
    reshard(checkpoints["hf-mxfp4"], tmp_path / "ep", ep_ranks=2)
    manifest = json.loads((tmp_path / "ep" / "ep_manifest.json").read_text())
    edit(manifest)
    (tmp_path / "ep" / "ep_manifest.json").write_text(json.dumps(manifest))
    one_error(run_cli("reshard", "--merge", tmp_path / "ep", tmp_path / "out"), "ep_manifest.json", fragment)
    assert not (tmp_path / "out").exists()


def test_verify_does_not_overwrite_files_without_overwrite(run_cli, checkpoints, tmp_path):
    (tmp_path / "keep.json").write_text("mine")
    one_error(
        run_cli("verify", checkpoints["hf-mxfp4"], checkpoints["openai-mxfp4"], "--report", tmp_path / "keep.json"),
        "already exists; pass --overwrite",
    )
    assert (tmp_path / "keep.json").read_text() == "mine"
    result = run_cli(
        "verify",
        checkpoints["hf-mxfp4"],
        checkpoints["openai-mxfp4"],
        "--report",
        tmp_path / "keep.json",
        "--overwrite",
    )
    assert result.code == 0 and json.loads((tmp_path / "keep.json").read_text())["verdict"] == "same"


def test_boolean_token_ids_are_refused(run_cli, checkpoints):
    one_error(
        run_cli("verify", checkpoints["hf-mxfp4"], checkpoints["hf-mxfp4"], "--tokens", "[1, true]"),
        "expected at least one integer token id",
    )
