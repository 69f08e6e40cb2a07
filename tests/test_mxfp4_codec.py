"""The MXFP4 codec: golden bytes, exhaustive decode against two reference dequantizers, both encode rules
against their definitions (torchao's to_mx for floor; hand-computed triton_kernels ROUND_UP cases for up),
and round-trip properties."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ossconv.formats import mxfp4

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def all_bytes_all_scales() -> tuple[torch.Tensor, torch.Tensor]:
    """[256 scales, 16 blocks, 16]: every byte value under every scale byte."""
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).expand(256, 16, 16).contiguous()
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).contiguous()
    return blocks, scales


# ------------------------------------------------------------------------------------------ golden bytes


def test_low_nibble_holds_the_even_element():
    block = torch.zeros(1, 16, dtype=torch.uint8)
    block[0, 0] = 0xF1  # low nibble 1 (+0.5) is element 0, high nibble 15 (-6.0) is element 1
    values = mxfp4.decode(block, torch.tensor([128], dtype=torch.uint8), torch.float32)
    assert values[:3].tolist() == [1.0, -12.0, 0.0]


def test_encode_golden_block():
    x = torch.zeros(32)
    x[0], x[1], x[2], x[31] = 0.5, 1.0, -6.0, 3.0  # amax 6 -> d = 1.0 exactly -> scale byte 127
    blocks, scales = mxfp4.encode(x)
    assert scales.tolist() == [127]
    assert blocks.tolist() == [[0x21, 0x0F] + [0] * 13 + [0x50]]


@pytest.mark.parametrize(
    ("amax", "up_scale", "floor_scale"),
    [
        (6.0, 127, 127),  # a power of two after /6: up keeps it
        (6.5, 128, 127),  # up rounds 1.083 up to 2
        (1.0, 125, 125),  # up: 1/6 -> 0.25; floor: 2^(0-2)
        (7.0, 128, 127),  # floor saturates 7 -> 6, up never saturates
        (3.0e38, 253, 252),  # near the fp32 maximum
    ],
)
def test_scale_rules_golden(amax, up_scale, floor_scale):
    x = torch.zeros(32)
    x[5] = amax
    assert mxfp4.encode(x, "up")[1].item() == up_scale
    assert mxfp4.encode(x, "floor")[1].item() == floor_scale


def test_ties_round_to_even_code():
    x = torch.tensor(
        [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2 + [-0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0] * 2
    )
    blocks, scales = mxfp4.encode(x)  # amax 6 -> scale 1.0: the values are the codes' midpoints
    assert scales.item() == 127
    codes = torch.stack([blocks[0] & 0xF, blocks[0] >> 4], -1).view(-1).tolist()
    assert codes[:8] == [0, 2, 2, 4, 4, 6, 6, 7]
    assert codes[16:24] == [8, 10, 10, 12, 12, 14, 14, 15]


def test_floor_saturates_and_up_does_not():
    x = torch.zeros(32)
    x[0], x[1] = 7.0, 5.5
    floor_blocks, _ = mxfp4.encode(x, "floor")  # scale 1: 7 -> clamp 6 (code 7), 5.5 -> 6 (code 7)
    up_blocks, _ = mxfp4.encode(x, "up")  # scale 2: 3.5 -> 4 (code 6), 2.75 -> 3 (code 5)
    assert floor_blocks[0, 0].item() == 0x77
    assert up_blocks[0, 0].item() == 0x56


def test_zero_block_and_negative_zero():
    x = torch.zeros(64)
    x[33] = -0.0
    blocks, scales = mxfp4.encode(x.to(torch.bfloat16))
    assert scales.tolist() == [0, 0]
    assert blocks[0].tolist() == [0] * 16
    assert blocks[1].tolist() == [0x80] + [0] * 15  # element 33 = odd element of byte 0 of block 1: code 8


def test_tiny_block_takes_the_smallest_normal_scale():
    # amax 2^-130: d = amax/6 is an fp32 subnormal, rounded up to 2^-126 (byte 1); q = 2^-4 -> code 0.
    x = torch.zeros(32, dtype=torch.bfloat16)
    x[3] = 2.0**-130
    blocks, scales = mxfp4.encode(x)
    assert scales.tolist() == [1]
    assert blocks.tolist() == [[0] * 16]


def test_nan_and_inf_are_refused_with_their_position():
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in DTYPES:
            x = torch.ones(2, 64, dtype=dtype)
            x[1, 40] = bad
            with pytest.raises(mxfp4.NonFiniteError, match=r"1 NaN/Inf value\(s\) \(first at flat index 104\)"):
                mxfp4.encode(x)


def test_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="not a multiple of the MXFP4 block size"):
        mxfp4.encode(torch.ones(3, 48))
    with pytest.raises(ValueError, match="cannot encode torch.int32"):
        mxfp4.encode(torch.ones(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not match blocks shape"):
        mxfp4.decode(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------ decode oracles


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_transformers_for_every_byte_and_scale(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = all_bytes_all_scales()
    ours = mxfp4.decode(blocks, scales, dtype)
    # transformers returns [E, in, out]: undo its transpose before comparing bytes
    theirs = convert_moe_packed_tensors(blocks.unsqueeze(0), scales.unsqueeze(0), dtype=dtype)[0].transpose(0, 1)
    assert torch.equal(bits(ours), bits(theirs))
    assert torch.isinf(ours[255]).sum() > 0 and not torch.isnan(ours).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_openai_reference_for_every_byte_and_scale(dtype, tmp_path):
    from gpt_oss.torch.weights import Checkpoint
    from safetensors.torch import save_file

    blocks, scales = all_bytes_all_scales()
    save_file({"b.blocks": blocks, "b.scales": scales}, tmp_path / "m.safetensors")
    reference = Checkpoint(str(tmp_path), torch.device("cpu"))
    theirs = reference._get_mxfp4_tensor("b.blocks", "b.scales", dtype=dtype)
    assert torch.equal(bits(mxfp4.decode(blocks, scales, dtype)), bits(theirs))


def test_decode_reuses_the_out_buffer():
    blocks, scales = all_bytes_all_scales()
    out = torch.empty(256, 16 * 32, dtype=torch.bfloat16)
    assert mxfp4.decode(blocks, scales, out=out) is out
    with pytest.raises(ValueError, match="out must be"):
        mxfp4.decode(blocks, scales, out=torch.empty(3, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_decode_equals_decode_then_transpose_for_every_byte_and_scale(dtype, monkeypatch):
    """HF's [in, out] experts are decoded in place of decode-then-transpose: every byte under every scale
    lands where the transpose puts it, with 72 rows (a 32-column tile cut short) split over two threads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(mxfp4, "_CHUNK_BLOCKS", 16)  # two ranges of rows, neither a multiple of 32
    blocks, scales = all_bytes_all_scales()  # 4096 blocks: every byte under every scale
    blocks, scales = blocks.view(-1, 16)[1000:1216].reshape(72, 3, 16), scales.view(-1)[1000:1216].reshape(72, 3)
    out = torch.full((3 * 32, 72), float("nan"), dtype=dtype)
    assert mxfp4.decode_transposed(blocks, scales, out=out) is out
    assert torch.equal(bits(out), bits(mxfp4.decode(blocks, scales, dtype).T.contiguous()))
    whole_blocks, whole_scales = all_bytes_all_scales()
    rows = whole_scales.numel()
    wide = mxfp4.decode_transposed(
        whole_blocks.view(rows, 1, 16), whole_scales.view(rows, 1), torch.empty(32, rows, dtype=dtype)
    )
    assert torch.equal(
        bits(wide), bits(mxfp4.decode(whole_blocks.view(rows, 1, 16), whole_scales.view(rows, 1), dtype).T)
    )
    with pytest.raises(ValueError, match="out must be"):
        mxfp4.decode_transposed(blocks, scales, out=torch.empty(72, 96, dtype=dtype))


