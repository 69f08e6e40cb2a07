"""download: one layout of a gpt-oss repository from the Hugging Face Hub, resumable and SHA-256 checked.

What huggingface_hub does for us (and we rely on, checked against 2.4.0): the endpoint, token and revision handling
(``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``), the file listing with each LFS file's sha256
(``HfApi.model_info(files_metadata=True)``), the per-file metadata and CDN location (``get_hf_file_metadata``), and
the transfer (``http_get``, its HTTP session and headers): ``http_get`` sends ``Range: bytes=N-`` when asked to
resume at N and, within one call, retries a dropped connection from the bytes it has written.

What it does not do, and we add:
- Resuming across runs. ``hf_hub_download`` names its partial file with a fresh random suffix each call,
  so a killed run's bytes are orphaned and the next run starts from byte 0. We keep our own partial file,
  ``<out>/.cache/ossconv/partial/<path>.<sha256 prefix>.part``, and hand its size to ``http_get`` as the
  resume point. Partial files of files that have since completed or left the listing are removed.
- Checking content. huggingface_hub checks only a file's size. We hash every file before it is moved into place and
  compare with the Hub's sha256 (LFS files) or git blob id (small files); a mismatch deletes the bytes, downloads
  once more from scratch, and then fails naming the file.
- Not redoing work. Each verified file is recorded with its size and mtime in ``<out>/.cache/ossconv/verified.json``:
  a second run skips it without hashing, unless its size or mtime changed, in which case it is hashed again (and
  fetched again if it no longer matches).
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ossconv.errors import OssconvError
from ossconv.progress import NoProgress, Progress
from ossconv.transfer import DEFAULT_MIN_RATE, deadline, forwarding_tqdm

LAYOUT_CHOICES = ("openai", "hf", "metal", "all")
RECORD = Path(".cache") / "ossconv" / "verified.json"
PARTIAL_DIR = Path(".cache") / "ossconv" / "partial"
# Files of the Hugging Face layout at the repository root besides the weights.
HF_ROOT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
    "*.safetensors",
)
HASH_CHUNK = 16 << 20
LISTING_TIMEOUT = 30.0  # seconds for the file listing: a Hub that never answers ends in one line, exit 2


def wanted(path: str, layout: str) -> bool:
    """Whether a repository file belongs to ``layout``."""
    if layout == "all":
        return True
    if layout in ("openai", "metal"):
        return path.startswith("original/" if layout == "openai" else "metal/")
    return "/" not in path and any(fnmatch.fnmatch(path, pattern) for pattern in HF_ROOT_FILES)


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob id (sha1 of "blob <size>\0" + content) for the others


@dataclass
class FetchedFile:
    path: str
    size: int
    sha256: str
    action: str  # "downloaded", "verified on disk" (hashed, matched), "unchanged" (recorded, not re-hashed)


@dataclass
class DownloadResult:
    repo: str
    revision: str
    commit: str
    layout: str
    folder: str
    files: list[FetchedFile] = field(default_factory=list)
    bytes_downloaded: int = 0
    seconds: float = 0.0
    next_steps: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob id) of a file, in one pass."""
    sha256, blob = hashlib.sha256(), hashlib.sha1()
    blob.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            sha256.update(chunk)
            blob.update(chunk)
    return sha256.hexdigest(), blob.hexdigest()


def _matches(remote: RemoteFile, path: Path) -> tuple[bool, str]:
    if not path.is_file() or path.stat().st_size != remote.size:
        return False, ""
    sha256, blob_id = file_digests(path)
    if remote.sha256:
        return sha256 == remote.sha256, sha256
    return remote.blob_id is None or blob_id == remote.blob_id, sha256


def _safe_target(out: Path, repo_path: str) -> Path:
    parts = PurePosixPath(repo_path).parts
    if PurePosixPath(repo_path).is_absolute() or ".." in parts or not parts:
        raise OssconvError(f"the repository lists a file outside its folder: {repo_path!r}")
    return out.joinpath(*parts)


class _Record:
    """What a previous run verified: path -> {sha256, size, mtime_ns, commit}."""

    def __init__(self, out: Path):
        self.path = out / RECORD
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            entries = {}
        keys = {"sha256": str, "expected": str, "size": int, "mtime_ns": int}
        self.entries: dict[str, dict[str, Any]] = {
            path: entry
            for path, entry in (entries.items() if isinstance(entries, dict) else [])
            if isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in keys.items())
        }  # a damaged record only costs re-hashing

    def unchanged(self, remote: RemoteFile, target: Path) -> bool:
        entry = self.entries.get(remote.path)
        if not entry or not target.is_file():
            return False
        stat = target.stat()
        expected = remote.sha256 or remote.blob_id
        return (entry.get("size"), entry.get("mtime_ns"), entry.get("expected")) == (
            stat.st_size,
            stat.st_mtime_ns,
            expected,
        )

    def remember(self, remote: RemoteFile, target: Path, sha256: str) -> None:
        stat = target.stat()
        self.entries[remote.path] = {
            "sha256": sha256,
            "expected": remote.sha256 or remote.blob_id,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps(self.entries, indent=1))
        os.replace(temp, self.path)


