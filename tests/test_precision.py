"""pack / unpack in both layouts, checked against the reference loaders we did not write."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import raw

from ossconv import pack, unpack
from ossconv.checkpoint import open_checkpoint
from ossconv.errors import CheckpointError, OssconvError
from ossconv.formats import layouts

TOKENS = torch.tensor([3, 17, 200, 5, 9, 31, 64, 1, 2, 250, 128, 77, 6, 42, 99, 11, 13, 180])  # > sliding window


def assert_same_non_expert_bytes(a, b):
    experts = set()
    for weight in layouts.expert_weights(a.layout, a.config):
        experts |= {weight.blocks, weight.scales, weight.float_name}
    names = [n for n in a.tensors if n not in experts]
    assert names == [n for n in b.tensors if n not in experts]
    for name in names:
        assert raw(a.get(name)) == raw(b.get(name)), name


def oracle_values(ckpt, weight) -> torch.Tensor:
    """An MXFP4 weight's values, decoded by transformers' ``convert_moe_packed_tensors`` ([E, in, out], fp32)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(ckpt.get(weight.blocks), ckpt.get(weight.scales), dtype=torch.float32)


@pytest.mark.parametrize("layout", ["openai", "hf"])
def test_unpack_then_pack_restores_the_bytes(layout, checkpoints, tmp_path):
    source = checkpoints[f"{layout}-mxfp4"]
    unpack(source, tmp_path / "bf16", dtype="bf16")
    pack(tmp_path / "bf16", tmp_path / "mxfp4")
    a, b = open_checkpoint(source), open_checkpoint(tmp_path / "mxfp4")
    assert list(a.tensors) == list(b.tensors)
    for weight in a.expert_weights:  # transformers' dequantizer, not ours, says the values are the same
        assert torch.equal(oracle_values(a, weight), oracle_values(b, weight)), weight.blocks
    # Blocks whose largest code is 4 or 6 must come back byte for byte; the rest have the same values.
    for weight in layouts.expert_weights(a.layout, a.config):
        original, repacked = a.get(weight.blocks), b.get(weight.blocks)
        largest = torch.maximum(original & 7, (original >> 4) & 7).amax(-1)
        canonical = largest >= 6
        assert torch.equal(original[canonical], repacked[canonical])
        assert torch.equal(a.get(weight.scales)[canonical], b.get(weight.scales)[canonical])
    assert_same_non_expert_bytes(a, b)


