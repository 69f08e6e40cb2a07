"""Expert-parallel checkpoints: the manifest's schema, the rank writer, the integrity check and the merge.

``reshard --ep-ranks N`` writes ``rank-{r:05d}-of-{N:05d}/`` folders, each a self-contained checkpoint with
every non-expert tensor and only its contiguous range of experts (split naming, global expert numbers), plus
``ep_manifest.json`` naming each rank's experts, the source's identity and each file's sha256. Every rank
carries the shared tensors so that a rank's loader reads one folder and nothing else. The reader
(:func:`ossconv.checkpoint.open_checkpoint`) opens the whole folder as one model through :func:`rank_folders`;
:func:`merge` puts split or expert-parallel experts back together, byte-identical to the original tensors,
after checking that no rank is missing or tampered with and that the ranks agree on every shared tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ossconv.checkpoint import Checkpoint, open_checkpoint
from ossconv.convert.execute import execute, run
from ossconv.convert.plan import Copy, Plan, plan
from ossconv.convert.target import ConversionResult, ExpertForm, Target, WriteOptions
from ossconv.digests import TrailingHash
from ossconv.errors import CheckpointError, OssconvError, OutputExistsError
from ossconv.files import TensorInfo, inside_folder, read_json
from ossconv.formats import layouts
from ossconv.formats.config import LIMITS
from ossconv.outputs import place, temporary
from ossconv.progress import Progress
from ossconv.units import DEFAULT_MAX_SHARD_SIZE, format_ranges
from ossconv.writer import CheckpointWriter, check_output_apart

EP_MANIFEST_NAME = "ep_manifest.json"
EP_FORMAT = "ossconv-expert-parallel-v1"
HASH_CHUNK = 16 << 20
# sha256 runs at about 1 GB/s per core and releases the GIL: hash files on every core, beside the copying.
HASH_WORKERS = max(2, os.cpu_count() or 2)


def rank_folder_name(rank: int, ranks: int) -> str:
    return f"rank-{rank:05d}-of-{ranks:05d}"


# ---------------------------------------------------------------------------------------------- the manifest


def rank_folders(folder: Path) -> list[Path] | None:
    """The rank folders of an expert-parallel checkpoint (None when ``folder`` is not one)."""
    manifest_path = folder / EP_MANIFEST_NAME
    if not manifest_path.exists() and not manifest_path.is_symlink():
        return None
    manifest = read_json(manifest_path, folder, "expert-parallel manifest")
    ranks = manifest.get("ranks")
    if manifest.get("format") != EP_FORMAT or not isinstance(ranks, list) or not ranks:
        raise CheckpointError(f"not an ossconv expert-parallel manifest (format {EP_FORMAT!r})", manifest_path)
    total = manifest.get("num_experts")
    if not _is_count(total) or total > LIMITS["num_experts"]:
        raise CheckpointError(
            f"num_experts must be a positive integer of at most {LIMITS['num_experts']}", manifest_path
        )
    if len(ranks) > total:
        raise CheckpointError(f"{len(ranks)} ranks for {total} experts", manifest_path)
    folders = []
    for rank in ranks:
        problem = _rank_entry_problem(rank, total)
        if problem:
            raise CheckpointError(f"a rank entry is malformed: {problem}", manifest_path)
        relative = rank["folder"]
        candidate = folder / relative
        if not candidate.is_dir():
            raise CheckpointError(f"rank folder {relative} is missing", folder)
        if not inside_folder(folder, candidate):
            raise CheckpointError(f"the manifest points outside the checkpoint folder: {relative!r}", manifest_path)
        folders.append(candidate)
    return folders


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _rank_entry_problem(rank: object, total: int) -> str | None:
    """What is wrong with one manifest rank entry ({folder, experts: [start, stop], files: {name: sha256}})."""
    if not isinstance(rank, dict):
        return "not an object"
    if not isinstance(rank.get("folder"), str):
        return "no folder"
    experts = rank.get("experts")
    if (
        not isinstance(experts, list)
        or len(experts) != 2
        or not all(isinstance(e, int) and not isinstance(e, bool) for e in experts)
        or not 0 <= experts[0] < experts[1] <= total
    ):
        return f"experts must be [first, stop) with 0 <= first < stop <= {total}, got {experts!r}"
    files = rank.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in files.items()
    ):
        return "files must map file names to sha256 hex digests"
    return None


# ---------------------------------------------------------------------------------------------- writing


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


def write_ranks(ckpt: Checkpoint, out: Path, ranks: int, options: WriteOptions) -> ConversionResult:
    """Write ``ckpt`` as ``ranks`` expert-parallel rank folders in ``out``, with the manifest."""
    started = time.perf_counter()
    total = ckpt.config.num_experts
    if ranks < 1 or total % ranks:
        raise OssconvError(f"{total} experts cannot be divided evenly among {ranks} ranks; choose a divisor of {total}")
    check_output_apart(ckpt.path, out)
    if out.exists() and not options.overwrite:
        raise OutputExistsError(out)
    per_rank = total // ranks
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary(out)
    shutil.rmtree(temp, ignore_errors=True)
    entries, tensors, files = [], 0, 0
    hashes: dict[Path, Future[str] | str] = {}
    first_folder: Path | None = None
    try:
        temp.mkdir(parents=True)
        with ThreadPoolExecutor(HASH_WORKERS) as pool:
            for rank in range(ranks):
                folder = temp / rank_folder_name(rank, ranks)
                experts = range(rank * per_rank, (rank + 1) * per_rank)
                target = Target(ckpt.layout, ckpt.precision, experts=ExpertForm.SPLIT, expert_range=experts)
                rank_plan = plan(ckpt, target)
                adopted, written = _write_rank(rank_plan, folder, first_folder, options)
                first_folder = first_folder or folder
                tensors += len(rank_plan.specs)
                for path in sorted(p for p in folder.iterdir() if p.is_file()):
                    files += path.suffix == ".safetensors"
                    if path.name in adopted:  # the first rank's file, linked: hashed once, there
                        hashes[path] = hashes[first_folder / path.name]
                    elif path.name in written:  # hashed while it was written
                        hashes[path] = written[path.name]
                    else:  # config.json and the like, written whole at the end
                        hashes[path] = pool.submit(file_sha256, path)
                entries.append({"rank": rank, "folder": folder.name, "experts": [experts.start, experts.stop]})
            for entry in entries:
                folder = temp / entry["folder"]
                entry["files"] = {
                    p.name: digest if isinstance(digest, str) else digest.result()
                    for p, digest in hashes.items()
                    if p.parent == folder
                }
        manifest = {
            "format": EP_FORMAT,
            "layout": ckpt.layout,
            "precision": ckpt.precision.value,
            "num_experts": total,
            "ranks": entries,
            "source": {
                "path": str(ckpt.path),
                "config_sha256": file_sha256(ckpt.config_file),
                "tensors": len(ckpt.tensors),
            },
        }
        (temp / EP_MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        place(temp, out, overwrite=options.overwrite)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    precision = ckpt.precision.value
    return ConversionResult(
        "reshard",
        str(ckpt.path),
        str(out),
        ckpt.layout,
        ckpt.layout,
        precision,
        precision,
        tensors,
        files,
        sum(p.stat().st_size for p in out.rglob("*.safetensors")),
        time.perf_counter() - started,
        {
            "experts": ExpertForm.SPLIT.value,
            "ep_ranks": ranks,
            "ranks": [{"rank": e["rank"], "folder": e["folder"], "experts": e["experts"]} for e in entries],
        },
    )


def _write_rank(
    rank_plan: Plan, folder: Path, first: Path | None, options: WriteOptions
) -> tuple[set[str], dict[str, str]]:
    """One rank folder. Its non-expert tensors go into shards of their own, which are byte-identical in every
    rank: the first rank writes them, later ranks hard-link the first rank's files (see
    :meth:`CheckpointWriter.adopt`), so shared bytes are written and hashed once, not once per rank. Every
    file written is hashed right behind the writer (:class:`TrailingHash`). Returns the names of the files
    taken from ``first`` and the sha256 of those written."""
    shared = frozenset(spec.name for spec in rank_plan.specs if not layouts.parse_split_name(spec.name))
    hasher = TrailingHash()
    try:
        with CheckpointWriter(
            folder,
            rank_plan.specs,
            max_shard_size=options.max_shard_size,
            progress=options.progress,
            apart=shared,
            watcher=hasher,
        ) as writer:
            adopted: set[str] = set()
            for shard, filename in enumerate(writer.files):
                names = writer.shard_names(shard)
                if first is not None and names and set(names) <= shared and writer.adopt(shard, first / filename):
                    adopted.add(filename)
            taken = {name for shard in writer.adopted for name in writer.shard_names(shard)}
            steps = [step for step in rank_plan.steps if not (isinstance(step, Copy) and step.target in taken)]
            execute(replace(rank_plan, steps=steps), writer)
            writer.finish(rank_plan.json_files, rank_plan.source.side_files)
        digests = hasher.finish()
    finally:
        hasher.close()
    return adopted, {name: digest for name, digest in digests.items() if name not in adopted}


# ---------------------------------------------------------------------------------------------- checking, merging


def check_expert_parallel(folder: Path) -> None:
    """Refuse an expert-parallel checkpoint whose ranks are missing, tampered with, or disagree."""
    folders = rank_folders(folder)
    if folders is None:
        return
    manifest = read_json(folder / EP_MANIFEST_NAME, folder, "expert-parallel manifest")
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
    # A file linked into several ranks (the shared tensors, see _write_rank) is one file: hashed once.
    inodes = {path: (stat.st_dev, stat.st_ino) for path in expected for stat in [path.stat()]}
    unique = {inode: path for path, inode in reversed(inodes.items())}
    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        digests = dict(zip(unique, pool.map(file_sha256, unique.values()), strict=True))
    actual = {path: digests[inode] for path, inode in inodes.items()}
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
    """Compare two stored tensors' bytes chunk by chunk (memory speed, unlike hashing both); the same place
    in one file linked into two ranks needs no reading."""
    if (a.shape, a.dtype, a.nbytes) != (b.shape, b.dtype, b.nbytes):
        return False
    if a.offset == b.offset and os.path.samefile(a.file, b.file):
        return True
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
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Progress | None = None,
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
    options = WriteOptions(overwrite, max_shard_size, progress)
    with ThreadPoolExecutor(1) as pool:  # check the ranks while copying; nothing lands unless they pass
        check = pool.submit(check_expert_parallel, folder)
        try:
            merged = plan(ckpt, Target(ckpt.layout, ckpt.precision))
            result = run(merged, out, options, command="merge", gate=check.result)
        except CheckpointError:
            check.result()  # a failed check is the cause to report, not what it made the copy stumble on
            raise
    result.details = {"experts": ExpertForm.FUSED.value, "merged_ranks": len(ranks) if ranks else 0}
    result.seconds = time.perf_counter() - started
    return result
