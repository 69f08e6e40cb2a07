"""Shared fixtures: synthetic checkpoints (built once per session) and an in-process CLI runner."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from ossconv import synthetic
from ossconv.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """Run ``ossconv ARGS`` through the real entry point (error mapping and exit codes included)."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
        except SystemExit as done:
            code = done.code
        else:  # main always exits
            raise AssertionError("main() returned without exiting")
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny model (seed 0) in both layouts and both expert precisions; the HF bf16 one sharded."""
    root = tmp_path_factory.mktemp("synthetic")
    built = {}
    for layout in ("openai", "hf"):
        for experts in ("mxfp4", "bf16"):
            name = f"{layout}-{experts}"
            shard = 150_000 if name == "hf-bf16" else 5 * 10**9
            built[name] = synthetic.build(root / name, layout=layout, experts=experts, max_shard_size=shard)
    return built


@pytest.fixture
def copy_of(tmp_path):
    """A private copy of a session checkpoint, for tests that damage it."""

    def copy(source: Path, name: str = "ckpt") -> Path:
        target = tmp_path / name
        shutil.copytree(source, target)
        return target

    return copy
