"""Reading checkpoints (its partner :mod:`ossconv.writer` writes them; no other module opens their files).

A folder holds one ``*.safetensors`` file or shards listed by ``model.safetensors.index.json``.
Headers are parsed here (shapes, dtypes, byte offsets) and checked by safetensors' own reader; tensor data
is read one tensor, or one expert slice, at a time through ``safe_open``, whose memory map is closed after
each read so resident memory never accumulates. Pickled weights are refused, never loaded, and no index
entry or symlink may lead outside the folder.
Split-expert and expert-parallel checkpoints are read too, their experts presented as the fused tensors.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ossconv.errors import CheckpointError, OssconvError
from ossconv.formats import layouts, mxfp4
from ossconv.formats.config import ModelConfig
from ossconv.formats.layouts import MXFP4, TORCH_DTYPES, TensorSpec

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
DTYPES_NAME = "dtypes.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
EP_MANIFEST_NAME = "ep_manifest.json"
EP_FORMAT = "ossconv-expert-parallel-v1"
# Files beside the weights that describe the model to other tools; copied through by every command.
SIDE_FILE_PATTERN = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|chat_template.*|generation_config\.json|vocab\..*|merges\.txt"
    r"|added_tokens\.json|README\.md|LICENSE.*|USAGE_POLICY)"
)


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
    size = int(number * base**power)
    if size <= 0:
        raise OssconvError(f"size {text!r} must be positive")
    return size


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.shape, self.dtype)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start, header dict) of a safetensors file, checked for sizes that could not be right."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError("not a safetensors file (shorter than its 8-byte header length)", path)
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise CheckpointError(f"not a safetensors file (header length {length} for a {size}-byte file)", path)
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"safetensors header is not valid JSON ({error})", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", path)
    return 8 + length, header


def _tensor_infos(path: Path) -> dict[str, TensorInfo]:
    start, header = read_header(path)
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = TORCH_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"tensor {name!r} has a malformed header entry", path) from None
        infos[name] = TensorInfo(name, shape, dtype, path, start + begin, end - begin)
    try:  # safetensors' own reader checks offsets, coverage and sizes
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as error:
        raise CheckpointError(str(error).replace("Error while deserializing header: ", ""), path) from None
    return infos


def inside_folder(folder: Path, candidate: Path) -> bool:
    """Whether ``candidate`` exists and, symlinks resolved, lies inside ``folder``."""
    try:
        candidate.resolve(strict=True).relative_to(folder.resolve())
    except (FileNotFoundError, ValueError, OSError):
        return False
    return True


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and the index's weight map (None without an index)."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(
                "not a valid index (expected a JSON object with a 'weight_map')", index_path
            ) from None
        files = []
        for relative in dict.fromkeys(weight_map.values()):
            candidate = folder / relative
            if Path(relative).is_absolute() or not inside_folder(folder, candidate):
                if not candidate.exists() and inside_folder(folder, candidate.parent):
                    raise CheckpointError(f"the index names {relative!r}, which does not exist", index_path)
                raise CheckpointError(f"the index points outside the checkpoint folder: {relative!r}", index_path)
            files.append(candidate)
        return files, weight_map
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"holds only pickled weights ({', '.join(pickles[:3])}); ossconv never loads pickles "
                "(they can run code): use safetensors weights",
                folder,
            )
        raise CheckpointError("no .safetensors files in this folder", folder)
    for file in files:
        if not inside_folder(folder, file):
            raise CheckpointError("symlink points outside the checkpoint folder", file)
    return files, None


@dataclass
class Checkpoint:
    """An opened checkpoint folder. Tensor data is read only when asked for, one tensor or slice at a time."""

    path: Path
    layout: str
    config: ModelConfig
    raw_config: dict[str, Any]
    tensors: dict[str, TensorInfo]  # in file order (layouts.order_key); split experts appear fused
    side_files: list[Path] = field(default_factory=list)
    # Fused expert tensors stored split, one tensor per expert (split or expert-parallel checkpoints):
    # fused name -> expert -> that expert's tensor. Their TensorInfo in ``tensors`` has offset -1.
    pieces: dict[str, dict[int, TensorInfo]] = field(default_factory=dict)
    config_file: Path | None = None  # config.json (in the first rank's folder for expert-parallel ones)

    @property
    def expert_format(self) -> str | torch.dtype:
        """``"mxfp4"`` or the float dtype of the expert weights."""
        weights = layouts.expert_weights(self.layout, self.config)
        if not weights or weights[0].blocks in self.tensors:
            return MXFP4
        info = self.tensors.get(weights[0].float_name)
        return info.dtype if info else MXFP4

    @property
    def precision(self) -> str:
        return layouts.precision_name(self.expert_format)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is missing", self.path) from None

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, in memory (the file's map is closed again before returning)."""
        info = self.info(name)
        if name in self.pieces:
            return self.get_rows(name, 0, info.shape[0])
        with _open_file(info.file) as handle:
            return handle.get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int | None = None) -> torch.Tensor:
        """``tensor[start:stop]`` along the first axis (one expert of a fused expert tensor), read alone."""
        info = self.info(name)
        stop = start + 1 if stop is None else stop
        if name in self.pieces:
            parts = [self._piece(name, expert) for expert in range(start, stop)]
            rows = []
            for part in parts:
                with _open_file(part.file) as handle:
                    rows.append(handle.get_tensor(part.name))
            return torch.stack(rows)
        with _open_file(info.file) as handle:
            return handle.get_slice(name)[start:stop]

    def get_expert(
        self, weight: layouts.ExpertWeight, expert: int, dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One expert's weight as ``[out, in]`` of ``dtype``: MXFP4 decoded, HF's ``[in, out]`` floats
        un-transposed. ``out`` (a contiguous ``[out, in]`` buffer) is filled and returned when given."""
        if weight.blocks in self.tensors:
            blocks = self.get_rows(weight.blocks, expert)[0]
            scales = self.get_rows(weight.scales, expert)[0]
            return mxfp4.decode(blocks, scales, dtype, out=out)
        matrix = self.get_rows(weight.float_name, expert)[0]
        matrix = matrix.T if weight.transposed else matrix
        if out is None:
            return matrix.to(dtype).contiguous()
        return out.copy_(matrix)

    def _piece(self, name: str, expert: int) -> TensorInfo:
        try:
            return self.pieces[name][expert]
        except KeyError:
            held = sorted(self.pieces[name])
            raise CheckpointError(
                f"expert {expert} of {name} is not here (this checkpoint holds experts "
                f"{format_ranges(held)}: an expert-parallel rank?)",
                self.path,
            ) from None

    def byte_pieces(self, name: str) -> list[tuple[TensorInfo, int, int]]:
        """Where the tensor's bytes live, in order: (stored tensor, first byte, byte count)."""
        info = self.info(name)
        if name in self.pieces:
            return [(part, 0, part.nbytes) for part in (self._piece(name, e) for e in range(info.shape[0]))]
        return [(info, 0, info.nbytes)]

    def missing_experts(self, name: str) -> list[int]:
        if name not in self.pieces:
            return []
        return [e for e in range(self.info(name).shape[0]) if e not in self.pieces[name]]


def format_ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans: list[list[int]] = []
    for value in values:
        if spans and value == spans[-1][1] + 1:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans) or "none"


