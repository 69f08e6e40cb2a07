"""convert between the OpenAI and Hugging Face layouts, judged by the loaders of each layout.

Logits are compared in fp32: both reference implementations upcast (weights are exact in fp32), so two
correct paths differ only by summation order, ~1e-5 here. The tolerance (1e-3 absolute on logits of
magnitude ~1-10) is far below what any layout mistake causes (a transposed or mis-split matrix changes
logits by O(1)) and argmax must agree at every position.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import WIDER, assert_byte_identical

from ossconv import convert, synthetic
from ossconv.checkpoint import open_checkpoint
from ossconv.formats import layouts

TOKENS = torch.tensor([3, 17, 200, 5, 9, 31, 64, 1, 2, 250, 128, 77, 6, 42, 99, 11, 13, 180, 7, 3])
LOGIT_ATOL = 1e-3
SHAPES = {
    "tiny": synthetic.TINY,
    # 8 experts top-4, 3 query heads per KV head, window 4: down_proj [E, 96, 64] vs gate_up [E, 128, 96]
    "wider": WIDER,
}


def openai_logits(folder) -> torch.Tensor:
    from gpt_oss.torch.model import Transformer

    model = Transformer.from_checkpoint(str(folder), device=torch.device("cpu")).float()  # bf16 -> fp32 is exact
    with torch.no_grad():
        return model(TOKENS)


def hf_logits(folder) -> torch.Tensor:
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(TOKENS[None]).logits[0]


def assert_same_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    error = (a - b).abs().max().item()
    assert error < LOGIT_ATOL, f"max |logit difference| {error}"
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.fixture(scope="module", params=list(SHAPES))
def source(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "openai-mxfp4"
    return synthetic.build(folder, SHAPES[request.param], layout="openai", seed=7)


@pytest.mark.parametrize("dtype", ["mxfp4", "bf16"])
def test_openai_to_hf_gives_the_reference_logits_in_transformers(source, dtype, tmp_path):
    result = convert(source, tmp_path / "hf", to="hf", dtype=dtype)
    assert (result.source_layout, result.layout, result.precision) == ("openai", "hf", dtype)
    assert_same_logits(hf_logits(tmp_path / "hf"), openai_logits(source))


def test_hf_back_to_openai_is_byte_identical(source, tmp_path):
    convert(source, tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "back", to="openai")
    assert_byte_identical(source, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text()
    )
    assert json.loads((tmp_path / "back" / "dtypes.json").read_text()) == json.loads(
        (source / "dtypes.json").read_text()
    )


def test_hf_bf16_to_openai_mxfp4_loads_in_the_openai_reference(source, tmp_path):
    convert(source, tmp_path / "hf-bf16", to="hf", dtype="bf16")
    convert(tmp_path / "hf-bf16", tmp_path / "openai", to="openai", dtype="mxfp4")
    assert_same_logits(openai_logits(tmp_path / "openai"), hf_logits(tmp_path / "hf-bf16"))
    assert_byte_identical(source, tmp_path / "openai")  # synthetic blocks are canonical: bytes come back


@pytest.mark.parametrize("name", ["hf-bf16", "openai-bf16"])
def test_cold_float_experts_are_read_past_the_page_cache_to_the_same_bytes(checkpoints, monkeypatch, name, tmp_path):
    """Float experts not in the page cache go to the MXFP4 encoder by direct reads (HF's transposed ones in
    place), and are not also hinted into the page cache: the output is the cached path's, byte for byte."""
    from ossconv import files
    from ossconv.checkpoint import Checkpoint

    reads, hinted = [], []
    read_direct = Checkpoint.read_direct
    monkeypatch.setattr(Checkpoint, "cached", lambda self, weight: 0.0)
    monkeypatch.setattr(Checkpoint, "read_direct", lambda self, *a: reads.append(a[:2]) or read_direct(self, *a))
    monkeypatch.setattr(files, "will_need", lambda ranges: hinted.extend(ranges))
    convert(checkpoints[name], tmp_path / "cold", to="openai", dtype="mxfp4")
    assert_byte_identical(checkpoints["openai-mxfp4"], tmp_path / "cold")  # synthetic blocks come back exactly
    ckpt = open_checkpoint(checkpoints[name])
    assert sorted(reads) == sorted((w.float_name, e) for w in ckpt.expert_weights for e in range(w.num_experts))
    experts = [(info.file, info.offset, info.offset + info.nbytes) for info in map(ckpt.info, dict(reads))]
    assert hinted and not any(
        f == file and o < end and o + n > start for f, o, n in hinted for file, start, end in experts
    )


def test_cold_copies_go_past_the_page_cache_unhinted_to_the_same_bytes(checkpoints, monkeypatch, tmp_path):
    """A conversion that copies (MXFP4 OpenAI -> HF) copies tensors that are not cached by direct reads and
    writes, gives them no read-ahead hints (they would be read twice), and writes the same bytes."""
    from ossconv import files, writer
    from ossconv.convert import execute

    copies, hinted = [], []
    copy = writer.CheckpointWriter.copy
    monkeypatch.setattr(execute, "cached_share", lambda ranges: 0.0)
    monkeypatch.setattr(execute, "DIRECT_COPY_MIN", 1)
    monkeypatch.setattr(writer, "COPY_BUFFER", 8192)  # several reads ahead per tensor
    monkeypatch.setattr(
        writer.CheckpointWriter, "copy", lambda self, *a, **k: copies.append(k["direct"]) or copy(self, *a, **k)
    )
    monkeypatch.setattr(files, "will_need", lambda ranges: hinted.extend(ranges))
    convert(checkpoints["openai-mxfp4"], tmp_path / "cold", to="hf")
    assert_byte_identical(checkpoints["hf-mxfp4"], tmp_path / "cold")
    assert copies and all(copies) and not hinted


