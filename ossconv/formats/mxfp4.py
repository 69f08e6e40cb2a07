"""MXFP4 codec: 32 FP4 (E2M1) elements share one E8M0 scale byte.

Encoding (the one gpt-oss ships, OCP MX v1.0 element order):
- ``blocks`` ``[..., G, 16]`` uint8: byte ``j`` of a block holds element ``2j`` in its **low** nibble and
  element ``2j+1`` in its high nibble; a block covers 32 consecutive elements of the last axis.
- ``scales`` ``[..., G]`` uint8: value ``2 ** (s - 127)``. Scale 255 is not treated as NaN: like OpenAI's and
  transformers' dequantizers we compute ``ldexp`` (nonzero codes become +-inf, zeros stay +-0).
- FP4 code ``c``: bit 3 is the sign, bits 0-2 index ``0, .5, 1, 1.5, 2, 3, 4, 6`` (code 8 is -0.0).

Decoding is a lookup of a 65536-entry table indexed by ``(scale << 8) | byte`` that holds both decoded
elements of the byte; the table is built with the same ``torch.ldexp`` the reference dequantizers use, so
the result is bit-identical with them in every dtype, inf and subnormal cases included.

Encoding has two scale rules (elements are always rounded to nearest, ties to even, saturating at +-6):
- ``up`` (default): triton_kernels ``downcast_to_mxfp_torch`` ROUND_UP, what OpenAI's and transformers'
  quantizers use: ``d = amax / 6`` in fp32, rounded up to a power of two on its bits; scale byte = its
  exponent field; elements are ``x * (1 / d)``. A block of zeros gets scale byte 0 and codes 0 (8 for -0.0).
  Never saturates.
- ``floor``: OCP MX v1.0 as torchao ``to_mx`` (FLOOR) computes it: scale exponent
  ``floor(log2 amax) - 2`` clamped to [-127, 127]; elements are ``x / max(2**e, 2**-126)`` (torchao clamps
  the divisor to the smallest fp32 normal), clamped to +-6.
Inputs with NaN or Inf raise :class:`NonFiniteError`: no rule gives them a meaning that survives a round trip.
fp32 and bf16 subnormal inputs are encoded like any other value (exactly as the oracles do in fp32).

Round trips (tested as properties): for bf16 and fp32, ``decode(encode(decode(b, s))) == decode(b, s)`` bit
for bit whenever the decoded block is finite and its scale byte is at least 1 (rule ``up``) or 4 (``floor``),
and ``encode(decode(b, s)) == (b, s)`` when, in addition, the block's largest |code| is 4.0 or 6.0. The
smallest scales cannot round-trip under either rule, by the rules' own definitions: ``up`` rounds a
subnormal ``d`` up to 2^-126, and torchao divides by 2^-126 even where it writes scale byte 0.

Both rules run a fast path for bf16 input (:mod:`ossconv.formats.mxfp4_compiled`, compiled loops) that never
leaves integers: because the scale is a power of two, an element's code depends only on its exponent
relative to the scale and its 7 mantissa bits. It also reads HF's ``[in, out]`` experts in place (``x`` a
transposed view), blocks down the columns. Blocks whose scale is so small that an element divided by it
could be an fp32 subnormal take the plain fp32 path, which every other input dtype takes too; the tests
check that both paths agree bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ossconv.formats.precision import FLOAT_DTYPES  # the dtypes decode writes and encode reads
from ossconv.parallel import in_parallel

BLOCK_SIZE = 32  # elements per scale
BYTES_PER_BLOCK = 16  # two FP4 codes per byte
E8M0_BIAS = 127
F4_E2M1_MAX = 6.0
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
RULES = ("up", "floor")
# Scale bytes whose blocks overflow the float range when decoded: 2^128 times any nonzero code is Inf, and
# 2^127 times a code of magnitude >= 2.0 (index 4) is Inf too.
INF_SCALE = 255
HALF_INF_SCALE = 254
HALF_INF_MIN_CODE = 4  # bit 2 of a magnitude: the compiled counts test that bit
# Rows of 32 elements handled per step: bounds temporary memory to a few MB whatever the tensor size.
_CHUNK_BLOCKS = 1 << 15
# bf16 fast path: q exponents 2^-3 .. 2^3 get a code of their own (below: code 0, above: saturated code 7).
_FAST_MIN_EXP = -3
# The fast path is exact while every q = x * 2^-k is an fp32 normal or rounds to code 0 anyway: scale
# exponents from -124 up, scale bytes from 3 up.
_FAST_MIN_SCALE_EXP = -124
_FAST_MIN_SCALE_BYTE = _FAST_MIN_SCALE_EXP + E8M0_BIAS


class NonFiniteError(ValueError):
    """The float input to :func:`encode` holds NaN or +-Inf."""

    def __init__(self, count: int, first_index: int):
        self.count = count
        self.first_index = first_index
        super().__init__(f"{count} NaN/Inf value(s) (first at flat index {first_index}) cannot be encoded as MXFP4")


# ---------------------------------------------------------------------------------------------- decode


@functools.cache
def _pair_table(dtype: torch.dtype) -> torch.Tensor:
    """[65536] table: entry ``(s << 8) | b`` holds the two decoded elements of byte ``b`` under scale ``s``,
    packed in one integer of twice the dtype's width (element ``2j`` first in memory)."""
    values = torch.tensor(FP4_VALUES, dtype=dtype).expand(256, 16).clone()
    exponents = (torch.arange(256, dtype=torch.int32) - E8M0_BIAS).view(256, 1)
    values = torch.ldexp(values, exponents).to(dtype)  # what the reference dequantizers compute
    byte = torch.arange(256)
    pairs = torch.stack([values[:, byte & 0x0F], values[:, byte >> 4]], dim=-1).contiguous()  # (s, b, 2)
    pair_int = {2: torch.int32, 4: torch.int64}[dtype.itemsize]
    return pairs.view(pair_int).reshape(256 * 256)


