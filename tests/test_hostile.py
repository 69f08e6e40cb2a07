"""Hostile input, interrupted and concurrent runs. A corpus of broken checkpoints, indexes, configs and manifests,
built here at test time, goes through every reading command; each must end in exit 2 (1 for inspect listing
problems) with one stderr line naming the file, no traceback, no output or temporary folder left, nothing
outside the given folders changed, and within a time bound (a hang fails the test)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ossconv import synthetic

DEADLINE = 20  # seconds a command may take on a broken tiny checkpoint before it counts as a hang
DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5000
CASES_TRIED: list[str] = []


def _json(folder: Path, name: str, change) -> None:
    path = folder / name
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _raw(folder: Path, name: str, text: str | bytes) -> None:
    path = folder / name
    path.unlink()
    path.write_bytes(text.encode() if isinstance(text, str) else text)


def _fifo(folder: Path, name: str) -> None:
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)


def _outside_link(folder: Path, name: str) -> None:
    outside = folder.parent / f"outside-{name}"
    shutil.copyfile(folder / name, outside)
    (folder / name).unlink()
    (folder / name).symlink_to(outside)


def _header(folder: Path, change) -> None:
    """Rewrite the safetensors header of model.safetensors (data kept)."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = change(data[8 : 8 + length].decode())
    raw = header.encode() + b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def _metadata(size: int):
    def change(header: str) -> str:
        value = json.loads(header)
        value["__metadata__"] = {"format": "pt", "padding": "x" * size}
        return json.dumps(value)

    return change


def _newline_name(header: str) -> str:
    value = json.loads(header)
    value["block.0.evil\nname"] = value.pop("block.0.attn.sinks")
    return json.dumps(value)


