"""Shared by the benchmarks: gpt-oss-20b layer shapes and measuring a child process."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

# gpt-oss-20b's layer shapes with a small vocabulary (the embedding is not what these benchmarks measure).
REAL_20B_LAYER = dict(
    hidden_size=2880,
    intermediate_size=2880,
    num_experts=32,
    experts_per_token=4,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    sliding_window=128,
    vocab_size=4096,
)


def run_child(args: list[str], capture: bool = False) -> tuple[float, int, bytes]:
    """Seconds, peak RSS in bytes (of that child alone, from wait4) and stdout of one command."""
    started = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    output = child.stdout.read() if capture else b""
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(args)} failed with status {status}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024, output


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