def _hub_error(error: Exception, repo: str, revision: str | None, endpoint: str) -> OssconvError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return OssconvError(f"repository {repo} is gated: accept its terms on the Hub and pass --token")
    if isinstance(error, RepositoryNotFoundError):
        return OssconvError(f"repository {repo} not found on {endpoint} (private? pass --token)")
    if isinstance(error, RevisionNotFoundError):
        return OssconvError(f"revision {revision!r} not found in {repo}")
    if isinstance(error, LocalEntryNotFoundError):
        return OssconvError(f"cannot reach {endpoint} and the files are not on disk ({error})")
    if isinstance(error, HfHubHTTPError):
        return OssconvError(f"the Hub answered an error for {repo}: {str(error).splitlines()[0]}")
    return OssconvError(f"cannot reach {endpoint}: {type(error).__name__}: {str(error).splitlines()[0]}")


def _transfer_errors() -> tuple[type[BaseException], ...]:
    """What the Hub or the network can raise: bad input for the user. Anything else is our bug (exit 3)."""
    import huggingface_hub.errors as hub_errors

    found: list[type[BaseException]] = [OSError, hub_errors.HfHubHTTPError, hub_errors.EntryNotFoundError]
    found += [hub_errors.HFValidationError, hub_errors.FileMetadataError]  # and the HTTP client's errors:
    for module in ("httpx2", "httpx", "requests"):
        client = sys.modules.get(module) or (importlib.util.find_spec(module) and importlib.import_module(module))
        found += [getattr(client, name) for name in ("HTTPError", "RequestException") if hasattr(client, name)]
    return tuple(found)


def _hex(value: object, length: int, what: str, path: str) -> str | None:
    """A digest from the Hub's listing, used in local file names and comparisons: hex of the right length only
    (a listing that puts a path there must not steer a write outside the output folder)."""
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{length}}}", value):
        raise OssconvError(f"the Hub lists {path!r} with a {what} that is not a {length}-digit hex digest: {value!r}")
    return value


