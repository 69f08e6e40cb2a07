"""The MXFP4 loops torch cannot fuse, compiled: the bf16 encoder and the block counts of ``inspect --stats``.
Each reads a block once and does all its work on it in registers.

Why compiled: written as torch element-wise passes the encoder made about twelve passes over every element
(mask, reduce, subtract, clamp, sign, widen, gather, pack) and took 42 ms per 5760 x 2880 expert on two
cores, five times the time the disk takes to read it. One loop per block does the same work in cache.

Why the code is arithmetic: the scale is a power of two, so an element's code depends only on the block's
scale and the element's own bf16 bits. With ``v = |bits| - offset`` (the block's ``offset`` from
:func:`ossconv.formats.mxfp4.bf16_block_tables`, clamped to ``[0, 895]``), ``v >> 7`` is the exponent of
``q = x / scale`` plus 3 and ``v & 127`` its 7 mantissa bits. E2M1 is itself a tiny float (exponent bias
1, one mantissa bit, subnormal step 0.5), so its code is q's significand rounded to nearest-even at the
bit E2M1 keeps — the 6th bit below the point in the normal range (q >= 1), the 7th to 9th below 1 — and
saturated at 7 (6.0). The tests check every result against the fp32 reference path.

The counts were ten in-place torch passes over 64-bit words per chunk (1.1-1.5 GB/s on two cores, below
the disk's read rate); :func:`count_blocks` makes the same word-wide tests in one pass.

HF stores a float expert ``[in, out]``; its blocks run down columns. :func:`encode_columns` encodes 32
columns at a time in place, without the transpose that would otherwise cost as much again (5760 x 2880 on
two cores: 10 ms, as fast as contiguous rows; 16 ms through a 32 x 32 tile, 15 ms more for a transpose).
"""

from __future__ import annotations

import numba
import numpy as np

MAGNITUDE = 0x7FFF
NON_FINITE = 0x7F80  # bf16 magnitude bits from +Inf up: Inf and NaN
SPAN = 7 * 128  # q exponents 2^-3 (below: code 0) to 2^3 (above: saturated), 128 mantissa patterns each
SLOW = -(1 << 20)  # offset marking a block whose q can be an fp32 subnormal: the caller re-encodes it in fp32

_jit = numba.njit(nogil=True, cache=True, boundscheck=False)


@numba.njit(inline="always")
def _code(bits: int, offset: int) -> int:
    v = min(max((bits & MAGNITUDE) - offset, 0), SPAN - 1)
    exponent = v >> 7  # of q, plus 3
    significand = 128 | (v & 127)  # q's 8 significant bits
    shift = max(9 - exponent, 6)  # the bits E2M1 drops
    rounded = (significand + (1 << (shift - 1)) - 1 + ((significand >> shift) & 1)) >> shift
    return min(max(2 * exponent - 6, 0) + rounded, 7) | ((bits >> 12) & 8)


@numba.njit(inline="always")
def _encode_block(values, offsets, packed, codes) -> int:  # noqa: ANN001 (numba arrays)
    """Pack the 32 bf16 bit patterns ``values`` into ``packed`` (16 bytes); return their largest magnitude."""
    largest = 0
    for k in range(32):
        largest = max(largest, np.int32(values[k]) & MAGNITUDE)
    offset = offsets[largest]
    for k in range(32):
        codes[k] = _code(np.int32(values[k]), offset)
    for j in range(16):
        packed[j] = codes[2 * j] | (codes[2 * j + 1] << 4)
    return largest


@_jit
def encode_rows(bits, scale_bytes, offsets, blocks, scales):  # noqa: ANN001, ANN201
    """``bits`` [n, 32] uint16 (blocks along rows) -> ``blocks`` [n, 16], ``scales`` [n].

    Returns (the first block holding NaN/Inf or -1, how many blocks need the fp32 path)."""
    codes = np.empty(32, np.int32)
    slow = 0
    for b in range(bits.shape[0]):
        largest = _encode_block(bits[b], offsets, blocks[b], codes)
        if largest >= NON_FINITE:
            return b, slow
        scales[b] = scale_bytes[largest]
        slow += offsets[largest] == SLOW
    return -1, slow


