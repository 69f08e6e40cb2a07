"""The command line: results, --json, and the exit-code contract (0 ok, 1 problems, 2 bad input, 3 bug)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers import messages, one_error

from ossconv.checkpoint import open_checkpoint


def test_inspect_text(run_cli, checkpoints):
    result = run_cli("inspect", checkpoints["openai-mxfp4"], "--stats")
    assert result.code == 0, result.err
    assert "openai layout, experts mxfp4, model custom" in result.out
    assert "block.1.mlp.mlp2_weight.blocks" in result.out
    assert "no problems found" in result.out
    assert "MXFP4: 4608 blocks in 4 weights" in result.out


def test_inspect_json_is_one_document(run_cli, checkpoints):
    result = run_cli("inspect", checkpoints["hf-mxfp4"], "--json", "--stats")
    assert result.code == 0
    report = json.loads(result.out)
    assert (report["layout"], report["precision"], report["problems"]) == ("hf", "mxfp4", [])
    stats = report["mxfp4"][0]
    scales = open_checkpoint(checkpoints["hf-mxfp4"]).get(stats["scales_tensor"])  # counted here, apart
    expected = {int(s): int(n) for s, n in zip(*torch.unique(scales, return_counts=True), strict=True)}
    assert {int(s): n for s, n in stats["scale_histogram"].items()} == expected
    assert stats["blocks"] == scales.numel() == 4 * 192 * 2
    assert (stats["scale_min"], stats["scale_max"]) == (int(scales.min()), int(scales.max()))
    assert result.err == ""


def test_inspect_lists_problems_with_exit_1(run_cli, checkpoints, copy_of):
    from safetensors.torch import load_file, save_file

    folder = copy_of(checkpoints["openai-mxfp4"])
    tensors = load_file(folder / "model.safetensors")
    del tensors["block.1.attn.sinks"]
    tensors["block.0.mlp.gate.bias"] = tensors["block.0.mlp.gate.bias"][:3].clone()
    tensors["block.0.extra"] = tensors["norm.scale"].clone()
    tensors["block.1.mlp.mlp2_weight.scales"][0, 0, 0] = 255  # decodes to Inf unless the block is all zero
    tensors["block.1.mlp.mlp2_weight.blocks"][0, 0, 0, 0] = 0x07
    save_file(tensors, folder / "model.safetensors")
    result = run_cli("inspect", folder, "--json", "--stats")
    assert result.code == 1
    problems = messages(result)
    assert "missing tensor block.1.attn.sinks" in problems
    assert "block.0.mlp.gate.bias has shape [3], the config implies [4]" in problems
    assert "unexpected tensor block.0.extra" in problems
    assert "block.1.mlp.mlp2_weight.blocks: 1 block(s) decode to Inf" in problems


def test_unpack_and_pack_commands(run_cli, checkpoints, tmp_path):
    result = run_cli("unpack", checkpoints["hf-mxfp4"], tmp_path / "bf16", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["precision"] == "bf16"
    result = run_cli("pack", tmp_path / "bf16", tmp_path / "mxfp4", "--rule", "floor")
    assert result.code == 0, result.err
    assert "pack:" in result.out and "(hf, mxfp4)" in result.out
    assert open_checkpoint(tmp_path / "mxfp4").precision.value == "mxfp4"


def test_quiet_prints_nothing(run_cli, checkpoints, tmp_path):
    result = run_cli("unpack", checkpoints["openai-mxfp4"], tmp_path / "out", "--quiet")
    assert (result.code, result.out, result.err) == (0, "", "")


def test_existing_output_is_refused_then_overwritten(run_cli, checkpoints, tmp_path):
    (tmp_path / "out").mkdir()
    result = run_cli("unpack", checkpoints["openai-mxfp4"], tmp_path / "out")
    assert result.code == 2
    assert result.err == f"Error: {tmp_path / 'out'}: output already exists; pass --overwrite to replace it\n"
    result = run_cli("unpack", checkpoints["openai-mxfp4"], tmp_path / "out", "--overwrite")
    assert result.code == 0


def _truncated(folder):
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-64])
    return "model.safetensors"


def _lying_header(folder):
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    header["norm.scale"]["data_offsets"][0] += 2
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    return "model.safetensors"


def _pickle(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.bin").write_bytes(b"\x80\x04")
    return "never loads pickles"


def _empty(folder):
    (folder / "model.safetensors").unlink()
    return "no .safetensors files"


def _outside_index(folder):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"norm.scale": "/etc/passwd"}}))
    return "outside the checkpoint folder"


COMMANDS = {
    "inspect": lambda bad, good, out: ["inspect", bad],
    "unpack": lambda bad, good, out: ["unpack", bad, out],
    "pack": lambda bad, good, out: ["pack", bad, out],
    "convert": lambda bad, good, out: ["convert", bad, out, "--to", "hf"],
    "reshard": lambda bad, good, out: ["reshard", bad, out, "--experts", "split"],
    "verify": lambda bad, good, out: ["verify", good, bad],
}


@pytest.mark.parametrize("damage", [_truncated, _lying_header, _pickle, _empty, _outside_index])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_input_is_one_line_exit_2_and_no_output(run_cli, checkpoints, copy_of, tmp_path, damage, command):
    source = "openai-bf16" if command == "pack" else "openai-mxfp4"
    folder = copy_of(checkpoints[source], "bad")
    fragment = damage(folder)
    one_error(run_cli(*COMMANDS[command](folder, checkpoints[source], tmp_path / "out")), str(folder), fragment)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_missing_folder_is_exit_2(run_cli, tmp_path):
    one_error(run_cli("inspect", tmp_path / "nope"), "nope: no such folder")


def test_usage_error_is_exit_2(run_cli):
    assert run_cli("unpack").code == 2
    assert run_cli("pack", "a", "b", "--rule", "sideways").code == 2


def test_a_bug_exits_3_with_one_line(run_cli, checkpoints, monkeypatch):
    import ossconv.inspection

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(ossconv.inspection, "inspect_checkpoint", broken)
    result = run_cli("inspect", checkpoints["openai-mxfp4"], "--stats")
    assert result.code == 3
    assert result.err == (
        "Error: internal error in ossconv (ZeroDivisionError: division by zero); "
        "rerun with OSSCONV_DEBUG=1 for the traceback\n"
    )
    monkeypatch.setenv("OSSCONV_DEBUG", "1")
    assert "Traceback" in run_cli("inspect", checkpoints["openai-mxfp4"]).err


def test_demo_passes_and_keeps_its_folder(run_cli, tmp_path):
    result = run_cli("demo", "--out", tmp_path / "demo", "--json")
    assert result.code == 0, result.out
    report = json.loads(result.out)
    assert report["ok"] and len(report["steps"]) >= 10
    assert all(step["ok"] for step in report["steps"])
    assert (tmp_path / "demo" / "openai-repacked" / "model.safetensors").exists()


def test_module_entry_point_runs():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ossconv", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "inspect" in done.stdout


def test_inspect_reads_headers_only_by_default_and_stats_on_request(run_cli, checkpoints):
    import json as _json

    quick = _json.loads(run_cli("inspect", checkpoints["openai-mxfp4"], "--json").out)
    full = _json.loads(run_cli("inspect", checkpoints["openai-mxfp4"], "--json", "--stats").out)
    assert quick["mxfp4"] == [] and len(full["mxfp4"]) == 4
    assert {k: v for k, v in quick.items() if k != "mxfp4"} == {k: v for k, v in full.items() if k != "mxfp4"}


def test_inspect_stats_of_expert_parallel_ranks_equal_the_fused_source(run_cli, checkpoints, tmp_path):
    """Experts stored one tensor each (read piece by piece into the reused buffers) count as the fused ones."""
    import json as _json

    ranks = tmp_path / "ep"
    assert run_cli("reshard", checkpoints["hf-mxfp4"], ranks, "--ep-ranks", "2").code == 0
    fused = _json.loads(run_cli("inspect", checkpoints["hf-mxfp4"], "--json", "--stats").out)["mxfp4"]
    split = _json.loads(run_cli("inspect", ranks, "--json", "--stats").out)["mxfp4"]
    assert split == fused and fused and all(s["blocks"] > 0 for s in fused)