# ------------------------------------------------------------------------------------------ encode oracles


def max_code_magnitude(blocks: torch.Tensor) -> torch.Tensor:
    """Largest |code| (0-7) per block of ``[..., G, 16]``, code by code: below 6 (value 4.0) a block has a
    second encoding."""
    return torch.maximum(blocks & 0x07, (blocks >> 4) & 0x07).amax(-1)


def inf_blocks(scales: torch.Tensor, largest_code: torch.Tensor) -> torch.Tensor:
    """Which blocks decode to +-Inf in bf16/fp32, from their scale bytes and largest |code|."""
    return ((scales == mxfp4.INF_SCALE) & (largest_code > 0)) | (
        (scales == mxfp4.HALF_INF_SCALE) & (largest_code >= mxfp4.HALF_INF_MIN_CODE)
    )


def hard_inputs(rows: int, seed: int) -> torch.Tensor:
    """Rows of 32 spanning 2^-140 .. 2^120 per block, with exact ties, zeros, -0.0 and subnormals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 32, generator=g) * torch.exp2(torch.randint(-140, 120, (rows, 1), generator=g).float())
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    x[: rows // 4, :8] = ties * torch.exp2(torch.randint(-20, 20, (rows // 4, 1), generator=g).float())
    x[rows // 4 : rows // 2, ::3] = 0.0
    x[rows // 2 : rows // 2 + 8] = -0.0
    x[-8:] = torch.randn(8, 32, generator=g) * 1e-40  # fp32 subnormals
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_floor_rule_matches_torchao_to_mx(dtype):
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    x = hard_inputs(8192, seed=1).to(dtype)
    scale, data = to_mx(x.reshape(64, -1), torch.float4_e2m1fn_x2, 32)
    blocks, scales = mxfp4.encode(x, "floor")
    assert torch.equal(scales.view(-1), scale.view(torch.uint8).view(-1))
    assert torch.equal(blocks.view(-1), data.view(torch.uint8).view(-1))


def _f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def up_rule_reference(block: list[float]) -> tuple[list[int], int]:
    """triton_kernels downcast_to_mxfp_torch ROUND_UP restated on Python floats, one block at a time."""
    amax = max(abs(v) for v in block)
    d = np.float32(amax) / np.float32(6.0)
    d_bits = int(np.array([d], dtype=np.float32).view(np.int32)[0])
    rounded = ((d_bits + 0x7FFFFF) & 0x7F800000) & 0xFFFFFFFF
    scale = rounded >> 23
    step = struct.unpack("<f", struct.pack("<I", rounded))[0]
    codes = []
    for v in block:
        q = _f32(v * (0.0 if step == 0 else 1.0 / step))  # exact: a power of two; keeps the sign of -0.0
        magnitude = min(range(8), key=lambda c: (abs(abs(q) - mxfp4.FP4_VALUES[c]), c % 2))
        codes.append(magnitude | (8 if math.copysign(1.0, q) < 0 else 0))
    return codes, scale


def test_up_rule_matches_its_definition_block_by_block():
    x = hard_inputs(1024, seed=2)
    blocks, scales = mxfp4.encode(x, "up")
    for row in range(x.shape[0]):
        codes, scale = up_rule_reference([float(v) for v in x[row]])
        packed = [codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(16)]
        assert (blocks[row, 0].tolist(), scales[row, 0].item()) == (packed, scale), f"row {row}: {x[row].tolist()}"


@pytest.mark.parametrize("rule", mxfp4.RULES)
@pytest.mark.parametrize("seed", [3, 4])
def test_bf16_fast_path_equals_fp32_path(rule, seed):
    g = torch.Generator().manual_seed(seed)
    random_bits = torch.randint(-(2**15), 2**15, (4096, 32), generator=g, dtype=torch.int16)
    x = random_bits.view(torch.bfloat16)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    x = torch.cat([x, hard_inputs(4096, seed).to(torch.bfloat16)])
    fast = mxfp4.encode(x, rule)
    slow = mxfp4.encode(x.float(), rule)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def every_code_below_each_scale(seed: int) -> torch.Tensor:
    """bf16 blocks, one per (largest magnitude, run of 31 lower magnitudes): for largest magnitudes of every
    exponent, the 31 * 29 magnitudes below each cover every code and rounding tie the scale can give, with
    random signs."""
    g = torch.Generator().manual_seed(seed)
    exponents = torch.arange(255).repeat_interleave(4)
    ends = torch.tensor([[0, 127]]).expand(255, 2)
    mantissas = torch.cat([ends, torch.randint(0, 128, (255, 2), generator=g)], dim=1).reshape(-1)
    largest = exponents << 7 | mantissas
    below = largest.view(-1, 1, 1) - torch.arange(1, 31 * 29 + 1).view(1, 29, 31)
    blocks = torch.cat([largest.view(-1, 1, 1).expand(-1, 29, 1), below.clamp(min=0)], dim=-1).reshape(-1, 32)
    signs = torch.randint(0, 2, blocks.shape, generator=g) << 15
    return (blocks | signs).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("rule", mxfp4.RULES)
def test_bf16_fast_path_equals_fp32_path_for_every_code_of_every_scale(rule):
    x = every_code_below_each_scale(5)
    fast = mxfp4.encode(x, rule)
    slow = mxfp4.encode(x.float(), rule)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("rule", mxfp4.RULES)
def test_transposed_bf16_view_encodes_in_place_as_its_copy(rule, monkeypatch):
    """HF stores experts [in, out]; encode reads the transposed view without copying it. Blocks run down
    its columns: a transpose or tile mistake changes the bytes. 72 outputs: a tile of 32 is cut short."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # split the columns over threads
    g = torch.Generator().manual_seed(6)
    stored = (torch.randn(mxfp4._CHUNK_BLOCKS // 8, 72, generator=g) * 0.02).to(torch.bfloat16)  # [in, out]
    stored[64:96, 5] = 0.0  # a zero block
    stored[96:128, 7] = torch.linspace(1e-37, 1e-39, 32)  # a block for the fp32 path
    stored[128:160, 9] = every_code_below_each_scale(7)[1000]
    view = stored.T
    assert not view.is_contiguous()
    encoded = mxfp4.encode(view, rule)
    copied = mxfp4.encode(view.contiguous(), rule)
    reference = mxfp4.encode(view.float(), rule)
    for a, b in ((encoded, copied), (encoded, reference)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert 0 < encoded[1][7, 3] < 3  # the fp32 path was taken
    stored[200, 70] = float("inf")
    stored[300, 3] = float("nan")
    first = 3 * stored.shape[0] + 300  # row 3 of the [out, in] view
    with pytest.raises(mxfp4.NonFiniteError, match=rf"2 NaN/Inf value\(s\) \(first at flat index {first}\)"):
        mxfp4.encode(view, rule)


# ------------------------------------------------------------------------------------------ properties

packed_blocks = arrays(np.uint8, (4, 16))
usable_scales = arrays(np.uint8, (4,), elements=st.integers(1, 254))
# The smallest scales cannot round-trip: both rules give a nonzero block a divisor of at least 2^-126
# (triton rounds d up to the smallest normal; torchao divides by 2^-126 even where it writes scale byte 0,
# which it does for every block with amax below 2^-125).
MIN_ROUND_TRIP_SCALE = {"up": 1, "floor": 4}


def round_trip_scales(scales: np.ndarray, rule: str) -> torch.Tensor:
    return torch.from_numpy(np.maximum(scales, MIN_ROUND_TRIP_SCALE[rule]))


@settings(max_examples=300, deadline=None)
@given(packed_blocks, usable_scales, st.sampled_from(mxfp4.RULES), st.sampled_from([torch.bfloat16, torch.float32]))
def test_decode_encode_decode_is_identity(blocks, scales, rule, dtype):
    blocks, scales = torch.from_numpy(blocks), round_trip_scales(scales, rule)
    values = mxfp4.decode(blocks, scales, dtype).view(4, 32)
    finite = torch.isfinite(values).all(-1)
    values = values[finite]
    again = mxfp4.decode(*mxfp4.encode(values, rule), dtype)
    assert torch.equal(bits(again.view(-1)), bits(values.reshape(-1)))


@settings(max_examples=300, deadline=None)
@given(packed_blocks, usable_scales, st.sampled_from(mxfp4.RULES))
def test_encode_recovers_the_bytes_of_canonical_blocks(blocks, scales, rule):
    blocks, scales = torch.from_numpy(blocks), round_trip_scales(scales, rule)
    blocks[:, 5] = (blocks[:, 5] & 0xF0) | 0x07  # largest magnitude 6.0 in every block: the canonical form
    values = mxfp4.decode(blocks, scales, torch.float32).view(4, 32)
    finite = torch.isfinite(values).all(-1)
    new_blocks, new_scales = mxfp4.encode(values[finite], rule)
    assert torch.equal(new_blocks.view(-1, 16), blocks[finite]) and torch.equal(new_scales.view(-1), scales[finite])


def test_non_canonical_block_has_a_second_encoding():
    blocks = torch.full((1, 16), 0x11, dtype=torch.uint8)  # every element 0.5: largest code below 4.0
    values = mxfp4.decode(blocks, torch.tensor([130], dtype=torch.uint8), torch.float32)
    new_blocks, new_scales = mxfp4.encode(values)
    assert new_scales.item() == 127  # 0.5 * 2^3 = 4.0 * 2^0: same values, other bytes
    assert torch.equal(mxfp4.decode(new_blocks, new_scales, torch.float32), values)
    assert max_code_magnitude(new_blocks).item() == 6


def test_docstring_examples():
    import doctest

    assert doctest.testmod(mxfp4).failed == 0


def test_large_tensors_split_across_threads_give_the_same_bytes_and_errors(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # split over threads even on a 1-core runner
    g = torch.Generator().manual_seed(9)
    rows = 3 * mxfp4._CHUNK_BLOCKS + 123  # several chunks: the work is split over threads
    blocks = torch.randint(0, 256, (rows, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (rows,), generator=g, dtype=torch.uint8)
    whole = mxfp4.decode(blocks, scales)
    pieces = torch.cat([mxfp4.decode(blocks[i : i + 1000], scales[i : i + 1000]) for i in range(0, rows, 1000)])
    assert torch.equal(bits(whole), bits(pieces))
    x = whole.view(rows, 32)
    encoded = mxfp4.encode(x)
    for i in range(0, rows, 5000):
        part = mxfp4.encode(x[i : i + 5000])
        assert torch.equal(encoded[0][i : i + 5000], part[0]) and torch.equal(encoded[1][i : i + 5000], part[1])
    x[rows - 2, 7] = float("nan")
    with pytest.raises(mxfp4.NonFiniteError, match=rf"first at flat index {(rows - 2) * 32 + 7}\)"):
        mxfp4.encode(x)


def test_block_counts_equal_counting_each_code(monkeypatch):
    """The word-wide counts of inspect --stats equal counting every block's largest code (today's statistics),
    across chunks and threads, with signed zeros, every largest magnitude and the scales that decode to Inf."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = torch.Generator().manual_seed(5)
    rows = 2 * mxfp4._CHUNK_BLOCKS + 77
    codes = torch.randint(0, 16, (rows, 32), generator=g, dtype=torch.uint8)
    ceiling = torch.randint(0, 8, (rows, 1), generator=g, dtype=torch.uint8)  # largest magnitude of each block
    ceiling[[0, rows // 2, rows - 1]] = 0  # +-0 blocks where the ranges of the two threads start and end
    codes = (codes & 0x08) | torch.minimum(codes & 0x07, ceiling)  # ceiling 0: +-0 only
    blocks = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scales = torch.randint(0, 256, (rows,), generator=g, dtype=torch.uint8)
    scales[::5] = 254
    scales[1::7] = 255
    counts = mxfp4.count_blocks(blocks.view(1, rows, 16), scales.view(1, rows))

    largest = max_code_magnitude(blocks)
    assert torch.equal(counts.scale_histogram, torch.bincount(scales.long(), minlength=256))
    assert counts.zero == int((largest == 0).sum()) > 0
    assert counts.second_encoding == int(((largest > 0) & (largest < 6)).sum()) > 0
    assert counts.inf == int(inf_blocks(scales, largest).sum()) > 0
    assert counts.zero + counts.second_encoding + int((largest >= 6).sum()) == rows