def _check_packed(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks must have shape [..., G, {BYTES_PER_BLOCK}], got {list(blocks.shape)}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(
            f"MXFP4 scales shape {list(scales.shape)} does not match blocks shape {list(blocks.shape)} "
            f"(expected {list(blocks.shape[:-1])})"
        )


def decode(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize ``blocks [..., G, 16]`` + ``scales [..., G]`` to ``[..., G * 32]`` of ``dtype``.

    ``out`` (contiguous, that shape and dtype) is filled and returned: reusing one buffer across tensors
    avoids first-touch page faults, which cost more than the decode itself.

    Example:
        >>> blocks = torch.tensor([[[0x21] + [0] * 15]], dtype=torch.uint8)
        >>> decode(blocks, torch.tensor([[127]], dtype=torch.uint8))[0, :2]
        tensor([0.5000, 1.0000], dtype=torch.bfloat16)
    """
    _check_packed(blocks, scales)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"cannot decode MXFP4 to {dtype}; choose one of bfloat16, float16, float32")
    shape = (*blocks.shape[:-2], blocks.shape[-2] * BLOCK_SIZE)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)}")
    table = _pair_table(dtype)
    flat_blocks = blocks.reshape(-1, BYTES_PER_BLOCK)
    flat_scales = scales.reshape(-1)
    flat_out = out.view(-1).view(table.dtype)  # one table entry per byte

    def decode_range(first: int, last: int) -> None:
        index = torch.empty((min(last - first, _CHUNK_BLOCKS), BYTES_PER_BLOCK), dtype=torch.int32)  # reused
        for start in range(first, last, _CHUNK_BLOCKS):
            stop = min(last, start + _CHUNK_BLOCKS)
            rows = index[: stop - start]
            torch.add(flat_blocks[start:stop], (flat_scales[start:stop].to(torch.int32) << 8).unsqueeze(-1), out=rows)
            torch.index_select(table, 0, rows.view(-1), out=flat_out[start * BYTES_PER_BLOCK : stop * BYTES_PER_BLOCK])

    in_parallel(decode_range, flat_scales.numel(), _CHUNK_BLOCKS)
    return out


def decode_transposed(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Dequantize one expert's ``blocks [N, G, 16]`` + ``scales [N, G]`` straight into ``out [G * 32, N]``
    (contiguous; bf16, fp16 or fp32): :func:`decode` and a transpose in one compiled pass, the same table,
    the same values (HF's ``[in, out]`` experts: 11 ms per 5760 x 2880 bf16 expert on two cores, against
    28-80 ms decoded, then transposed)."""
    from ossconv.formats import mxfp4_compiled

    _check_packed(blocks, scales)
    rows, groups = scales.shape
    if out.dtype not in FLOAT_DTYPES or tuple(out.shape) != (groups * BLOCK_SIZE, rows) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float tensor of shape {[groups * BLOCK_SIZE, rows]}")
    bits = {2: np.uint16, 4: np.uint32}[out.dtype.itemsize]
    pairs = _pair_table(out.dtype).numpy().view({2: np.uint32, 4: np.uint64}[out.dtype.itemsize])
    stored = out.view({2: torch.int16, 4: torch.int32}[out.dtype.itemsize]).numpy().view(bits)
    blocks_np, scales_np = blocks.contiguous().numpy(), scales.contiguous().numpy()
    in_parallel(
        lambda first, last: mxfp4_compiled.decode_columns(
            blocks_np, scales_np, pairs, out.dtype.itemsize * 8, stored, first, last
        ),
        rows,
        max(1, _CHUNK_BLOCKS // groups),
    )
    return out


# ---------------------------------------------------------------------------------------------- encode


def _int_bits(value: float) -> int:
    return torch.tensor([value], dtype=torch.float32).view(torch.int32).item()


@functools.cache
def _signed_bounds() -> torch.Tensor:
    """Boundaries on the int32 bits of q so that ``bucketize(bits) ^ 8`` is the FP4 code.

    Positive floats order like their int32 bits and negative ones in reverse, above INT_MIN (-0.0); a
    boundary at -1 separates the two. Ties go to the even code: 0.75, 1.75 and 3.5 round up, so their
    boundary sits one ulp lower.
    """
    mids = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
    ties_up = (0.75, 1.75, 3.5)

    def boundary(mid: float, sign: float) -> int:
        return _int_bits(sign * mid) - (1 if mid in ties_up else 0)

    neg = [boundary(m, -1.0) for m in mids]
    pos = [boundary(m, 1.0) for m in mids]
    return torch.tensor(neg + [-1] + pos, dtype=torch.int32)


@functools.cache
def bf16_block_tables(rule: str) -> tuple[np.ndarray, np.ndarray]:
    """For every bf16 magnitude a block's largest element can have (15 bits): the block's scale byte, and
    the ``offset`` with ``|bits| - offset = (exponent of q + 3) * 128 + mantissa`` for its elements
    (``q = x / scale``). Both come from :func:`_scale_bytes`, the fp32 path's own rule. A zero block gets
    an offset that sends every code to +-0; a block too small for the fast path gets ``SLOW``."""
    from ossconv.formats import mxfp4_compiled

    amax_bits = torch.arange(mxfp4_compiled.MAGNITUDE + 1, dtype=torch.int32)
    scale_byte = _scale_bytes((amax_bits << 16).view(torch.float32), rule)
    scale_exp = scale_byte - E8M0_BIAS
    if rule == "floor":
        scale_exp = scale_exp.clamp(min=-126)  # torchao's divisor is never below 2^-126
    # An element's |bits| is e * 128 + mantissa (e its biased exponent); q's unbiased exponent is
    # e - 127 - scale_exp, so |bits| - offset = (q's unbiased exponent + 3) * 128 + mantissa.
    offset = (scale_exp + E8M0_BIAS + _FAST_MIN_EXP) << 7
    offset[0] = mxfp4_compiled.MAGNITUDE + 1
    offset[1:][scale_exp[1:] < _FAST_MIN_SCALE_EXP] = mxfp4_compiled.SLOW
    return scale_byte.to(torch.uint8).numpy(), offset.numpy()


def _scale_bytes(amax: torch.Tensor, rule: str) -> torch.Tensor:
    """E8M0 scale byte (as int32) per block from the fp32 block maxima."""
    if rule == "up":
        d = (amax / F4_E2M1_MAX).view(torch.int32)
        return ((d + 0x7FFFFF) & 0x7F800000) >> 23
    exponent = ((amax.view(torch.int32) >> 23) & 0xFF) - E8M0_BIAS - 2  # 2 = emax of E2M1
    return exponent.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS


def _pack_codes(codes: torch.Tensor, out: torch.Tensor) -> None:
    """[n, 32] uint8 codes (0-15) -> ``out`` [n, 16] uint8, even element in the low nibble."""
    pairs = codes.view(torch.int16)  # little-endian: even element in the low byte
    out.copy_((pairs | (pairs >> 4)).view(out.shape))  # the cast to uint8 keeps the low byte


class _NonFiniteInput(Exception):
    """Raised inside the encoders; :func:`encode` counts the NaN/Inf of the whole input for the error."""


def _non_finite_error(x: torch.Tensor) -> NonFiniteError:
    bad = (~torch.isfinite(x)).reshape(-1).nonzero().view(-1)
    return NonFiniteError(int(bad.numel()), int(bad[0]))


def _encode_fp32(x: torch.Tensor, rule: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """Reference path: [n, 32] float -> ``blocks`` [n, 16] and ``scales`` [n], as the oracles compute it."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(-1, keepdim=True)
    if not torch.isfinite(amax).all():
        raise _NonFiniteInput
    scale_byte = _scale_bytes(amax, rule)
    scale = (scale_byte << 23).view(torch.float32)
    if rule == "up":
        q = xf * torch.where(scale == 0, 0.0, 1.0 / scale)
    else:
        q = xf / scale.clamp(min=torch.finfo(torch.float32).tiny)
    codes = (torch.bucketize(q.view(torch.int32), _signed_bounds(), out_int32=True) ^ 0x08).to(torch.uint8)
    _pack_codes(codes, blocks)
    scales.copy_(scale_byte.view(-1))


def encode(
    x: torch.Tensor,
    rule: str = "up",
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float ``x [..., K]`` (K a multiple of 32) to ``(blocks [..., K/32, 16], scales [..., K/32])``.

    ``rule`` is ``"up"`` (triton_kernels ROUND_UP, the default) or ``"floor"`` (OCP / torchao FLOOR); see
    the module docstring. ``out`` (two contiguous uint8 tensors) receives the result when given.
    Raises :class:`NonFiniteError` on NaN/Inf.

    Example:
        >>> blocks, scales = encode(torch.tensor([0.5, 6.0] + [0.0] * 30))  # amax 6: scale 2^0
        >>> hex(blocks[0, 0].item()), scales.tolist()
        ('0x71', [127])
    """
    if rule not in RULES:
        raise ValueError(f"unknown MXFP4 scale rule {rule!r}; choose 'up' or 'floor'")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"cannot encode {x.dtype} as MXFP4; expected bfloat16, float16 or float32")
    if x.ndim == 0 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"last dimension of shape {list(x.shape)} is not a multiple of the MXFP4 block size (32)")
    shape = (*x.shape[:-1], x.shape[-1] // BLOCK_SIZE)
    if out is None:
        out = (torch.empty((*shape, BYTES_PER_BLOCK), dtype=torch.uint8), torch.empty(shape, dtype=torch.uint8))
    blocks_out, scales_out = out
    try:
        if x.dtype == torch.bfloat16:
            _encode_bf16(x, rule, blocks_out, scales_out)
        else:
            _encode_floats(x.reshape(-1, BLOCK_SIZE), rule, blocks_out.view(-1, BYTES_PER_BLOCK), scales_out.view(-1))
    except _NonFiniteInput:
        raise _non_finite_error(x) from None
    return blocks_out, scales_out


def _encode_floats(x: torch.Tensor, rule: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    def encode_range(first: int, last: int) -> None:
        for start in range(first, last, _CHUNK_BLOCKS):
            stop = min(last, start + _CHUNK_BLOCKS)
            _encode_fp32(x[start:stop], rule, blocks[start:stop], scales[start:stop])

    in_parallel(encode_range, x.shape[0], _CHUNK_BLOCKS)


def _encode_bf16(x: torch.Tensor, rule: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """The compiled fast path; the few blocks it cannot encode exactly are then re-encoded in fp32."""
    from ossconv.formats import mxfp4_compiled

    scale_bytes, offsets = bf16_block_tables(rule)
    slow: list[int] = []

    def check(result: tuple[int, int]) -> None:
        failed, found = result  # the first block holding NaN/Inf (or -1), the blocks needing fp32
        slow.append(found)
        if failed >= 0:
            raise _NonFiniteInput

    if x.ndim == 2 and not x.is_contiguous() and x.mT.is_contiguous():  # HF's [in, out] expert, read in place
        matrix = x
        stored = x.mT.view(torch.int16).numpy().view(np.uint16)
        rows_out = blocks.view(x.shape[0], -1, BYTES_PER_BLOCK).numpy()
        scales_out = scales.view(x.shape[0], -1).numpy()
        in_parallel(
            lambda first, last: check(
                mxfp4_compiled.encode_columns(stored, first, last, scale_bytes, offsets, rows_out, scales_out)
            ),
            x.shape[0],
            max(1, _CHUNK_BLOCKS * BLOCK_SIZE // x.shape[1]),
        )
    else:
        matrix = x.reshape(-1, x.shape[-1])  # a copy only when x is some other view
        bits = matrix.view(torch.int16).numpy().view(np.uint16).reshape(-1, BLOCK_SIZE)
        flat_blocks = blocks.view(-1, BYTES_PER_BLOCK).numpy()
        flat_scales = scales.view(-1).numpy()
        in_parallel(
            lambda first, last: check(
                mxfp4_compiled.encode_rows(
                    bits[first:last], scale_bytes, offsets, flat_blocks[first:last], flat_scales[first:last]
                )
            ),
            bits.shape[0],
            _CHUNK_BLOCKS,
        )
    if sum(slow):
        _encode_tiny_blocks(matrix, rule, blocks.view(-1, BYTES_PER_BLOCK), scales.view(-1))


def _encode_tiny_blocks(matrix: torch.Tensor, rule: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """Re-encode in fp32 every block of ``matrix [R, K]`` whose scale byte is below the fast path's range
    (zero blocks among them, which gives the same bytes)."""
    index = (scales < _FAST_MIN_SCALE_BYTE).nonzero().view(-1)
    groups = matrix.shape[1] // BLOCK_SIZE
    columns = (index % groups * BLOCK_SIZE).unsqueeze(1) + torch.arange(BLOCK_SIZE)
    values = matrix[(index // groups).unsqueeze(1), columns]
    tiny_blocks = torch.empty((index.numel(), BYTES_PER_BLOCK), dtype=torch.uint8)
    tiny_scales = torch.empty(index.numel(), dtype=torch.uint8)
    _encode_fp32(values, rule, tiny_blocks, tiny_scales)
    blocks[index], scales[index] = tiny_blocks, tiny_scales


# ---------------------------------------------------------------------------------------------- statistics


_COUNT_CHUNK_BLOCKS = 1 << 16  # blocks per range of work for the threads


@dataclass
class BlockCounts:
    """What ``inspect --stats`` reports of MXFP4 blocks: counts that add up across experts and tensors."""

    scale_histogram: torch.Tensor  # [256] int64: blocks per scale byte
    zero: int = 0  # every code is +-0
    second_encoding: int = 0  # nonzero, largest |code| below 6 (4.0): another (scale, codes) pair exists
    inf: int = 0  # decode to +-Inf in bf16/fp32

    @classmethod
    def empty(cls) -> BlockCounts:
        return cls(torch.zeros(256, dtype=torch.int64))

    def add(self, other: BlockCounts) -> None:
        self.scale_histogram += other.scale_histogram
        self.zero += other.zero
        self.second_encoding += other.second_encoding
        self.inf += other.inf


def count_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> BlockCounts:
    """Counts of ``blocks`` ``[..., G, 16]`` and their ``scales`` ``[..., G]``, at memory speed on all cores.

    A block is two 64-bit words of 16 codes each, so "all magnitudes zero", "some magnitude >= 6" and
    "some magnitude >= 4" (:data:`HALF_INF_MIN_CODE`) are a few word-wide operations per block in one
    compiled pass (:func:`ossconv.formats.mxfp4_compiled.count_blocks`). The tests check it against
    counting each block's largest |code| one code at a time.
    """
    from ossconv.formats import mxfp4_compiled

    _check_packed(blocks, scales)
    words = blocks.contiguous().view(-1, BYTES_PER_BLOCK).view(torch.int64).numpy().view(np.uint64)
    flat_scales = scales.contiguous().view(-1).numpy()
    parts: list[tuple[np.ndarray, int, int, int]] = []

    def count_range(first: int, last: int) -> None:
        histogram = np.zeros(256, dtype=np.int64)
        zero, large, inf = mxfp4_compiled.count_blocks(
            words[first:last], flat_scales[first:last], histogram, INF_SCALE, HALF_INF_SCALE
        )
        parts.append((histogram, zero, large, inf))  # atomic under the GIL; a sum does not mind the order

    in_parallel(count_range, words.shape[0], _COUNT_CHUNK_BLOCKS)
    total = BlockCounts.empty()
    for histogram, zero, large, inf in parts:
        total.scale_histogram += torch.from_numpy(histogram)
        total.zero += zero
        total.second_encoding -= zero + large
        total.inf += inf
    total.second_encoding += words.shape[0]
    return total