@pytest.mark.parametrize(
    ("name", "layout", "dtype"),
    [
        ("openai-mxfp4", "openai", None),
        ("hf-mxfp4", "hf", None),
        ("openai-bf16", "openai", "bf16"),
        ("hf-bf16", "hf", "bf16"),
    ],
)
def test_same_layout_same_precision_is_a_byte_identical_copy(checkpoints, name, layout, dtype, tmp_path):
    convert(checkpoints[name], tmp_path / "out", to=layout, dtype=dtype)
    assert_byte_identical(checkpoints[name], tmp_path / "out")


def test_float_experts_are_transposed_between_layouts(checkpoints, tmp_path):
    convert(checkpoints["openai-bf16"], tmp_path / "hf", to="hf")
    openai, hf = open_checkpoint(checkpoints["openai-bf16"]), open_checkpoint(tmp_path / "hf")
    for ours, theirs in zip(
        layouts.expert_weights("openai", openai.config), layouts.expert_weights("hf", hf.config), strict=True
    ):
        a, b = openai.get(ours.float_name), hf.get(theirs.float_name)
        assert b.shape == (a.shape[0], a.shape[2], a.shape[1])
        assert torch.equal(a.transpose(1, 2), b)


def test_hf_config_is_what_transformers_expects(checkpoints, tmp_path):
    from transformers import AutoConfig

    convert(checkpoints["openai-mxfp4"], tmp_path / "mxfp4", to="hf")
    convert(checkpoints["openai-mxfp4"], tmp_path / "bf16", to="hf", dtype="bf16")
    packed = json.loads((tmp_path / "mxfp4" / "config.json").read_text())
    assert packed["model_type"] == "gpt_oss"
    assert packed["quantization_config"]["quant_method"] == "mxfp4"
    assert packed["rope_scaling"]["truncate"] is False
    assert packed["layer_types"] == ["sliding_attention", "full_attention"]
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    loaded = AutoConfig.from_pretrained(tmp_path / "bf16")
    assert (loaded.num_local_experts, loaded.num_experts_per_tok, loaded.sliding_window) == (4, 2, 8)


def test_real_shard_name_quirks_are_read(checkpoints, tmp_path):
    # gpt-oss-20b's HF shards are numbered from zero; gpt-oss-120b's original shards have a double dash.
    folder = tmp_path / "hf20b"
    convert(checkpoints["hf-bf16"], folder, to="hf", max_shard_size=150_000)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    renames = {old: f"model-{i:05d}-of-{len(files) - 1:05d}.safetensors" for i, old in enumerate(files)}
    for old, new in renames.items():
        (folder / old).rename(folder / new)
    index["weight_map"] = {name: renames[file] for name, file in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    convert(folder, tmp_path / "from-20b", to="openai")
    assert_byte_identical(checkpoints["openai-bf16"], tmp_path / "from-20b")

    original = tmp_path / "original120b"
    convert(checkpoints["openai-mxfp4"], original, to="openai", max_shard_size=60_000)
    (original / "model.safetensors.index.json").unlink()  # the 120b original/ folder: shards, no index
    shards = sorted(original.glob("*.safetensors"))
    for i, shard in enumerate(shards, 1):
        shard.rename(original / f"model--{i:05d}-of-{len(shards):05d}.safetensors")
    convert(original, tmp_path / "from-120b", to="hf")
    convert(tmp_path / "from-120b", tmp_path / "back", to="openai")
    assert_byte_identical(checkpoints["openai-mxfp4"], tmp_path / "back")


def test_side_files_are_copied(checkpoints, copy_of, tmp_path):
    folder = copy_of(checkpoints["hf-mxfp4"], "with-tokenizer")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "notes.txt").write_text("not a model file")
    convert(folder, tmp_path / "out", to="openai")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["chat_template.jinja", "config.json", "dtypes.json", "model.safetensors", "tokenizer.json"]


def test_incomplete_source_is_refused_before_writing(checkpoints, copy_of, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(checkpoints["openai-mxfp4"], "incomplete")
    tensors = load_file(folder / "model.safetensors")
    del tensors["block.1.attn.qkv.bias"]
    save_file(tensors, folder / "model.safetensors")
    from ossconv.errors import CheckpointError

    with pytest.raises(CheckpointError, match="missing tensor block.1.attn.qkv.bias"):
        convert(folder, tmp_path / "out", to="hf")
    assert not (tmp_path / "out").exists()


def test_convert_command(run_cli, checkpoints, tmp_path):
    result = run_cli("convert", checkpoints["openai-mxfp4"], tmp_path / "hf", "--to", "hf", "--dtype", "bf16", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert (report["source_layout"], report["layout"], report["precision"]) == ("openai", "hf", "bf16")
    text = run_cli("convert", tmp_path / "hf", tmp_path / "openai", "--to", "openai")
    assert text.code == 0 and "(hf, bf16) ->" in text.out
    assert run_cli("convert", checkpoints["openai-mxfp4"], tmp_path / "x").code == 2  # --to is required
    shutil.rmtree(tmp_path / "hf")