CONFIG_CASES = {
    "layers 1e12": lambda f: _json(f, "config.json", lambda c: c.update(num_hidden_layers=10**12)),
    "experts 1e12": lambda f: _json(f, "config.json", lambda c: c.update(num_experts=10**12)),
    "vocab 1e12": lambda f: _json(f, "config.json", lambda c: c.update(vocab_size=10**12)),
    "rope factor 1e308": lambda f: _json(f, "config.json", lambda c: c.update(rope_scaling_factor=1e308)),
    "config nested": lambda f: _raw(f, "config.json", DEEP),
    "config huge int": lambda f: _raw(f, "config.json", '{"num_hidden_layers": ' + HUGE_INT + "}"),
    "config not utf-8": lambda f: _raw(f, "config.json", b'{"a": "\xff\xfe"}'),
    "config a list": lambda f: _raw(f, "config.json", "[1, 2]"),
    "config fifo": lambda f: _fifo(f, "config.json"),
    "config symlink outside": lambda f: _outside_link(f, "config.json"),
    "config a folder": lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()),
    "header nested": lambda f: _header(f, lambda h: '{"a": ' + DEEP + "}"),
    "header huge int": lambda f: _header(f, lambda h: h.replace('"shape":[', '"shape":[' + HUGE_INT + ",", 1)),
    "header length beyond file": lambda f: (f / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}"),
    "truncated shard": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
    "tensor name with a newline": lambda f: _header(f, _newline_name),
    "shard a fifo": lambda f: _fifo(f, "model.safetensors"),
}
INDEX_CASES = {
    "index nested": lambda f: _raw(f, "model.safetensors.index.json", DEEP),
    "index symlink outside": lambda f: _outside_link(f, "model.safetensors.index.json"),
    "index names a fifo": lambda f: (
        _fifo(f, "evil.safetensors"),
        _json(f, "model.safetensors.index.json", lambda i: i["weight_map"].update(x="evil.safetensors")),
    ),
    "index points outside": lambda f: _json(
        f, "model.safetensors.index.json", lambda i: i["weight_map"].update(x="../outside.safetensors")
    ),
    "index huge int": lambda f: _raw(f, "model.safetensors.index.json", '{"weight_map": {}, "n": ' + HUGE_INT + "}"),
}
MANIFEST_CASES = {
    "manifest 1e12 experts": lambda f: _json(f, "ep_manifest.json", lambda m: m.update(num_experts=10**12)),
    "manifest rank range 1e12": lambda f: _json(
        f, "ep_manifest.json", lambda m: m["ranks"][0].update(experts=[2, 10**12])
    ),
    "manifest nested": lambda f: _raw(f, "ep_manifest.json", DEEP),
    "manifest symlink outside": lambda f: _outside_link(f, "ep_manifest.json"),
    "manifest fifo": lambda f: _fifo(f, "ep_manifest.json"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-sources")
    from ossconv import reshard

    made = {
        "plain": synthetic.build(root / "plain", layout="openai"),
        "sharded": synthetic.build(root / "sharded", layout="hf", experts="bf16", max_shard_size=150_000),
    }
    reshard(made["plain"], root / "ep", ep_ranks=2)
    made["ep"] = root / "ep"
    return made


@pytest.fixture
def deadline():
    def expired(signum, frame):
        raise TimeoutError(f"no answer within {DEADLINE} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(DEADLINE)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*") if not p.is_fifo()}


def _check_contract(result, work: Path, allowed: tuple[int, ...] = (2,)) -> None:
    assert result.code in allowed, (result.code, result.err)
    if result.code == 2:
        assert result.err.count("\n") == 1 and result.err.startswith("Error: "), result.err
    assert "Traceback" not in result.err
    assert not (work / "out").exists()
    assert not [p for p in work.iterdir() if ".ossconv-tmp-" in p.name]


def _run_case(run_cli, tmp_path, source: Path, name: str, damage) -> None:
    work = tmp_path / "work"
    folder = work / "ckpt"
    shutil.copytree(source, folder, symlinks=True)
    damage(folder)
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("untouched")
    before = _snapshot(tmp_path)
    for command in (("inspect", folder), ("convert", folder, work / "out", "--to", "hf")):
        result = run_cli(*command)
        _check_contract(result, work, (1, 2) if command[0] == "inspect" else (2,))
        if result.code == 2 and "symlink" not in name:
            assert str(folder) in result.err or "config" in result.err or "manifest" in result.err, result.err
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if "/work/" not in k} == {
        k: v for k, v in before.items() if "/work/" not in k
    }
    CASES_TRIED.append(name)


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_broken_checkpoint(sources, tmp_path, run_cli, deadline, name):
    _run_case(run_cli, tmp_path, sources["plain"], name, CONFIG_CASES[name])


@pytest.mark.parametrize("name", sorted(INDEX_CASES))
def test_broken_index(sources, tmp_path, run_cli, deadline, name):
    _run_case(run_cli, tmp_path, sources["sharded"], name, INDEX_CASES[name])


@pytest.mark.parametrize("name", sorted(MANIFEST_CASES))
def test_broken_manifest(sources, tmp_path, run_cli, deadline, name):
    _run_case(run_cli, tmp_path, sources["ep"], name, MANIFEST_CASES[name])


def test_large_header_metadata_is_parsed_once(sources, tmp_path, run_cli, deadline):
    folder = tmp_path / "ckpt"
    shutil.copytree(sources["plain"], folder)
    _header(folder, _metadata(10 * 1024 * 1024))
    started = time.perf_counter()
    assert run_cli("inspect", folder, "--stats").code == 0
    assert run_cli("convert", folder, tmp_path / "out", "--to", "hf").code == 0
    assert time.perf_counter() - started < DEADLINE
    CASES_TRIED.append("10 MB header metadata")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--max-shard-size", "9" * 70), "beyond any disk"),
        (("--max-shard-size", "0"), "positive"),
    ],
)
def test_absurd_options(sources, tmp_path, run_cli, args, fragment):
    result = run_cli("convert", sources["plain"], tmp_path / "out", "--to", "hf", *args)
    assert result.code == 2 and result.err.count("\n") == 1 and fragment in result.err, result.err
    CASES_TRIED.append(f"option {args[0]}")


