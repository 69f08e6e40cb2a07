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
    """Seconds, peak RSS in bytes (of that child alone, from wait4) and stdout of one command.

    Dirty pages are flushed before the clock starts and counted before it stops (``sync``), so a command
    neither pays for the previous one's writes nor leaves its own in the page cache unpaid: ``cp`` and
    ossconv are measured to stable storage alike.
    """
    os.sync()
    started = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    output = child.stdout.read() if capture else b""
    _, status, usage = os.wait4(child.pid, 0)
    os.sync()
    if status != 0:
        raise SystemExit(f"{' '.join(args)} failed with status {status}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024, output


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in ``folder``, a file hard-linked in several places counted once."""
    sizes = {(s.st_dev, s.st_ino): s.st_size for p in folder.rglob("*") if p.is_file() for s in [p.stat()]}
    return sum(sizes.values())


def evict(*folders: Path) -> None:
    """Drop these files from the page cache (after sync), so the next read of them comes from the disk."""
    os.sync()
    for folder in folders:
        for path in [folder] if folder.is_file() else folder.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def median_runs(commands: dict[str, list[str]], repeat: int, cleanup: list[Path]) -> dict[str, tuple[float, int]]:
    """Run the commands in turn, ``repeat`` rounds (so slow and fast moments of a shared disk hit all of
    them alike), removing ``cleanup`` folders between rounds; median seconds and largest peak RSS of each."""
    import shutil
    import statistics

    seconds: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, int] = dict.fromkeys(commands, 0)
    for _ in range(repeat):
        for folder in cleanup:
            shutil.rmtree(folder, ignore_errors=True)
        for name, args in commands.items():
            took, rss, _ = run_child(args)
            seconds[name].append(took)
            peaks[name] = max(peaks[name], rss)
    return {name: (statistics.median(seconds[name]), peaks[name]) for name in commands}


def fresh_folder(folder: Path) -> Path:
    """An empty working folder (whatever a previous, interrupted run left there is removed)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
