"""reshard: cut a checkpoint differently without changing a byte of any tensor.

- by size: shards of at most ``max_shard_size`` bytes (a bigger tensor gets a shard of its own);
- split experts: every fused expert tensor ``[E, ...]`` becomes E tensors named ``...experts.{j}...``
  (``block.{n}.mlp.experts.{j}.mlp1_weight.blocks``, ``model.layers.{n}.mlp.experts.{j}.gate_up_proj_blocks``),
  MXFP4 blocks, scales, float weights and biases alike; ``fused`` puts them back;
- expert-parallel ranks: ``rank-{r:05d}-of-{N:05d}/`` folders, each a self-contained checkpoint with every
  non-expert tensor and only its contiguous range of experts (split naming, global expert numbers), plus
  ``ep_manifest.json`` naming each rank's experts, the source's identity and each file's sha256. Every rank
  carries the shared tensors so that a rank's loader reads one folder and nothing else.
- merge: split or expert-parallel -> fused, byte-identical to the original tensors, after checking that
  no rank is missing or tampered with and that the ranks agree on every shared tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ossconv.checkpoint import (
    EP_FORMAT,
    EP_MANIFEST_NAME,
    Checkpoint,
    TensorInfo,
    format_ranges,
    inside_folder,
    open_checkpoint,
    rank_folders,
)
from ossconv.convert.stream import ConversionResult, rewrite
from ossconv.errors import CheckpointError, OssconvError, OutputExistsError
from ossconv.writer import DEFAULT_MAX_SHARD_SIZE, check_output_apart

HASH_CHUNK = 16 << 20
# sha256 runs at about 1 GB/s per core and releases the GIL: hash files on every core, beside the copying.
HASH_WORKERS = max(2, os.cpu_count() or 2)


def rank_folder_name(rank: int, ranks: int) -> str:
    return f"rank-{rank:05d}-of-{ranks:05d}"


def file_sha256(path: Path, start: int = 0, nbytes: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        left = os.path.getsize(path) - start if nbytes is None else nbytes
        while left:
            chunk = handle.read(min(HASH_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _result(
    command: str, ckpt: Checkpoint, out: Path, tensors: int, files: int, started: float, **details
) -> ConversionResult:
    written = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    return ConversionResult(
        command,
        str(ckpt.path),
        str(out),
        ckpt.layout,
        ckpt.layout,
        ckpt.precision,
        ckpt.precision,
        tensors,
        files,
        written,
        time.perf_counter() - started,
        details,
    )


def _copy(ckpt: Checkpoint, out: Path | str, command: str, **options: object) -> ConversionResult:
    """Rewrite keeping layout and precision: every job is a byte copy."""
    return rewrite(ckpt, out, command=command, layout=ckpt.layout, experts=ckpt.expert_format, **options)


def reshard(
    src: str | Path,
    out: str | Path,
    *,
    experts: str | None = None,
    ep_ranks: int | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ConversionResult:
    """Re-cut ``src`` into ``out``: by size, with experts ``"fused"`` or ``"split"`` (default: as the
    source), or into ``ep_ranks`` expert-parallel rank folders.

    Example:
        >>> reshard("gpt-oss-120b/original", "gpt-oss-120b-ep4", ep_ranks=4)  # doctest: +SKIP
    """
    if experts not in (None, "fused", "split"):
        raise OssconvError(f"unknown experts form {experts!r}; choose fused or split")
    started = time.perf_counter()
    ckpt = open_checkpoint(src)
    out = Path(out)
    if ep_ranks is not None:
        return _expert_parallel(ckpt, out, ep_ranks, max_shard_size, overwrite, progress, started)
    split = bool(ckpt.pieces) if experts is None else experts == "split"
    result = _copy(
        ckpt, out, "reshard", split=split, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress
    )
    result.details = {"experts": "split" if split else "fused"}
    return result


def _expert_parallel(
    ckpt: Checkpoint,
    out: Path,
    ranks: int,
    max_shard_size: int,
    overwrite: bool,
    progress: Callable[[int], None] | None,
    started: float,
) -> ConversionResult:
    total = ckpt.config.num_experts
    if ranks < 1 or total % ranks:
        raise OssconvError(f"{total} experts cannot be divided evenly among {ranks} ranks; choose a divisor of {total}")
    check_output_apart(ckpt.path, out)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    per_rank = total // ranks
    temp = out.parent / f".{out.name}.ossconv-tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    entries, tensors, files = [], 0, 0
    hashes: dict[Path, Future[str]] = {}
    try:
        temp.mkdir(parents=True)
        with ThreadPoolExecutor(HASH_WORKERS) as pool:
            for rank in range(ranks):
                folder = temp / rank_folder_name(rank, ranks)
                experts = range(rank * per_rank, (rank + 1) * per_rank)
                result = _copy(
                    ckpt,
                    folder,
                    "reshard",
                    split=True,
                    expert_range=experts,
                    max_shard_size=max_shard_size,
                    progress=progress,
                )
                tensors += result.tensors
                files += result.files
                for path in sorted(p for p in folder.iterdir() if p.is_file()):
                    hashes[path] = pool.submit(file_sha256, path)  # while the next rank is written
                entries.append({"rank": rank, "folder": folder.name, "experts": [experts.start, experts.stop]})
            for entry in entries:
                folder = temp / entry["folder"]
                entry["files"] = {p.name: digest.result() for p, digest in hashes.items() if p.parent == folder}
        manifest = {
            "format": EP_FORMAT,
            "layout": ckpt.layout,
            "precision": ckpt.precision,
            "num_experts": total,
            "ranks": entries,
            "source": {
                "path": str(ckpt.path),
                "config_sha256": file_sha256(ckpt.config_file),
                "tensors": len(ckpt.tensors),
            },
        }
        (temp / EP_MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return _result(
        "reshard",
        ckpt,
        out,
        tensors,
        files,
        started,
        experts="split",
        ep_ranks=ranks,
        ranks=[{"rank": e["rank"], "folder": e["folder"], "experts": e["experts"]} for e in entries],
    )


def check_expert_parallel(folder: Path) -> None:
    """Refuse an expert-parallel checkpoint whose ranks are missing, tampered with, or disagree."""
    folders = rank_folders(folder)
    if folders is None:
        return
    manifest = json.loads((folder / EP_MANIFEST_NAME).read_text())
    entries = list(zip(manifest["ranks"], folders, strict=True))
    expected: dict[Path, str] = {}
    for entry, rank_folder in entries:
        listed = entry.get("files") or {}
        for path in sorted(p for p in rank_folder.iterdir() if p.is_file()):
            if path.name not in listed:
                raise CheckpointError("is not in the manifest", path)
        for name, digest in listed.items():
            path = rank_folder / name
            if not path.is_file() or not inside_folder(rank_folder, path):
                raise CheckpointError(f"the manifest lists {name}, which is missing", rank_folder)
            expected[path] = digest
    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        actual = dict(zip(expected, pool.map(file_sha256, expected), strict=True))
    for path, digest in expected.items():
        if actual[path] != digest:
            raise CheckpointError(
                f"sha256 mismatch (tampered or corrupted): manifest {digest[:12]}..., file {actual[path][:12]}...", path
            )
    held: dict[int, str] = {}
    first: Checkpoint | None = None
    for entry, rank_folder in entries:
        rank = open_checkpoint(rank_folder)
        start, stop = entry.get("experts", [None, None])
        for name in rank.pieces:
            experts = sorted(rank.pieces[name])
            if experts != list(range(start, stop)):
                raise CheckpointError(
                    f"the manifest gives this rank experts {start}-{stop - 1} but its {name} "
                    f"holds {format_ranges(experts)}",
                    rank_folder,
                )
        for expert in range(start, stop):
            if expert in held:
                raise CheckpointError(f"expert {expert} is held by both {held[expert]} and {rank_folder.name}", folder)
            held[expert] = rank_folder.name
        first = first or rank
        for name, info in rank.tensors.items():
            if name in rank.pieces:
                continue
            reference = first.tensors.get(name)
            if reference is None or not _same_bytes(reference, info):
                where = reference.file if reference else first.path
                raise CheckpointError(f"{where} and {info.file} disagree on tensor {name}", folder)
    missing = [e for e in range(manifest.get("num_experts", 0)) if e not in held]
    if missing:
        raise CheckpointError(f"no rank holds experts {format_ranges(missing)}", folder)


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    """Compare two stored tensors' bytes chunk by chunk (memory speed, unlike hashing both)."""
    if (a.shape, a.dtype, a.nbytes) != (b.shape, b.dtype, b.nbytes):
        return False
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        fa.seek(a.offset)
        fb.seek(b.offset)
        left = a.nbytes
        while left:
            count = min(HASH_CHUNK, left)
            if fa.read(count) != fb.read(count):
                return False
            left -= count
    return True


def merge(
    src: str | Path,
    out: str | Path,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ConversionResult:
    """Split or expert-parallel -> fused experts, byte-identical to the tensors they came from.

    Example:
        >>> merge("gpt-oss-120b-ep4", "gpt-oss-120b-merged")  # doctest: +SKIP
    """
    started = time.perf_counter()
    folder = Path(src)
    ranks = rank_folders(folder) if folder.is_dir() else None
    ckpt = open_checkpoint(folder)
    if not ckpt.pieces:
        raise OssconvError("experts are already fused; nothing to merge", folder)
    with ThreadPoolExecutor(1) as pool:  # check the ranks while copying; nothing lands unless they pass
        check = pool.submit(check_expert_parallel, folder)
        try:
            result = _copy(
                ckpt,
                out,
                "merge",
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                progress=progress,
                gate=check.result,
            )
        except CheckpointError:
            check.result()  # a failed check is the cause to report, not what it made the copy stumble on
            raise
    result.details = {"experts": "fused", "merged_ranks": len(ranks) if ranks else 0}
    result.seconds = time.perf_counter() - started
    return result


__all__ = ["merge", "reshard"]
