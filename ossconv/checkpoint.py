"""A checkpoint folder as a model: its layout, config, tensors and expert weights, read lazily.

Built on :mod:`ossconv.files` (safe reading of the folder's files; its partner :mod:`ossconv.writer` writes
them). Split-expert and expert-parallel checkpoints are read too, their experts presented as the fused
tensors they came from. :meth:`Checkpoint.problems` says what does not fit the config and layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ossconv.errors import CheckpointError
from ossconv.files import (
    TensorInfo,
    cached_share,
    inside_folder,
    map_rows,
    read_folder_tensors,
    read_json,
    read_rows,
    read_rows_direct,
)
from ossconv.formats import layouts, mxfp4
from ossconv.formats.config import ModelConfig
from ossconv.formats.precision import Precision
from ossconv.units import format_ranges

if TYPE_CHECKING:
    from ossconv.problems import Problem

CONFIG_NAME = "config.json"
DTYPES_NAME = "dtypes.json"
# Files beside the weights that describe the model to other tools; copied through by every command.
SIDE_FILE_PATTERN = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|chat_template.*|generation_config\.json|vocab\..*|merges\.txt"
    r"|added_tokens\.json|README\.md|LICENSE.*|USAGE_POLICY)"
)


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
    def precision(self) -> Precision:
        """The expert weights' precision (judged on the first one; :meth:`problems` flags a mix)."""
        weights = self.expert_weights
        if not weights or weights[0].blocks in self.tensors:
            return Precision.MXFP4
        info = self.tensors.get(weights[0].float_name)
        try:
            return Precision.of_dtype(info.dtype) if info else Precision.MXFP4
        except ValueError:
            return Precision.MXFP4  # not a float dtype: problems() names it

    @property
    def expert_weights(self) -> list[layouts.ExpertWeight]:
        return layouts.expert_weights(self.layout, self.config)

    @property
    def dense_dtype(self) -> torch.dtype:
        """The dtype of the non-expert tensors (bf16 in the released checkpoints)."""
        first = next(iter(self.tensors.values()))
        return first.dtype if first.dtype.is_floating_point else torch.bfloat16

    def problems(self) -> list[Problem]:
        """Missing or unexpected tensors, shapes or dtypes that disagree with the config and layout,
        config keys that change what transformers computes, experts missing from a split checkpoint."""
        from ossconv.problems import find_problems  # the validator reads a Checkpoint; it is its own module

        return find_problems(self)

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
        return read_rows(info, 0, info.shape[0] if info.shape else 1)

    def canonical(self, name: str) -> torch.Tensor:
        """A dense tensor by its canonical (OpenAI) name, in its stored dtype (HF's q/k/v rows re-fused)."""
        parts = [self.get(part) for part, _, _ in layouts.layout_parts(self.layout, name, self.config)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def canonical_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a canonical dense tensor, reading only those rows."""
        pieces = []
        for part, first, last in layouts.layout_parts(self.layout, name, self.config):
            last = self.info(part).shape[0] + first if last is None else last
            lo, hi = max(start, first), min(stop, last)
            if lo < hi:
                pieces.append(self.get_rows(part, lo - first, hi - first))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def get_rows(self, name: str, start: int, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """``tensor[start:stop]`` along the first axis (one expert of a fused expert tensor), read alone, into
        ``out`` (a uint8 buffer, see :func:`read_rows`) when given."""
        info = self.info(name)
        stop = start + 1 if stop is None else stop
        if name not in self.pieces:
            return read_rows(info, start, stop, out)
        parts = [self._piece(name, expert) for expert in range(start, stop)]
        if out is None:
            return torch.stack([read_rows(part, 0, part.shape[0] if part.shape else 1) for part in parts])
        position = 0
        for part in parts:
            read_rows(part, 0, part.shape[0] if part.shape else 1, out.view(-1)[position:])
            position += part.nbytes
        return out.view(-1)[:position].view(info.dtype).view(stop - start, *info.shape[1:])

    def map_rows(self, name: str, expert: int) -> torch.Tensor:
        """One expert of a fused expert tensor as :meth:`get_rows` gives it, mapped in place of read (see
        :func:`ossconv.files.map_rows`): for bytes a consumer reads once, straight from the page cache."""
        info, start, stop = self._expert_rows(name, expert)
        return map_rows(info, start, stop).view(1, *self.info(name).shape[1:])

    def read_direct(self, name: str, expert: int, out: torch.Tensor) -> torch.Tensor:
        """One expert of a fused expert tensor as :meth:`get_rows` gives it, read past the page cache into
        ``out`` (see :func:`ossconv.files.read_rows_direct`): for bytes a consumer reads once, not cached."""
        info, start, stop = self._expert_rows(name, expert)
        return read_rows_direct(info, start, stop, out).view(1, *self.info(name).shape[1:])

    def _expert_rows(self, name: str, expert: int) -> tuple[TensorInfo, int, int]:
        """The stored tensor and rows that hold one expert: its own piece, or one row of the fused tensor."""
        if name in self.pieces:
            part = self._piece(name, expert)
            return part, 0, part.shape[0] if part.shape else 1
        return self.info(name), expert, expert + 1

    def cached(self, weight: layouts.ExpertWeight) -> float:
        """The fraction of an expert weight's stored bytes in the page cache now."""
        return cached_share(self.stored(weight))

    def stored(self, source: str | layouts.ExpertWeight) -> list[tuple[Path, int, int]]:
        """The byte ranges (file, offset, size) that hold a canonical dense tensor or an expert weight, for
        read-ahead hints (see :class:`ossconv.files.ReadAhead`)."""
        if isinstance(source, layouts.ExpertWeight):
            names = [source.blocks, source.scales] if source.blocks in self.tensors else [source.float_name]
        else:
            names = [part for part, _, _ in layouts.layout_parts(self.layout, source, self.config)]
        return self._ranges(name for name in names if name in self.tensors)

    def layer_ranges(self, layer: int) -> list[tuple[Path, int, int]]:
        """The byte ranges (file, offset, size) of every stored tensor of one layer, for read-ahead hints."""
        return self._ranges(name for name in self.tensors if layouts.layer_of(name) == layer)

    def _ranges(self, names: Iterable[str]) -> list[tuple[Path, int, int]]:
        """Where these tensors' bytes are: each expert's piece for experts stored one tensor each."""
        infos = []
        for name in names:
            infos += self.pieces[name].values() if name in self.pieces else [self.tensors[name]]
        return [(info.file, info.offset, info.nbytes) for info in infos]

    def get_expert(
        self, weight: layouts.ExpertWeight, expert: int, dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One expert's weight as ``[out, in]`` of ``dtype``: MXFP4 decoded, HF's ``[in, out]`` floats
        un-transposed. ``out`` (a contiguous ``[out, in]`` buffer) is filled and returned when given."""
        if weight.blocks in self.tensors:
            blocks = self.get_rows(weight.blocks, expert)[0]
            scales = self.get_rows(weight.scales, expert)[0]
            return mxfp4.decode(blocks, scales, dtype, out=out)
        matrix = weight.from_stored(self.get_rows(weight.float_name, expert)[0])
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


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open and check a checkpoint folder: its files, headers, index, layout and config (or a ``.gguf``
    file, read by :mod:`ossconv.gguf_file` as the same model).

    Besides plain folders it reads split-expert checkpoints and expert-parallel ones (a folder with
    ``ep_manifest.json`` and rank folders), presenting their experts as the fused tensors they came from.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError("no such folder", folder)
    if folder.is_file() and folder.suffix == ".gguf":
        from ossconv.gguf_file import open_gguf  # llama.cpp's single-file format, read as the same model

        return open_gguf(folder)
    if not folder.is_dir():
        raise CheckpointError("not a folder; pass the folder that holds the checkpoint", folder)
    from ossconv.expert_parallel import rank_folders  # the manifest's schema lives with its writer

    ranks = rank_folders(folder)
    tensors: dict[str, TensorInfo] = {}
    for part in ranks or [folder]:
        read_folder_tensors(part, shared_ok=ranks is not None, into=tensors)
    home = ranks[0] if ranks else folder  # where config.json and side files are
    layout = layouts.detect_layout(set(tensors))
    if layout is None:
        raise CheckpointError("no gpt-oss tensors found (neither OpenAI nor Hugging Face names)", folder)
    config_path = home / CONFIG_NAME
    if not config_path.exists() and not config_path.is_symlink():
        raise CheckpointError("config.json is missing", home)
    raw_config = read_json(config_path, home, "config.json")
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


def open_folder_checkpoint(path: str | Path, command: str) -> Checkpoint:
    """:func:`open_checkpoint` for commands that rewrite a checkpoint folder in its own layout."""
    ckpt = open_checkpoint(path)
    if not isinstance(ckpt, Checkpoint):
        raise CheckpointError(
            f"a GGUF file: {command} works on checkpoint folders; use convert --to hf or openai", path
        )
    return ckpt
