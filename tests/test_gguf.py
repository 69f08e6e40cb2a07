"""GGUF: our files against llama.cpp's own converter (byte for byte), gguf-py's reader and MXFP4 dequantizer,
verify and convert reading GGUF, byte-identical round trips, and bad GGUF files refused in one line."""

from __future__ import annotations

import shutil

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from helpers import WIDER, assert_byte_identical, one_error

from ossconv import convert, synthetic, verify
from ossconv.checkpoint import open_checkpoint
from ossconv.formats import mxfp4


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """HF checkpoints (non-square experts and attention) in folders with neutral names: llama.cpp names the
    model after its folder."""
    root = tmp_path_factory.mktemp("gguf")
    made = {}
    for experts in ("mxfp4", "bf16"):
        made[experts] = synthetic.build(root / experts / "tiny", WIDER, layout="hf", experts=experts, seed=7)
    made["sharded"] = synthetic.build(
        root / "sharded" / "tiny", WIDER, layout="hf", seed=7, max_shard_size=100_000
    )  # 7 shards
    made["openai"] = synthetic.build(root / "openai" / "tiny", WIDER, layout="openai", seed=7)
    for name in ("mxfp4", "bf16", "sharded"):
        llama_cpp.convert(made[name], root / f"llama-{name}.gguf")
        made[f"llama-{name}"] = root / f"llama-{name}.gguf"
    return made


@pytest.mark.parametrize("name, dtype", [("mxfp4", "mxfp4"), ("bf16", "bf16"), ("sharded", "mxfp4")])
def test_same_bytes_as_llama_cpp_converter(sources, tmp_path, name, dtype):
    ours = convert(sources[name], tmp_path / "ours.gguf", to="gguf", dtype=dtype)
    assert (tmp_path / "ours.gguf").read_bytes() == sources[f"llama-{name}"].read_bytes()
    assert ours.details["note"].startswith("no tokenizer.json")


def test_openai_layout_source_gives_the_same_file(sources, tmp_path):
    convert(sources["openai"], tmp_path / "ours.gguf", to="gguf")  # folder named like the HF one: same name key
    assert (tmp_path / "ours.gguf").read_bytes() == sources["llama-mxfp4"].read_bytes()


def test_gguf_py_reads_our_values(sources, tmp_path):
    """gguf-py's reader and its MXFP4 dequantizer agree with ossconv.decode on every value."""
    convert(sources["mxfp4"], tmp_path / "ours.gguf", to="gguf")
    reader = gguf.GGUFReader(tmp_path / "ours.gguf")
    tensors = {t.name: t for t in reader.tensors}
    ckpt = open_checkpoint(sources["mxfp4"])
    for weight in ckpt.expert_weights:
        names = {"mlp1": ("ffn_gate_exps", "ffn_up_exps"), "mlp2": ("ffn_down_exps",)}[weight.proj]
        theirs = [
            gguf.quants.dequantize(
                np.array(tensors[f"blk.{weight.layer}.{n}.weight"].data), gguf.GGMLQuantizationType.MXFP4
            )
            for n in names
        ]
        for expert in range(weight.num_experts):
            ours = ckpt.get_expert(weight, expert, torch.float32)
            halves = [ours[0::2], ours[1::2]] if len(theirs) == 2 else [ours]
            for mine, other in zip(halves, theirs, strict=True):
                assert torch.equal(mine, torch.from_numpy(other[expert]))  # == : -0.0 equals +0.0 (ggml has no -0)
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.BF16
    q_values = torch.from_numpy(np.array(q.data)).view(torch.bfloat16)
    assert torch.equal(q_values, ckpt.get("model.layers.1.self_attn.q_proj.weight"))


def test_verify_reads_gguf_and_finds_swapped_gate_up(sources, tmp_path, run_cli):
    assert run_cli("verify", sources["mxfp4"], sources["llama-mxfp4"], "--exact").code == 0
    assert run_cli("verify", sources["bf16"], sources["llama-bf16"], "--exact").code == 0
    swapped = tmp_path / "swapped.gguf"
    shutil.copyfile(sources["llama-mxfp4"], swapped)
    tensors = {t.name: t for t in gguf.GGUFReader(swapped).tensors}
    gate, up = tensors["blk.1.ffn_gate_exps.weight"], tensors["blk.1.ffn_up_exps.weight"]
    data = bytearray(swapped.read_bytes())
    g0, u0, n = int(gate.data_offset), int(up.data_offset), int(gate.n_bytes)
    data[g0 : g0 + n], data[u0 : u0 + n] = data[u0 : u0 + n], data[g0 : g0 + n]
    swapped.write_bytes(bytes(data))
    result = run_cli("verify", sources["mxfp4"], swapped, "--json")
    assert result.code == 1
    import json

    assert json.loads(result.out)["first_divergent_layer"] == 1