class _open_file:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self.handle = safe_open(self.path, framework="pt")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read: {error}", self.path) from None
        return self.handle.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.handle.__exit__(*exc)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"not valid JSON ({error})", path) from None
    if not isinstance(value, dict):
        raise CheckpointError("expected a JSON object", path)
    return value


def _read_tensors(
    folder: Path, shared_ok: bool = False, into: dict[str, TensorInfo] | None = None
) -> dict[str, TensorInfo]:
    """Every tensor of one folder (checked against its index); ``shared_ok`` lets non-expert tensors that
    an earlier folder already gave (expert-parallel ranks each carry them) be skipped."""
    tensors = {} if into is None else into
    files, weight_map = _weight_files(folder)
    seen: dict[str, Path] = {}
    for file in files:
        for name, info in _tensor_infos(file).items():
            if name in seen:
                raise CheckpointError(f"tensor {name!r} is stored twice (also in {seen[name].name})", file)
            seen[name] = file
            if name in tensors:
                if shared_ok and layouts.parse_split_name(name) is None:
                    continue
                raise CheckpointError(f"tensor {name!r} is stored twice (also in {tensors[name].file})", file)
            tensors[name] = info
    if weight_map is not None:
        for name, relative in weight_map.items():
            if name not in seen or seen[name].name != Path(relative).name:
                raise CheckpointError(
                    f"the index places {name!r} in {relative}, which does not hold it", folder / INDEX_NAME
                )
    return tensors


