"""Sizes and ranges as people write them (``5GB``, ``500MiB``, ``0-3, 7``), and the default shard size.

Kept apart from the reader and writer so the command line can parse its options without importing torch.
"""

from __future__ import annotations

import re

from ossconv.errors import OssconvError

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes per shard file, as transformers' default "5GB"
DEFAULT_MAX_SHARD_SIZE_TEXT = "5GB"
MAX_SIZE = 1 << 60


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000 (decimal and binary units, as transformers)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise OssconvError(f"cannot read size {text!r}; write it like 500MB, 5GB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    if len(match.group(1)) > 20 or number * base**power >= MAX_SIZE:
        raise OssconvError(f"size {text!r} is beyond any disk (at most {MAX_SIZE} bytes)")
    size = int(number * base**power)
    if size <= 0:
        raise OssconvError(f"size {text!r} must be positive")
    return size


def format_ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans: list[list[int]] = []
    for value in values:
        if spans and value == spans[-1][1] + 1:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans) or "none"