def test_bad_token_files(sources, tmp_path, run_cli):
    for content, fragment in ((b"\xff\xfe\x00", "UTF-8"), (DEEP.encode(), "token ids"), (HUGE_INT.encode(), "")):
        path = tmp_path / "tokens.txt"
        path.write_bytes(content)
        result = run_cli("verify", sources["plain"], sources["plain"], "--prompt-tokens", path)
        assert result.code == 2 and result.err.count("\n") == 1 and fragment in result.err, result.err
        CASES_TRIED.append(f"token file {fragment or 'huge int'}")


def test_non_finite_weights_are_named_by_verify(sources, tmp_path, run_cli):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(sources["plain"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["block.1.attn.qkv.weight"][3, 4] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    result = run_cli("verify", folder, folder)
    assert result.code == 2 and "block.1.attn.qkv.weight holds 1 NaN or Inf" in result.err, result.err
    CASES_TRIED.append("NaN weight in verify")


def test_temporary_names_fit_the_file_system(sources, tmp_path, run_cli):
    out = tmp_path / ("x" * 240)
    assert run_cli("convert", sources["plain"], out, "--to", "hf").code == 0 and out.is_dir()
    CASES_TRIED.append("240-character output name")


# ---------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory):
    """Big enough that a conversion to fp32 writes 1.7 GB (seconds, even from the page cache): room to interrupt it."""
    config = synthetic.tiny_config(
        num_hidden_layers=4, num_experts=32, hidden_size=1024, intermediate_size=1024, head_dim=64,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=2048,
    )  # fmt: skip
    return synthetic.build(tmp_path_factory.mktemp("slow") / "src", config)


def _convert(source: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "ossconv", "convert", str(source), str(out), "--to", "hf", "--dtype", "fp32"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".ossconv-tmp-" in p.name]


def _started(source: Path, out: Path) -> subprocess.Popen:
    """A conversion that has begun writing (its temporary folder exists)."""
    child = _convert(source, out)
    while not _temporaries(out.parent) and child.poll() is None:
        time.sleep(0.01)
    return child


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_nothing_and_a_rerun_is_clean(slow_source, tmp_path, sig, code):
    from helpers import assert_byte_identical

    clean = tmp_path / "clean"
    assert _convert(slow_source, clean).wait() == 0
    out = tmp_path / "out"
    child = _started(slow_source, out)
    time.sleep(0.1)
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode == code, err
    assert err.count("\n") == 1 and "interrupted" in err, err
    assert not out.exists() and not _temporaries(tmp_path)
    assert _convert(slow_source, out).wait() == 0
    assert_byte_identical(clean, out)
    CASES_TRIED.append(f"signal {sig.name}")


def test_a_killed_run_is_reclaimed_by_the_next(slow_source, tmp_path):
    out = tmp_path / "out"
    child = _started(slow_source, out)
    child.kill()
    child.wait()
    left = _temporaries(tmp_path)
    assert left  # SIGKILL cannot be caught: the folder stays ...
    live = tmp_path / f".out.ossconv-tmp-{os.getpid()}"  # ... and a live run's folder must survive the next run
    live.mkdir()
    assert _convert(slow_source, out).wait() == 0
    assert not any(p.exists() for p in left) and live.is_dir() and out.is_dir()
    CASES_TRIED.append("SIGKILL then rerun")


def test_two_concurrent_runs_one_wins(slow_source, tmp_path):
    out = tmp_path / "out"
    first, second = _convert(slow_source, out), _convert(slow_source, out)
    results = [(p.wait(), p.communicate()[1]) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.count("\n") == 1 and "already exists" in loser
    CASES_TRIED.append("two concurrent converts")


def test_an_output_created_during_the_run_is_not_replaced(slow_source, tmp_path):
    out = tmp_path / "out"
    child = _started(slow_source, out)
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2 and "already exists" in err
    assert (out / "mine.txt").read_text() == "a user's file" and not _temporaries(tmp_path)
    CASES_TRIED.append("output created during the run")


def test_report_case_count():
    print(f"\nhostile cases tried: {len(CASES_TRIED)}")
    assert len(CASES_TRIED) >= 30
