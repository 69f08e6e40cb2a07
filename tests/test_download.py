"""download against a hub-like HTTP server on 127.0.0.1 (tests/hub_server.py), through the real
huggingface_hub over real sockets: layout filtering, SHA-256 checks, resume across runs, faults."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import one_error
from hub_server import HubServer

from ossconv import synthetic
from ossconv.hub import download

REPO = "openai/gpt-oss-tiny"
BIG_REPO = "openai/gpt-oss-big"
BIG_FILE = "original/model.safetensors"
BIG_SIZE = 24 * 2**20  # above huggingface_hub's 10 MiB write chunk, so a killed run leaves bytes on disk


def repo_files(root: Path) -> dict[str, bytes]:
    """A gpt-oss-like repository: HF layout at the root, OpenAI layout in original/, metal/model.bin."""
    hf = synthetic.build(root / "hf", layout="hf", max_shard_size=120_000)
    openai = synthetic.build(root / "openai", layout="openai")
    files = {p.name: p.read_bytes() for p in hf.iterdir()}
    files.update({f"original/{p.name}": p.read_bytes() for p in openai.iterdir()})
    files["tokenizer.json"] = b'{"version": "1.0", "model": {}}'
    files["README.md"] = b"# tiny\\n"
    files["metal/model.bin"] = os.urandom(4096)
    return files


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    files = repo_files(tmp_path_factory.mktemp("repo"))
    big = {BIG_FILE: os.urandom(BIG_SIZE), "original/config.json": files["original/config.json"]}
    with HubServer({REPO: files, BIG_REPO: big}) as server:
        yield server


@pytest.fixture(autouse=True)
def isolated_hub_environment(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    hub.reset_faults()
    hub.log.clear()


def fetched(hub, prefix: str = "") -> list[str]:
    """Repository files whose bytes were sent (GET answered 200/206)."""
    return sorted(
        {
            e["file"]
            for e in hub.log
            if e["method"] == "GET"
            and e["status"] in (200, 206)
            and e["file"]
            and e["file"].startswith(prefix)
            and "/api/" not in e["path"]
        }
    )


def test_openai_layout_fetches_exactly_original_and_it_converts_and_verifies(hub, tmp_path, run_cli):
    result = run_cli("download", REPO, "--layout", "openai", "--out", tmp_path / "dl", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    names = sorted(f["path"] for f in report["files"])
    assert names == sorted(p for p in hub.repos[REPO] if p.startswith("original/"))
    assert fetched(hub) == names
    assert report["commit"] == hub.commit_sha(REPO)
    for entry in report["files"]:
        assert entry["sha256"] == hashlib.sha256(hub.repos[REPO][entry["path"]]).hexdigest()
        assert entry["action"] == "downloaded"
    assert run_cli("convert", tmp_path / "dl" / "original", tmp_path / "hf", "--to", "hf").code == 0
    assert run_cli("verify", tmp_path / "dl" / "original", tmp_path / "hf", "--exact").code == 0


def test_hf_layout_fetches_root_weights_config_and_tokenizer(hub, tmp_path):
    result = download(REPO, layout="hf", out=tmp_path / "dl")
    names = sorted(f.path for f in result.files)
    assert "tokenizer.json" in names and "model.safetensors.index.json" in names and "config.json" in names
    assert not any("/" in n for n in names) and "README.md" not in names
    assert fetched(hub) == names
    assert any("ossconv inspect" in step for step in result.next_steps)


def test_metal_and_all(hub, tmp_path):
    assert [f.path for f in download(REPO, layout="metal", out=tmp_path / "m").files] == ["metal/model.bin"]
    assert len(download(REPO, layout="all", out=tmp_path / "a").files) == len(hub.repos[REPO])


def test_second_run_does_not_redo_work_but_notices_changes(hub, tmp_path):
    download(REPO, layout="openai", out=tmp_path / "dl")
    hub.log.clear()
    again = download(REPO, layout="openai", out=tmp_path / "dl")
    assert {f.action for f in again.files} == {"unchanged"} and fetched(hub) == []
    weights = tmp_path / "dl" / "original" / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns()))  # touched: hashed again, still good, not fetched
    touched = {f.path: f.action for f in download(REPO, layout="openai", out=tmp_path / "dl").files}
    assert touched["original/model.safetensors"] == "verified on disk" and fetched(hub) == []
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    changed = {f.path: f.action for f in download(REPO, layout="openai", out=tmp_path / "dl").files}
    assert changed["original/model.safetensors"] == "downloaded"
    assert weights.read_bytes() == hub.repos[REPO]["original/model.safetensors"]


def test_dropped_connection_completes_with_the_right_bytes(hub, tmp_path):
    hub.drop_after("original/model.safetensors", 50_000)
    download(REPO, layout="openai", out=tmp_path / "dl")
    assert (tmp_path / "dl" / "original" / "model.safetensors").read_bytes() == hub.repos[REPO][
        "original/model.safetensors"
    ]
    gets = [e for e in hub.requests("GET", "original/model.safetensors") if e["status"] in (200, 206)]
    assert len(gets) == 2 and gets[0]["fault"] == "drop"


def test_corrupted_file_fails_after_one_retry_and_is_not_kept(hub, tmp_path, run_cli):
    hub.corrupt("original/model.safetensors")
    result = run_cli("download", REPO, "--layout", "openai", "--out", tmp_path / "dl")
    one_error(result, "model.safetensors: content does not match the Hub's checksum")
    assert len(hub.requests("GET", "original/model.safetensors")) == 2
    assert not (tmp_path / "dl" / "original" / "model.safetensors").exists()
    assert not list((tmp_path / "dl").rglob("*.part"))


def test_killed_run_resumes_with_a_range_request(hub, tmp_path):
    out = tmp_path / "dl"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "127.0.0.1"}
    env.pop("HF_HUB_OFFLINE", None)
    hub.throttle(BIG_FILE, 8 * 2**20)  # 8 MiB/s: about 3 s for the whole file
    child = subprocess.Popen(
        [sys.executable, "-m", "ossconv", "download", BIG_REPO, "--layout", "openai", "--out", str(out), "--quiet"],
        env=env,
    )
    deadline, partial = time.time() + 60, None
    while time.time() < deadline:
        parts = list(out.rglob("*.part"))
        if parts and parts[0].stat().st_size >= 10 * 2**20:
            partial = parts[0]
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert partial is not None, "the download never wrote its first chunk"
    on_disk = partial.stat().st_size
    assert 0 < on_disk < BIG_SIZE
    hub.throttle(BIG_FILE, None)
    hub.log.clear()
    download(BIG_REPO, layout="openai", out=out)
    gets = [e for e in hub.requests("GET", BIG_FILE) if e["status"] in (200, 206)]
    assert [e["range"] for e in gets] == [f"bytes={on_disk}-"] and gets[0]["status"] == 206
    assert (out / BIG_FILE).read_bytes() == hub.repos[BIG_REPO][BIG_FILE]
    assert not list(out.rglob("*.part"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["openai/no-such-repo"], "repository openai/no-such-repo not found"),
        ([REPO, "--revision", "v9"], "revision 'v9' not found in openai/gpt-oss-tiny"),
    ],
)
def test_missing_repo_or_revision_is_exit_2(hub, tmp_path, run_cli, args, message):
    result = run_cli("download", *args, "--out", tmp_path / "dl")
    one_error(result, message)


def test_offline_mode_checks_what_was_verified(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    download(REPO, layout="openai", out=tmp_path / "dl")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.log.clear()
    result = download(REPO, layout="openai", out=tmp_path / "dl")
    assert len(result.files) == len([p for p in hub.repos[REPO] if p.startswith("original/")])
    assert hub.log == []


def test_damaged_record_only_costs_rehashing(hub, tmp_path):
    download(REPO, layout="openai", out=tmp_path / "dl")
    (tmp_path / "dl" / ".cache" / "ossconv" / "verified.json").write_text("[1]")
    hub.log.clear()
    result = download(REPO, layout="openai", out=tmp_path / "dl")
    assert {f.action for f in result.files} == {"verified on disk"} and fetched(hub) == []


def test_a_listing_whose_digest_is_a_path_writes_nothing_outside(hub, tmp_path, run_cli):
    hub.listed_oids["original/config.json"] = "/../../../../../evil"
    try:
        before = sorted(p.name for p in tmp_path.iterdir())
        one_error(run_cli("download", REPO, "--layout", "openai", "--out", tmp_path / "dl"), "hex digest")
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != "dl") == before
    finally:
        hub.listed_oids.clear()


def test_an_empty_file_downloads(hub, tmp_path):
    hub.repos[REPO]["original/EMPTY"] = b""
    try:
        result = download(REPO, layout="openai", out=tmp_path / "dl")
        assert (tmp_path / "dl" / "original" / "EMPTY").read_bytes() == b""
        assert any(f.path == "original/EMPTY" for f in result.files)
    finally:
        del hub.repos[REPO]["original/EMPTY"]


def test_a_trickling_server_is_stopped_in_one_line(hub, tmp_path, monkeypatch):
    import time

    from ossconv import transfer
    from ossconv.errors import OssconvError

    monkeypatch.setattr(transfer, "DEFAULT_GRACE", 0.5)
    monkeypatch.setattr(transfer.deadline, "__defaults__", (transfer.DEFAULT_MIN_RATE, 0.5))
    hub.throttle(BIG_FILE, 2_000_000)  # 24 MiB at 2 MB/s: 12 s; huggingface_hub reports every 10 MiB
    started = time.monotonic()
    try:
        with pytest.raises(OssconvError, match="slower than 1e\\+08 bytes/s"):
            download(BIG_REPO, layout="openai", out=tmp_path / "dl", min_rate=1e8)
    finally:
        hub.throttle(BIG_FILE, None)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "dl" / BIG_FILE).exists()