@pytest.mark.parametrize("layout", ["openai", "hf"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_unpack_keeps_layout_and_other_tensors(layout, dtype, checkpoints, tmp_path):
    result = unpack(checkpoints[f"{layout}-mxfp4"], tmp_path / "out", dtype=dtype)
    assert (result.layout, result.precision) == (layout, dtype)
    a, b = open_checkpoint(checkpoints[f"{layout}-mxfp4"]), open_checkpoint(tmp_path / "out")
    assert (b.layout, b.precision.value) == (layout, dtype)
    assert_same_non_expert_bytes(a, b)
    if layout == "hf":
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert "quantization_config" not in config
        assert config["torch_dtype"] == ("float32" if dtype == "fp32" else "bfloat16")
    else:
        dtypes = json.loads((tmp_path / "out" / "dtypes.json").read_text())
        assert dtypes["block.0.mlp.mlp1_weight"] == {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[dtype]


def test_unpacked_hf_experts_equal_transformers_dequantizer(checkpoints, tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    unpack(checkpoints["hf-mxfp4"], tmp_path / "out", dtype="fp32")
    source, ours = open_checkpoint(checkpoints["hf-mxfp4"]), open_checkpoint(tmp_path / "out")
    for weight in layouts.expert_weights("hf", source.config):
        theirs = convert_moe_packed_tensors(source.get(weight.blocks), source.get(weight.scales), dtype=torch.float32)
        mine = ours.get(weight.float_name)
        assert mine.shape == theirs.shape == (weight.num_experts, weight.in_features, weight.out_features)
        assert raw(mine) == raw(theirs.contiguous()), weight.float_name


def test_unpacked_openai_experts_equal_openai_checkpoint_reader(checkpoints, tmp_path):
    from gpt_oss.torch.weights import Checkpoint

    unpack(checkpoints["openai-mxfp4"], tmp_path / "out", dtype="bf16")
    reference = Checkpoint(str(checkpoints["openai-mxfp4"]), torch.device("cpu"))
    ours = open_checkpoint(tmp_path / "out")
    for weight in layouts.expert_weights("openai", ours.config):
        assert raw(ours.get(weight.float_name)) == raw(reference.get(weight.float_name)), weight.float_name


def test_transformers_gives_identical_logits_on_mxfp4_source_and_our_bf16(checkpoints, tmp_path):
    from transformers import GptOssForCausalLM

    unpack(checkpoints["hf-mxfp4"], tmp_path / "bf16", dtype="bf16")
    logits = []
    for folder in (checkpoints["hf-mxfp4"], tmp_path / "bf16"):
        model = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            logits.append(model(TOKENS[None]).logits[0])
    assert torch.equal(logits[0], logits[1])


def test_openai_reference_gives_identical_logits_after_unpack_and_pack(checkpoints, tmp_path):
    from gpt_oss.torch.model import Transformer

    unpack(checkpoints["openai-mxfp4"], tmp_path / "bf16")
    pack(tmp_path / "bf16", tmp_path / "mxfp4")
    logits = []
    for folder in (checkpoints["openai-mxfp4"], tmp_path / "mxfp4"):
        model = Transformer.from_checkpoint(str(folder), device=torch.device("cpu"))
        with torch.no_grad():
            logits.append(model(TOKENS))
    assert torch.equal(logits[0], logits[1])


def test_pack_floor_rule_agrees_with_torchao(checkpoints, tmp_path):
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    pack(checkpoints["openai-bf16"], tmp_path / "out", rule="floor")
    source, ours = open_checkpoint(checkpoints["openai-bf16"]), open_checkpoint(tmp_path / "out")
    for weight in layouts.expert_weights("openai", source.config):
        scale, data = to_mx(source.get(weight.float_name).contiguous(), torch.float4_e2m1fn_x2, 32)
        assert raw(ours.get(weight.scales)) == raw(scale.view(torch.uint8))
        assert raw(ours.get(weight.blocks)) == raw(data.view(torch.uint8))


def test_pack_refuses_nan_naming_tensor_and_expert(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "src"
    import shutil

    shutil.copytree(checkpoints["hf-bf16"], folder)
    ckpt = open_checkpoint(folder)
    info = ckpt.info("model.layers.1.mlp.experts.down_proj")
    tensors = load_file(info.file)
    tensors["model.layers.1.mlp.experts.down_proj"][2, 5, 7] = float("nan")
    save_file(tensors, info.file)
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.experts.down_proj expert 2: 1 NaN/Inf value"):
        pack(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_nothing_to_do_is_an_error(checkpoints, tmp_path):
    with pytest.raises(OssconvError, match="already MXFP4"):
        pack(checkpoints["openai-mxfp4"], tmp_path / "out")
    with pytest.raises(OssconvError, match="already bf16"):
        unpack(checkpoints["openai-bf16"], tmp_path / "out", dtype="bf16")


def test_output_may_not_overlap_the_source(checkpoints, copy_of):
    folder = copy_of(checkpoints["openai-mxfp4"])
    with pytest.raises(OssconvError, match="must not overlap the source"):
        unpack(folder, folder / "inside", overwrite=True)
    with pytest.raises(OssconvError, match="must not overlap the source"):
        unpack(folder, folder, overwrite=True)


def test_a_transformers_5_full_fine_tune_packs_in_both_layouts_and_loads_in_openai_reference(tmp_path):
    """What transformers 5.x save_pretrained writes (config with rope_parameters, dtype, swiglu_alpha)."""
    from gpt_oss.torch.model import Transformer
    from transformers import GptOssConfig, GptOssForCausalLM

    from ossconv import convert
    from ossconv.verify import model

    config = GptOssConfig(
        hidden_size=64,
        intermediate_size=96,
        head_dim=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=256,
        sliding_window=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    tuned = GptOssForCausalLM(config)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.copy_(0.05 * torch.randn_like(parameter))
    tuned.to(torch.bfloat16).save_pretrained(tmp_path / "tuned")
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert "rope_parameters" in saved and "dtype" in saved and "swiglu_alpha" in saved
    pack(tmp_path / "tuned", tmp_path / "hf-mxfp4")
    convert(tmp_path / "tuned", tmp_path / "openai-mxfp4", to="openai", dtype="mxfp4")
    a, b = open_checkpoint(tmp_path / "hf-mxfp4"), open_checkpoint(tmp_path / "openai-mxfp4")
    assert (a.precision.value, b.precision.value) == ("mxfp4", "mxfp4") and not a.problems() and not b.problems()
    tokens = torch.tensor([3, 17, 200, 5, 9, 31, 64, 1, 2, 250, 128, 77])
    reference = Transformer.from_checkpoint(str(tmp_path / "openai-mxfp4"), device=torch.device("cpu")).float()
    with torch.no_grad():
        theirs = reference(tokens)
    assert (model.forward(b, tokens) - theirs).abs().max().item() < 1e-3
    assert torch.equal(model.forward(a, tokens), model.forward(b, tokens))  # the two layouts hold the same model
