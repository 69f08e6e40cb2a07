"""reshard: every way of re-cutting a checkpoint must give the same bytes back."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import assert_byte_identical, one_error

from ossconv.checkpoint import open_checkpoint
from ossconv.convert.reshard import reshard
from ossconv.expert_parallel import merge
from ossconv.formats import layouts


def header_names(path) -> list[str]:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return [n for n in json.loads(data[8 : 8 + length]) if n != "__metadata__"]


ALL = ["openai-mxfp4", "openai-bf16", "hf-mxfp4", "hf-bf16"]


@pytest.mark.parametrize("name", ALL)
def test_size_reshard_round_trip(checkpoints, tmp_path, name):
    result = reshard(checkpoints[name], tmp_path / "small", max_shard_size=40_000)
    index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    assert result.files == len(set(index["weight_map"].values())) > 3
    for file in set(index["weight_map"].values()):
        names = header_names(tmp_path / "small" / file)
        size = (tmp_path / "small" / file).stat().st_size
        assert len(names) == 1 or size <= 40_000 + 8 + 2000  # data within the limit, plus the header
    assert_byte_identical(checkpoints[name], tmp_path / "small")
    reshard(tmp_path / "small", tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]


@pytest.mark.parametrize("name", ALL)
def test_split_then_fuse_round_trip(checkpoints, tmp_path, name):
    reshard(checkpoints[name], tmp_path / "split", experts="split")
    names = header_names(tmp_path / "split" / "model.safetensors")
    source = open_checkpoint(checkpoints[name])
    fused = [n for n in source.tensors if layouts.is_expert_tensor(n)]
    assert not any(n in names for n in fused)
    assert len([n for n in names if layouts.parse_split_name(n)]) == len(fused) * source.config.num_experts
    assert_byte_identical(checkpoints[name], tmp_path / "split")  # the reader presents them fused
    reshard(tmp_path / "split", tmp_path / "fused", experts="fused")
    assert_byte_identical(checkpoints[name], tmp_path / "fused")
    merge(tmp_path / "split", tmp_path / "merged")
    assert_byte_identical(checkpoints[name], tmp_path / "merged")


def test_split_names_are_predictable(checkpoints, tmp_path):
    reshard(checkpoints["hf-mxfp4"], tmp_path / "hf", experts="split")
    reshard(checkpoints["openai-bf16"], tmp_path / "openai", experts="split")
    hf = set(header_names(tmp_path / "hf" / "model.safetensors"))
    openai = set(header_names(tmp_path / "openai" / "model.safetensors"))
    assert {
        "model.layers.1.mlp.experts.3.gate_up_proj_blocks",
        "model.layers.1.mlp.experts.3.gate_up_proj_scales",
        "model.layers.0.mlp.experts.0.down_proj_bias",
    } <= hf
    assert {"block.1.mlp.experts.3.mlp1_weight", "block.0.mlp.experts.2.mlp2_bias"} <= openai
    blocks = load_one(tmp_path / "hf", "model.layers.1.mlp.experts.3.gate_up_proj_blocks")
    assert torch.equal(
        blocks, open_checkpoint(tmp_path / "hf").get("model.layers.1.mlp.experts.gate_up_proj_blocks")[3]
    )


def load_one(folder, name):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as handle:
        return handle.get_tensor(name)


@pytest.mark.parametrize("name", ALL)
def test_expert_parallel_then_merge_round_trip(checkpoints, tmp_path, name):
    result = reshard(checkpoints[name], tmp_path / "ep", ep_ranks=2)
    manifest = json.loads((tmp_path / "ep" / "ep_manifest.json").read_text())
    assert [r["experts"] for r in manifest["ranks"]] == [[0, 2], [2, 4]]
    assert result.details["ep_ranks"] == 2
    source = open_checkpoint(checkpoints[name])
    shared_files = []
    for entry in manifest["ranks"]:
        folder = tmp_path / "ep" / entry["folder"]
        assert entry["folder"] == f"rank-0000{entry['rank']}-of-00002"
        files = {path.name: header_names(path) for path in sorted(folder.glob("*.safetensors"))}
        names = [n for found in files.values() for n in found]
        # A file holds shared tensors only (the same file, linked, in every rank) or this rank's experts only.
        shared_files.append(
            {
                (folder / f).stat().st_ino
                for f, found in files.items()
                if not any(layouts.parse_split_name(n) for n in found)
            }
        )
        assert all(
            all(layouts.parse_split_name(n) for n in found)
            for f, found in files.items()
            if (folder / f).stat().st_ino not in shared_files[-1]
        )
        experts = {layouts.parse_split_name(n)[1] for n in names if layouts.parse_split_name(n)}
        assert experts == set(range(*entry["experts"]))  # exactly its experts
        assert not any(layouts.is_expert_tensor(n) for n in names)  # and no fused expert tensor
        shared = [n for n in source.tensors if not layouts.is_expert_tensor(n)]
        assert set(shared) <= set(names)
        rank = open_checkpoint(folder)  # a rank folder is a checkpoint of its own
        assert rank.layout == source.layout
        assert rank.missing_experts(next(iter(rank.pieces))) == [e for e in range(4) if e not in experts]
    assert shared_files[0] == shared_files[1] and shared_files[0]
    assert manifest["ranks"][0]["files"].keys() == manifest["ranks"][1]["files"].keys()
    merge(tmp_path / "ep", tmp_path / "merged")
    assert_byte_identical(checkpoints[name], tmp_path / "merged")


def test_expert_parallel_checkpoint_verifies_exactly(checkpoints, tmp_path, run_cli):
    reshard(checkpoints["openai-mxfp4"], tmp_path / "ep", ep_ranks=4)
    result = run_cli("verify", checkpoints["openai-mxfp4"], tmp_path / "ep", "--exact")
    assert result.code == 0, result.err + result.out


def test_size_resharded_hf_checkpoint_gives_the_same_logits_in_transformers(checkpoints, tmp_path):
    from transformers import GptOssForCausalLM

    reshard(checkpoints["hf-mxfp4"], tmp_path / "small", max_shard_size=30_000)
    tokens = torch.tensor([[1, 5, 9, 200, 3, 7, 11, 13, 17, 19]])
    logits = []
    for folder in (checkpoints["hf-mxfp4"], tmp_path / "small"):
        model = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            logits.append(model(tokens).logits)
    assert torch.equal(logits[0], logits[1])


def test_reshard_command(run_cli, checkpoints, tmp_path):
    result = run_cli("reshard", checkpoints["hf-bf16"], tmp_path / "ep", "--ep-ranks", "4")
    assert result.code == 0, result.err
    assert "rank-00003-of-00004: experts 3-3" in result.out
    result = run_cli("reshard", "--merge", tmp_path / "ep", tmp_path / "back", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["command"] == "merge"
    assert run_cli("reshard", "--merge", tmp_path / "ep", tmp_path / "x", "--ep-ranks", "2").code == 2


# ------------------------------------------------------------------------------------------ bad input


def test_ranks_must_divide_the_experts(run_cli, checkpoints, tmp_path):
    one_error(
        run_cli("reshard", checkpoints["hf-mxfp4"], tmp_path / "ep", "--ep-ranks", "3"),
        "4 experts cannot be divided evenly among 3 ranks",
    )
    assert not (tmp_path / "ep").exists()


@pytest.fixture
def ep(checkpoints, tmp_path):
    reshard(checkpoints["openai-mxfp4"], tmp_path / "ep", ep_ranks=2)
    return tmp_path / "ep"


def test_missing_rank(run_cli, ep, tmp_path):
    import shutil

    shutil.rmtree(ep / "rank-00001-of-00002")
    one_error(run_cli("reshard", "--merge", ep, tmp_path / "out"), "rank folder rank-00001-of-00002 is missing")
    assert not (tmp_path / "out").exists()


def test_rank_dropped_from_the_manifest(run_cli, ep, tmp_path):
    import shutil

    manifest = json.loads((ep / "ep_manifest.json").read_text())
    manifest["ranks"] = manifest["ranks"][:1]
    (ep / "ep_manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(ep / "rank-00001-of-00002")
    one_error(run_cli("reshard", "--merge", ep, tmp_path / "out"), "no rank holds experts 2-3")


def test_manifest_that_does_not_match_the_files(run_cli, ep, tmp_path):
    manifest = json.loads((ep / "ep_manifest.json").read_text())
    manifest["ranks"][0]["experts"] = [0, 3]
    (ep / "ep_manifest.json").write_text(json.dumps(manifest))
    one_error(run_cli("reshard", "--merge", ep, tmp_path / "out"), "the manifest gives this rank experts 0-2")
    assert not (tmp_path / "out").exists()


def rank_file(folder: Path, *, experts: bool) -> Path:
    """The rank's file of its own experts, or of the tensors every rank shares."""
    for path in sorted(folder.glob("*.safetensors")):
        if any(layouts.parse_split_name(n) for n in header_names(path)) == experts:
            return path
    raise AssertionError(f"no such file in {folder}")