def rank_folders(folder: Path) -> list[Path] | None:
    """The rank folders of an expert-parallel checkpoint (None when ``folder`` is not one)."""
    manifest_path = folder / EP_MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    manifest = _read_json(manifest_path)
    ranks = manifest.get("ranks")
    if manifest.get("format") != EP_FORMAT or not isinstance(ranks, list) or not ranks:
        raise CheckpointError(f"not an ossconv expert-parallel manifest (format {EP_FORMAT!r})", manifest_path)
    if not _is_count(manifest.get("num_experts")):
        raise CheckpointError("num_experts must be a positive integer", manifest_path)
    folders = []
    for rank in ranks:
        problem = _rank_entry_problem(rank)
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


def _rank_entry_problem(rank: object) -> str | None:
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
        or not 0 <= experts[0] < experts[1]
    ):
        return f"experts must be [first, stop) with 0 <= first < stop, got {experts!r}"
    files = rank.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in files.items()
    ):
        return "files must map file names to sha256 hex digests"
    return None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open and check a checkpoint folder: its files, headers, index, layout and config.

    Besides plain folders it reads split-expert checkpoints and expert-parallel ones (a folder with
    ``ep_manifest.json`` and rank folders), presenting their experts as the fused tensors they came from.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError("no such folder", folder)
    if not folder.is_dir():
        raise CheckpointError("not a folder; pass the folder that holds the checkpoint", folder)
    ranks = rank_folders(folder)
    tensors: dict[str, TensorInfo] = {}
    for part in ranks or [folder]:
        _read_tensors(part, shared_ok=ranks is not None, into=tensors)
    home = ranks[0] if ranks else folder  # where config.json and side files are
    layout = layouts.detect_layout(set(tensors))
    if layout is None:
        raise CheckpointError("no gpt-oss tensors found (neither OpenAI nor Hugging Face names)", folder)
    config_path = home / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError("config.json is missing", home)
    raw_config = _read_json(config_path)
    try:
        config = ModelConfig.from_openai(raw_config) if layout == layouts.OPENAI else ModelConfig.from_hf(raw_config)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"not a gpt-oss {layout} config: {error}", config_path) from None
    problems = config.problems()
    if problems:
        raise CheckpointError(problems[0], config_path)
    pieces = _fuse_split_experts(tensors, config, folder)
    ordered = {name: tensors[name] for name in sorted(tensors, key=layouts.order_key)}
    side = sorted(
        p for p in home.iterdir() if p.is_file() and SIDE_FILE_PATTERN.fullmatch(p.name) and inside_folder(home, p)
    )
    return Checkpoint(folder, layout, config, raw_config, ordered, side, pieces, config_path)


def _fuse_split_experts(
    tensors: dict[str, TensorInfo], config: ModelConfig, folder: Path
) -> dict[str, dict[int, TensorInfo]]:
    """Replace per-expert tensors in ``tensors`` by a fused entry; return the pieces behind each."""
    pieces: dict[str, dict[int, TensorInfo]] = {}
    for name in list(tensors):
        parsed = layouts.parse_split_name(name)
        if parsed:
            fused, expert = parsed
            held = pieces.setdefault(fused, {})
            if expert in held:
                raise CheckpointError(
                    f"expert {expert} of {fused} is stored twice ({held[expert].name})", tensors[name].file
                )
            held[expert] = tensors.pop(name)
    for fused, by_expert in pieces.items():
        first = by_expert[min(by_expert)]
        for expert, info in by_expert.items():
            if (info.shape, info.dtype) != (first.shape, first.dtype):
                raise CheckpointError(
                    f"expert {expert} of {fused} has another shape or dtype than expert {min(by_expert)}", info.file
                )
            if not 0 <= expert < config.num_experts:
                raise CheckpointError(
                    f"{info.name}: expert {expert} does not exist (num_experts {config.num_experts})", info.file
                )
        if fused in tensors:
            raise CheckpointError(f"{fused} is stored both fused and split", folder)
        total = config.num_experts
        tensors[fused] = TensorInfo(
            fused, (total, *first.shape), first.dtype, first.file, -1, len(by_expert) * first.nbytes
        )
    return pieces