def _list_files(api: Any, repo: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
    info = api.model_info(repo, revision=revision, files_metadata=True, timeout=LISTING_TIMEOUT)
    files = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        size = int(lfs.size if lfs else sibling.size or 0)
        if not 0 <= size < 1 << 50:
            raise OssconvError(f"the Hub lists {sibling.rfilename!r} with an impossible size {size}")
        sha256 = _hex(lfs.sha256, 64, "sha256", sibling.rfilename) if lfs else None
        blob_id = None if lfs else _hex(sibling.blob_id, 40, "blob id", sibling.rfilename)
        files.append(RemoteFile(sibling.rfilename, size, sha256, blob_id))
    return info.sha, files


def download(
    repo: str,
    *,
    layout: str = "hf",
    revision: str | None = None,
    out: str | Path | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    progress: Progress | None = None,
    min_rate: float = DEFAULT_MIN_RATE,
) -> DownloadResult:
    """Fetch the files of ``layout`` (``openai``: ``original/``; ``hf``: root weights, index, config and
    tokenizer files; ``metal``: ``metal/``; ``all``) into ``out`` (default: the repository's name). A file that
    arrives slower than ``min_rate`` bytes/s (after a minute's grace) is stopped with one error line.

    Example:
        >>> download("openai/gpt-oss-20b", layout="openai", out="gpt-oss-20b")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi, constants

    if layout not in LAYOUT_CHOICES:
        raise OssconvError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUT_CHOICES)}")
    started = time.perf_counter()
    # HF_ENDPOINT is read now, not only when huggingface_hub was imported.
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    folder = Path(out) if out else Path(repo.rstrip("/").split("/")[-1])
    record = _Record(folder)
    if constants.HF_HUB_OFFLINE:
        return _offline(repo, layout, folder, record, started)
    try:
        commit, remote_files = _list_files(HfApi(endpoint=endpoint, token=token), repo, revision)
    except _transfer_errors() as error:  # a hub or network failure is bad input for the user, never a bug
        raise _hub_error(error, repo, revision, endpoint) from None
    selected = [f for f in remote_files if wanted(f.path, layout)]
    if not selected:
        raise OssconvError(f"{repo} has no files for layout {layout!r}")
    targets = [_safe_target(folder, f.path) for f in selected]
    folder.mkdir(parents=True, exist_ok=True)
    result = DownloadResult(repo, revision or "main", commit, layout, str(folder))
    progress = progress or NoProgress()
    progress.add_total(sum(f.size for f in selected))
    for remote, target in zip(selected, targets, strict=True):
        if record.unchanged(remote, target):
            result.files.append(
                FetchedFile(remote.path, remote.size, record.entries[remote.path]["sha256"], "unchanged")
            )
            progress(remote.size)
            continue
        ok, sha256 = _matches(remote, target)
        action = "verified on disk"
        if not ok:
            fetch = (repo, commit, remote, folder, target, token, endpoint, progress, min_rate)
            sha256, fetched = _fetch(*fetch)
            result.bytes_downloaded += fetched
            action = "downloaded"
        else:
            progress(remote.size)
        record.remember(remote, target, sha256)
        result.files.append(FetchedFile(remote.path, remote.size, sha256, action))
    _remove_orphans(folder, selected)
    result.seconds = time.perf_counter() - started
    result.next_steps = _next_steps(folder, layout)
    return result


def _partial_path(folder: Path, remote: RemoteFile) -> Path:
    tag = (remote.sha256 or remote.blob_id or "unknown")[:16]
    return folder / PARTIAL_DIR / f"{remote.path}.{tag}.part"


def _fetch(
    repo: str,
    commit: str,
    remote: RemoteFile,
    folder: Path,
    target: Path,
    token: str | None,
    endpoint: str,
    progress: Progress | None,
    min_rate: float = DEFAULT_MIN_RATE,
) -> tuple[str, int]:
    """Download one file into its partial file (resuming from the bytes there), check it, move it into
    place. Returns (sha256, bytes transferred). A mismatch is fetched once more from scratch."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    partial = _partial_path(folder, remote)
    partial.parent.mkdir(parents=True, exist_ok=True)
    transferred = 0
    for _ in range(2):
        partial.touch(exist_ok=True)  # an empty file in the repository transfers nothing and is still a file
        try:
            url = hf_hub_url(repo, remote.path, revision=commit, endpoint=endpoint)
            metadata = get_hf_file_metadata(url, token=token, endpoint=endpoint)
            if partial.stat().st_size > remote.size:
                partial.write_bytes(b"")  # longer than the file: not a prefix of it
            resume = partial.stat().st_size
            until = deadline(remote.size - resume, min_rate)
            if resume < remote.size:
                with open(partial, "ab") as handle:
                    http_get(
                        metadata.location,
                        handle,
                        resume_size=resume,
                        headers=build_hf_headers(token=token),
                        expected_size=remote.size,
                        tqdm_class=forwarding_tqdm(progress, remote.path, until, min_rate),
                    )
                transferred += remote.size - resume
        except _transfer_errors() as error:  # the partial file stays: the next run resumes from it
            raise _hub_error(error, repo, commit, endpoint) from None
        sha256, blob_id = file_digests(partial)
        if sha256 == remote.sha256 or (remote.sha256 is None and blob_id == remote.blob_id):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
            return sha256, transferred
        partial.unlink()  # corrupted: never resume from these bytes
    expected = remote.sha256 or f"git blob {remote.blob_id}"
    message = f"content does not match the Hub's checksum {expected} after a second download; nothing was kept"
    raise OssconvError(message, target)


def _offline(repo: str, layout: str, folder: Path, record: _Record, started: float) -> DownloadResult:
    """HF_HUB_OFFLINE: check what an earlier run verified, without the network."""
    result = DownloadResult(repo, "offline", "", layout, str(folder))
    for path, entry in record.entries.items():
        if not wanted(path, layout):
            continue
        remote = RemoteFile(
            path,
            entry["size"],
            entry["expected"] if len(entry["expected"]) == 64 else None,
            entry["expected"] if len(entry["expected"]) != 64 else None,
        )
        target = _safe_target(folder, path)
        if not record.unchanged(remote, target) and not _matches(remote, target)[0]:
            raise OssconvError(
                "changed or missing since it was verified, and HF_HUB_OFFLINE forbids fetching it", target
            )
        result.files.append(FetchedFile(path, entry["size"], entry["sha256"], "unchanged"))
    if not result.files:
        raise OssconvError(f"HF_HUB_OFFLINE is set and no verified {layout!r} files of {repo} are here", folder)
    result.seconds = time.perf_counter() - started
    result.next_steps = _next_steps(folder, layout)
    return result


def _remove_orphans(folder: Path, listed: list[RemoteFile]) -> None:
    """Partial files that no longer lead anywhere: their file completed, or left the listing."""
    keep = {_partial_path(folder, remote) for remote in listed}
    partial_dir = folder / PARTIAL_DIR
    if partial_dir.is_dir():
        for partial in partial_dir.rglob("*.part"):
            if partial not in keep:
                partial.unlink(missing_ok=True)


def _next_steps(folder: Path, layout: str) -> list[str]:  # what to run on what was fetched
    steps, original = [], folder / "original"
    if layout in ("openai", "all") and original.is_dir():
        steps += [f"ossconv inspect {original}", f"ossconv convert {original} OUT --to hf"]
    if layout in ("hf", "all") and any(folder.glob("*.safetensors")):
        steps += [f"ossconv inspect {folder}", f"ossconv convert {folder} OUT --to openai"]
    return steps