def test_tampered_rank_file(run_cli, ep, tmp_path):
    file = rank_file(ep / "rank-00001-of-00002", experts=True)
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the last tensor's data: safetensors itself cannot notice
    file.write_bytes(bytes(data))
    one_error(run_cli("reshard", "--merge", ep, tmp_path / "out"), f"{file.name}: sha256 mismatch")
    assert not (tmp_path / "out").exists()


def test_tampered_shared_file_is_caught_in_every_rank_it_is_linked_into(run_cli, ep, tmp_path):
    file = rank_file(ep / "rank-00001-of-00002", experts=False)
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))  # in place: the first rank's link to the same file changes with it
    one_error(run_cli("reshard", "--merge", ep, tmp_path / "out"), f"{file.name}: sha256 mismatch")
    assert not (tmp_path / "out").exists()


def test_ranks_that_disagree_on_a_shared_tensor(run_cli, ep, tmp_path):
    from ossconv.expert_parallel import file_sha256

    file = rank_file(ep / "rank-00001-of-00002", experts=False)
    ckpt = open_checkpoint(ep / "rank-00001-of-00002")
    info = ckpt.info("norm.scale")
    data = bytearray(file.read_bytes())
    data[info.offset] ^= 0x01
    file.unlink()  # a file of its own (as after copying the ranks to other machines), then changed
    file.write_bytes(bytes(data))
    manifest = json.loads((ep / "ep_manifest.json").read_text())
    manifest["ranks"][1]["files"][file.name] = file_sha256(file)  # a consistent but wrong manifest
    (ep / "ep_manifest.json").write_text(json.dumps(manifest))
    one_error(
        run_cli("reshard", "--merge", ep, tmp_path / "out"),
        "disagree on tensor norm.scale",
        f"rank-00000-of-00002/{file.name}",
    )


def test_manifest_digests_equal_hashlib_over_every_file(checkpoints, tmp_path):
    """Digests computed once per linked file and reused for every rank equal hashing each rank's file."""
    import hashlib

    reshard(checkpoints["hf-mxfp4"], tmp_path / "ep", ep_ranks=4)
    manifest = json.loads((tmp_path / "ep" / "ep_manifest.json").read_text())
    for entry in manifest["ranks"]:
        folder = tmp_path / "ep" / entry["folder"]
        on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
        assert entry["files"] == on_disk


def test_ranks_are_copied_where_hard_links_are_refused(checkpoints, tmp_path, monkeypatch):
    import errno
    import os

    def refuse(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    reshard(checkpoints["openai-mxfp4"], tmp_path / "ep", ep_ranks=2)
    first, second = (rank_file(tmp_path / "ep" / f"rank-0000{r}-of-00002", experts=False) for r in (0, 1))
    assert first.name == second.name and first.stat().st_ino != second.stat().st_ino
    assert first.read_bytes() == second.read_bytes()
    merge(tmp_path / "ep", tmp_path / "merged")
    assert_byte_identical(checkpoints["openai-mxfp4"], tmp_path / "merged")