@_jit
def encode_columns(bits, first, last, scale_bytes, offsets, blocks, scales):  # noqa: ANN001, ANN201
    """Columns ``first:last`` of ``bits`` [K, N] uint16 (a stored ``[in, out]`` matrix, blocks down its
    columns) -> rows ``first:last`` of ``blocks`` [N, K/32, 16] and ``scales`` [N, K/32].

    32 columns at a time, each step over a contiguous row piece of 32 elements (the compiler vectorizes
    across columns); only the packed bytes, a quarter of the input, are transposed on the way out.
    Returns (the first failing block's index in ``scales``' flat order or -1, blocks needing fp32)."""
    groups = bits.shape[0] // 32
    largest = np.empty(32, np.int32)
    offset = np.empty(32, np.int32)
    packed = np.empty((16, 32), np.uint8)  # [byte of the block, column]
    slow = 0
    for start in range(first, last, 32):
        width = min(32, last - start)
        for g in range(groups):
            largest[:] = 0
            for k in range(32):
                row = bits[g * 32 + k, start : start + width]
                for c in range(width):
                    largest[c] = max(largest[c], np.int32(row[c]) & MAGNITUDE)
            for c in range(width):
                if largest[c] >= NON_FINITE:
                    return (start + c) * groups + g, slow
                offset[c] = offsets[largest[c]]
                scales[start + c, g] = scale_bytes[largest[c]]
                slow += offset[c] == SLOW
            for j in range(16):
                even = bits[g * 32 + 2 * j, start : start + width]
                odd = bits[g * 32 + 2 * j + 1, start : start + width]
                for c in range(width):
                    packed[j, c] = _code(np.int32(even[c]), offset[c]) | (_code(np.int32(odd[c]), offset[c]) << 4)
            for c in range(width):
                block = blocks[start + c, g]
                for j in range(16):
                    block[j] = packed[j, c]
    return -1, slow


@_jit
def decode_columns(blocks, scales, pairs, shift, stored, first, last):  # noqa: ANN001, ANN201
    """Rows ``first:last`` of ``blocks`` [N, G, 16] and ``scales`` [N, G] -> columns ``first:last`` of
    ``stored`` [G * 32, N] (HF's ``[in, out]``, as unsigned bits of the float dtype): the decode and the
    transpose in one pass. ``pairs`` is the decoder's table (:func:`ossconv.formats.mxfp4._pair_table`): entry
    ``scale << 8 | byte`` holds the byte's two elements, the first in its low ``shift`` bits. 32 columns at
    a time through a 32 x 32 tile, so every stored row piece is written whole."""
    groups = blocks.shape[1]
    tile = np.empty((32, 32), stored.dtype)  # [element of the block, column]
    for start in range(first, last, 32):
        width = min(32, last - start)
        for g in range(groups):
            for c in range(width):
                scale = np.int32(scales[start + c, g]) << 8
                block = blocks[start + c, g]
                for j in range(16):
                    pair = pairs[scale | block[j]]
                    tile[2 * j, c] = pair
                    tile[2 * j + 1, c] = pair >> shift
            for k in range(32):
                stored[g * 32 + k, start : start + width] = tile[k, :width]


# Nibble masks over a 64-bit word of 16 codes: the magnitude bits, bit 1 of each code (bits 1 and 2 are both
# set exactly for magnitudes 6 and 7, the values 4.0 and 6.0) and bit 2 (magnitudes 4-7, values 2.0-6.0).
_MAGNITUDE_BITS = np.uint64(0x7777777777777777)
_CODE_BIT_1 = np.uint64(0x2222222222222222)
_CODE_BIT_2 = np.uint64(0x4444444444444444)
_ONE = np.uint64(1)


@_jit
def count_blocks(words, scales, histogram, inf_scale, half_inf_scale):  # noqa: ANN001, ANN201
    """``words`` [n, 2] uint64 (a block's 32 codes) and ``scales`` [n] uint8: adds each scale byte to
    ``histogram`` [256] and returns (blocks whose codes are all +-0, blocks with some |code| >= 6, blocks
    that decode to +-Inf: scale ``inf_scale`` and a nonzero code, or ``half_inf_scale`` and |code| >= 4)."""
    zero = large = inf = 0
    for b in range(words.shape[0]):
        low, high = words[b, 0], words[b, 1]
        either = low | high
        scale = scales[b]
        histogram[scale] += 1
        nonzero = (either & _MAGNITUDE_BITS) != 0
        zero += not nonzero
        large += ((((low >> _ONE) & low) | ((high >> _ONE) & high)) & _CODE_BIT_1) != 0
        if scale == inf_scale:
            inf += nonzero
        elif scale == half_inf_scale:
            inf += (either & _CODE_BIT_2) != 0
    return zero, large, inf
