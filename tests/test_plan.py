"""The plan is pure: built from headers and config alone (here: a Checkpoint whose files do not exist), it
says which bytes go where. Each test here could fail on a wrong split, transpose or order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import WIDER

from ossconv import reshard
from ossconv.checkpoint import Checkpoint
from ossconv.convert.plan import ByteRange, Copy, Reencode, plan
from ossconv.convert.target import ExpertForm, Target, WriteOptions
from ossconv.errors import CheckpointError, OssconvError
from ossconv.files import TensorInfo
from ossconv.formats import layouts
from ossconv.formats.precision import Precision

NOWHERE = Path("/nonexistent/ossconv-plan-test")


def header_only(layout: str, precision: Precision) -> Checkpoint:
    """A checkpoint that exists only as headers: every tensor placed back to back in one absent file."""
    tensors, offset = {}, 0
    for spec in layouts.layout_specs(layout, WIDER, precision):
        tensors[spec.name] = TensorInfo(
            spec.name, spec.shape, spec.dtype, NOWHERE / "model.safetensors", offset, spec.nbytes
        )
        offset += spec.nbytes
    raw = WIDER.to_openai() if layout == "openai" else WIDER.to_hf(mxfp4=precision is Precision.MXFP4)
    return Checkpoint(NOWHERE, layout, WIDER, raw, tensors)


def steps_by_name(p) -> dict[str, Copy | Reencode]:
    found = {}
    for step in p.steps:
        found[step.target if isinstance(step, Copy) else step.target.float_name] = step
    return found


def test_openai_to_hf_splits_qkv_rows_and_copies_mxfp4_bytes():
    source = header_only("openai", Precision.MXFP4)
    p = plan(source, Target("hf", Precision.MXFP4))
    assert all(isinstance(step, Copy) for step in p.steps)
    steps = steps_by_name(p)
    qkv = source.info("block.1.attn.qkv.weight")
    row = WIDER.hidden_size * 2  # bf16 bytes per row
    q_rows, kv_rows = WIDER.q_dim, WIDER.kv_dim  # 144 and 48: not the hidden size 96
    assert steps["model.layers.1.self_attn.q_proj.weight"].sources == (ByteRange(qkv, 0, q_rows * row),)
    assert steps["model.layers.1.self_attn.k_proj.weight"].sources == (ByteRange(qkv, q_rows * row, kv_rows * row),)
    assert steps["model.layers.1.self_attn.v_proj.weight"].sources == (
        ByteRange(qkv, (q_rows + kv_rows) * row, kv_rows * row),
    )
    out = {s.name: s for s in p.specs}
    assert out["model.layers.1.self_attn.o_proj.weight"].shape == (WIDER.hidden_size, WIDER.q_dim)
    blocks = source.info("block.2.mlp.mlp1_weight.blocks")
    assert steps["model.layers.2.mlp.experts.gate_up_proj_blocks"].sources == (ByteRange(blocks, 0, blocks.nbytes),)
    assert [s.name for s in p.specs] == [s.name for s in layouts.layout_specs("hf", WIDER, Precision.MXFP4)]
    assert p.json_files["config.json"]["quantization_config"]["quant_method"] == "mxfp4"


def test_hf_to_openai_fuses_qkv_in_q_k_v_order():
    source = header_only("hf", Precision.BF16)
    p = plan(source, Target("openai", Precision.BF16))
    fused = steps_by_name(p)["block.0.attn.qkv.bias"]
    assert [piece.tensor.name for piece in fused.sources] == [
        f"model.layers.0.self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")
    ]
    # float experts change orientation between the layouts: re-encoded, [E, out, in] in OpenAI's
    reencoded = [step for step in p.steps if isinstance(step, Reencode)]
    assert len(reencoded) == 2 * WIDER.num_hidden_layers
    out = {s.name: s for s in p.specs}
    assert out["block.0.mlp.mlp1_weight"].shape == (WIDER.num_experts, 2 * WIDER.intermediate_size, WIDER.hidden_size)
    assert "dtypes.json" in p.json_files and p.json_files["dtypes.json"]["block.0.mlp.mlp1_weight"] == "BF16"


def test_expert_range_in_split_form_copies_only_those_experts():
    source = header_only("openai", Precision.MXFP4)
    p = plan(source, Target("openai", Precision.MXFP4, experts=ExpertForm.SPLIT, expert_range=range(2, 4)))
    names = [s.name for s in p.specs if ".experts." in s.name]
    assert {layouts.parse_split_name(n)[1] for n in names} == {2, 3}
    blocks = source.info("block.0.mlp.mlp2_weight.blocks")
    per_expert = blocks.nbytes // WIDER.num_experts
    third = steps_by_name(p)["block.0.mlp.experts.3.mlp2_weight.blocks"]
    assert third.sources == (ByteRange(blocks, 3 * per_expert, per_expert),)


def test_conflicting_requests_are_refused_by_the_library(tmp_path):
    with pytest.raises(CheckpointError, match="splitting experts keeps layout and precision"):
        plan(header_only("openai", Precision.MXFP4), Target("hf", Precision.MXFP4, experts=ExpertForm.SPLIT))
    with pytest.raises(OssconvError, match="split form only"):
        Target("openai", Precision.MXFP4, expert_range=range(2))
    with pytest.raises(OssconvError, match="unknown layout 'gguf'"):
        Target("gguf", Precision.MXFP4)
    with pytest.raises(OssconvError, match="max_shard_size"):
        WriteOptions(max_shard_size=0)
    with pytest.raises(OssconvError, match="expert-parallel ranks hold split experts"):
        reshard(tmp_path / "never-read", tmp_path / "out", experts="fused", ep_ranks=2)


def test_precision_spellings_meet_in_one_value():
    assert Precision.parse("bfloat16") is Precision.parse("bf16") is Precision.of_dtype(torch.bfloat16)
    assert Precision.FP16.config_name == "float16" and Precision.FP32.torch_dtype == torch.float32
    assert not Precision.MXFP4.is_float
    with pytest.raises(ValueError, match="unknown precision"):
        Precision.parse("int4")