@pytest.mark.parametrize("name, layout", [("mxfp4", "hf"), ("openai", "openai"), ("bf16", "hf")])
def test_round_trip_through_gguf_is_byte_identical(sources, tmp_path, name, layout):
    dtype = "bf16" if name == "bf16" else "mxfp4"
    convert(sources[name], tmp_path / "x.gguf", to="gguf", dtype=dtype)
    back = tmp_path / "back" / "tiny"  # the folder's name is the model's name in GGUF metadata
    convert(tmp_path / "x.gguf", back, to=layout, dtype=dtype)
    assert_byte_identical(sources[name], back)
    # and the other direction: gguf -> checkpoint -> gguf
    convert(back, tmp_path / "again.gguf", to="gguf", dtype=dtype)
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "x.gguf").read_bytes()
    assert verify(tmp_path / "x.gguf", tmp_path / "again.gguf", exact=True).same


def test_inspect_reads_gguf(sources, run_cli):
    import json

    ours = json.loads(run_cli("inspect", sources["mxfp4"], "--json", "--stats").out)
    theirs = json.loads(run_cli("inspect", sources["llama-mxfp4"], "--json", "--stats").out)
    assert theirs["layout"] == "gguf" and theirs["metadata"]["general.architecture"] == "gpt-oss"
    assert [s["scale_histogram"] for s in theirs["mxfp4"]] == [s["scale_histogram"] for s in ours["mxfp4"]]
    assert theirs["config"] == ours["config"]


def _patched(source, tmp_path, change):
    target = tmp_path / "bad.gguf"
    data = bytearray(source.read_bytes())
    change(data)
    target.write_bytes(bytes(data))
    return target


def _replace(data: bytearray, old: bytes, new: bytes) -> None:
    at = data.find(old)
    assert at >= 0 and len(old) == len(new)
    data[at : at + len(old)] = new


BAD = {
    "magic": (lambda d: _replace(d, b"GGUF", b"GGUX"), "not a readable GGUF file"),
    "truncated": (lambda d: d.__delitem__(slice(len(d) // 2, None)), "GGUF"),
    "architecture": (lambda d: _replace(d, b"gpt-oss", b"gpt-xyz"), "architecture"),
    "missing tensor": (lambda d: _replace(d, b"blk.0.attn_sinks.weight", b"blk.0.attn_sinkz.weight"), "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_gguf_is_refused(sources, tmp_path, run_cli, case):
    change, fragment = BAD[case]
    bad = _patched(sources["llama-mxfp4"], tmp_path, change)
    for args in (("inspect", bad), ("verify", sources["mxfp4"], bad), ("convert", bad, tmp_path / "out", "--to", "hf")):
        one_error(run_cli(*args), fragment)
    assert not (tmp_path / "out").exists()


def test_unreadable_type_and_data_beyond_the_end_are_refused(sources, tmp_path, run_cli):
    tensors = {t.name: t for t in gguf.GGUFReader(sources["llama-mxfp4"]).tensors}

    def q4(data: bytearray) -> None:  # the type field of blk.0.attn_norm.weight: F32 (0) -> Q4_0 (2)
        name = b"blk.0.attn_norm.weight"
        at = data.find(name) + len(name) + 4 + 8 * len(tensors[name.decode()].shape)
        data[at : at + 4] = int(gguf.GGMLQuantizationType.Q4_0).to_bytes(4, "little")

    one_error(run_cli("inspect", _patched(sources["llama-mxfp4"], tmp_path, q4)), "")
    cut = _patched(sources["llama-mxfp4"], tmp_path, lambda d: d.__delitem__(slice(len(d) - 64, None)))
    one_error(run_cli("convert", cut, tmp_path / "out", "--to", "hf"), "GGUF")
    assert not (tmp_path / "out").exists()


def test_codes_survive_the_ggml_repack_exhaustively():
    from ossconv.formats import ggml

    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16)
    scales = torch.arange(16, dtype=torch.uint8) * 16
    rows = ggml.to_block_mxfp4(blocks, scales)
    back_blocks, back_scales = ggml.from_block_mxfp4(rows)
    assert torch.equal(back_blocks, blocks) and torch.equal(back_scales, scales)
    theirs = gguf.quants.dequantize(rows.numpy(), gguf.GGMLQuantizationType.MXFP4)
    ours = mxfp4.decode(blocks, scales, torch.float32).numpy().reshape(theirs.shape)
    finite = np.isfinite(ours)
    assert np.array_equal(ours[finite], theirs[finite])


def test_verify_reads_q8_0_dense_tensors(sources, tmp_path, run_cli):
    """llama.cpp's --outtype q8_0 keeps the MXFP4 experts and stores 2-D weights as Q8_0 (lossy): read through
    gguf-py's dequantizer, the model is close to its source but not the same."""
    q8 = tmp_path / "q8.gguf"
    llama_cpp.convert(sources["mxfp4"], q8, extra=("--outtype", "q8_0"))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q8).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.MXFP4
    import json

    close = run_cli("verify", sources["mxfp4"], q8, "--atol", "0.5", "--kl-max", "0.05", "--json")
    assert close.code == 0, close.out + close.err
    report = json.loads(close.out)
    assert 0 < report["logits"]["max_abs_error"] < 0.5 and report["logits"]["top1_agreement"] > 0.9
    assert run_cli("verify", sources["mxfp4"], q8, "--exact").code == 1
