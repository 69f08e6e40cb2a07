"""A gpt-oss GGUF file (llama.cpp's layout, ours or llama.cpp's own) read as a model, for inspect, verify and
convert. Built on gguf-py's reader (a memory map: tensor data is read when asked for, one expert at a time).

It presents what :class:`ossconv.checkpoint.Checkpoint` presents to the forward pass and the planner:
canonical (OpenAI-named) dense tensors, experts as ``[out, in]`` with gate/up interleaved again, and MXFP4
experts as the checkpoint's exact blocks and scales.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ossconv.errors import CheckpointError
from ossconv.formats import ggml, layouts, mxfp4
from ossconv.formats.config import ModelConfig
from ossconv.formats.layouts import OPENAI, ExpertWeight
from ossconv.formats.precision import Precision

Q = gguf.GGMLQuantizationType
READABLE_TYPES = (Q.F32, Q.F16, Q.BF16, Q.MXFP4, Q.Q8_0)
_KEY = f"{ggml.ARCH}."


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    found = reader.get_field(key)
    return default if found is None else found.contents()


@dataclass
class GgufModel:
    path: Path
    reader: gguf.GGUFReader
    config: ModelConfig
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # GGUF name -> gguf ReaderTensor
    layout: str = layouts.GGUF
    side_files: list[Path] = field(default_factory=list)
    pieces: dict = field(default_factory=dict)
    config_file: Path | None = None

    # ------------------------------------------------------------------ what the rest of ossconv asks

    @property
    def precision(self) -> Precision:
        kind = self.tensors["blk.0.ffn_down_exps.weight"].tensor_type
        return Precision.MXFP4 if kind == Q.MXFP4 else Precision.of_dtype(ggml.TORCH_OF_TYPE[Q(kind)])

    @property
    def expert_weights(self) -> list[ExpertWeight]:
        return layouts.expert_weights(OPENAI, self.config)

    @property
    def dense_dtype(self) -> torch.dtype:
        """The 2-D weights' type: llama.cpp keeps the source's there (and F32 for norms, biases, router)."""
        kind = Q(self.tensors["token_embd.weight"].tensor_type)
        return ggml.TORCH_OF_TYPE.get(kind, torch.bfloat16)

    @property
    def raw_config(self) -> dict[str, Any]:
        return self.config.to_openai()

    def problems(self) -> list:
        return []  # checked when opened: a GGUF that opens has every tensor in a readable type

    def canonical(self, name: str) -> torch.Tensor:
        first = ggml.gguf_parts(name, self.config.q_dim, self.config.kv_dim)[0][0]
        return self.canonical_rows(name, 0, self._rows(first, name))

    def canonical_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a canonical dense tensor, as floats of the file's type (F32 for Q8_0)."""
        parts = ggml.gguf_parts(name, self.config.q_dim, self.config.kv_dim)
        if parts[0][2] is not None:  # q | k | v rows
            pieces = []
            for gguf_name, _, (first, last) in parts:
                lo, hi = max(start, first), min(stop, last)
                if lo < hi:
                    pieces.append(self._float_rows(gguf_name, lo - first, hi - first))
            return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if len(parts) == 2:  # gate/up bias [E, I] x 2 -> [E, 2I], interleaved
            gate, up = (self._float_rows(p[0], start, stop) for p in parts)
            return torch.stack((gate, up), dim=-1).flatten(-2)
        return self._float_rows(parts[0][0], start, stop)

    def get_expert(
        self, weight: ExpertWeight, expert: int, dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One expert's ``[out, in]`` weight (gate/up rows interleaved again), decoded exactly."""
        if self.precision is Precision.MXFP4:
            blocks, scales = self.get_expert_packed(weight, expert)
            return mxfp4.decode(blocks, scales, dtype, out=out)
        halves = [self._expert_float(name, expert) for name in self.expert_names(weight)]
        matrix = halves[0] if len(halves) == 1 else torch.stack(halves, dim=1).flatten(0, 1)
        return matrix.to(dtype) if out is None else out.copy_(matrix)

    def get_expert_packed(self, weight: ExpertWeight, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's MXFP4 ``(blocks [out, G, 16], scales [out, G])`` as the checkpoints store them."""
        names = self.expert_names(weight)
        packed = [
            ggml.from_block_mxfp4(torch.from_numpy(self._raw_rows(name, expert, expert + 1)[0])) for name in names
        ]
        if len(packed) == 1:
            return packed[0]
        (gate_b, gate_s), (up_b, up_s) = packed
        return torch.stack((gate_b, up_b), 1).flatten(0, 1), torch.stack((gate_s, up_s), 1).flatten(0, 1)

    # ------------------------------------------------------------------ reading

    def expert_names(self, weight: ExpertWeight) -> list[str]:
        return [name for name, _, _ in ggml.gguf_parts(weight.float_name, self.config.q_dim, self.config.kv_dim)]

    def _rows(self, gguf_name: str, canonical: str) -> int:
        parts = ggml.gguf_parts(canonical, self.config.q_dim, self.config.kv_dim)
        if parts[0][2] is not None:
            return parts[-1][2][1]
        return int(self.tensors[gguf_name].data.shape[0])

    def _raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (first axis, numpy order) read from the file, not through the memory map, so
        resident memory holds one slice, not every page ever touched."""
        tensor = self.tensors[name]
        view = tensor.data  # only its shape and dtype: a memory map is not read until indexed
        row_bytes = int(tensor.n_bytes) // view.shape[0]
        with open(self.path, "rb") as handle:
            handle.seek(int(tensor.data_offset) + start * row_bytes)
            raw = handle.read((stop - start) * row_bytes)
        if len(raw) != (stop - start) * row_bytes:
            raise CheckpointError(f"file ended inside tensor {name}", self.path)
        return np.frombuffer(bytearray(raw), dtype=view.dtype).reshape(stop - start, *view.shape[1:])

    def _float_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self.tensors[name]
        data = self._raw_rows(name, start, stop)
        kind = Q(tensor.tensor_type)
        if kind == Q.BF16:
            return torch.from_numpy(data).view(torch.bfloat16)
        if kind == Q.Q8_0:
            return torch.from_numpy(gguf.quants.dequantize(data, Q.Q8_0))
        return torch.from_numpy(data)

    def _expert_float(self, name: str, expert: int) -> torch.Tensor:
        return self._float_rows(name, expert, expert + 1)[0]


def open_gguf(path: str | Path) -> GgufModel:
    """Open and check a gpt-oss GGUF file: magic, structure, architecture, every tensor, shapes and types."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, struct.error) as error:
        raise CheckpointError(f"not a readable GGUF file ({type(error).__name__}: {error})", path) from None
    size = path.stat().st_size
    arch = _field(reader, "general.architecture")
    if arch != ggml.ARCH:
        raise CheckpointError(f"architecture {arch!r} is not gpt-oss", path)
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise CheckpointError(f"tensor {t.name} lies beyond the end of the file", path)
    config = _config(reader, tensors, path)
    for name, shape, kinds in _expected(config):
        if name not in tensors:
            raise CheckpointError(f"tensor {name} is missing", path)
        t = tensors[name]
        found = tuple(int(d) for d in reversed(list(t.shape)))
        if Q(t.tensor_type) not in kinds:
            raise CheckpointError(f"tensor {name} has type {Q(t.tensor_type).name}, which ossconv cannot read", path)
        if found != shape:
            raise CheckpointError(f"tensor {name} has shape {list(found)}, the metadata implies {list(shape)}", path)
    expert_types = {Q(tensors[name].tensor_type) for name in tensors if "_exps.weight" in name}
    if len(expert_types) > 1:
        raise CheckpointError(f"expert weights in several types ({', '.join(t.name for t in expert_types)})", path)
    metadata = {key: _field(reader, key) for key in reader.fields if not key.startswith(("GGUF.", "tokenizer.ggml."))}
    return GgufModel(path, reader, config, metadata, tensors)


def _config(reader: gguf.GGUFReader, tensors: dict[str, Any], path: Path) -> ModelConfig:
    def key(name: str, default: Any = None) -> Any:
        value = _field(reader, _KEY + name, default)
        if value is None:
            raise CheckpointError(f"metadata {_KEY + name} is missing", path)
        return value

    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise CheckpointError("tensor token_embd.weight is missing", path)
    defaults = ModelConfig()
    config = ModelConfig(
        num_hidden_layers=key("block_count"),
        num_experts=key("expert_count"),
        experts_per_token=key("expert_used_count"),
        vocab_size=int(embedding.shape[-1]),
        hidden_size=key("embedding_length"),
        intermediate_size=key("expert_feed_forward_length", _field(reader, _KEY + "feed_forward_length")),
        head_dim=key("attention.key_length"),
        num_attention_heads=key("attention.head_count"),
        num_key_value_heads=key("attention.head_count_kv"),
        sliding_window=key("attention.sliding_window"),
        initial_context_length=key("rope.scaling.original_context_length", defaults.initial_context_length),
        rope_theta=float(key("rope.freq_base")),
        rope_scaling_factor=float(key("rope.scaling.factor", defaults.rope_scaling_factor)),
        rope_ntk_alpha=float(key("rope.scaling.yarn_beta_slow", defaults.rope_ntk_alpha)),
        rope_ntk_beta=float(key("rope.scaling.yarn_beta_fast", defaults.rope_ntk_beta)),
    )
    problems = config.problems()
    if problems:
        raise CheckpointError(f"metadata: {problems[0]}", path)
    return config


def _expected(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], tuple]]:
    """Every GGUF tensor of the model: name, shape (numpy order), the types ossconv reads there."""
    floats = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)
    found = []
    for item in layouts.canonical_tensors(cfg):
        if isinstance(item, ExpertWeight):
            for name, how, _ in ggml.gguf_parts(item.float_name, cfg.q_dim, cfg.kv_dim):
                rows = item.out_features if how == ggml.WHOLE else item.out_features // 2
                found.append((name, (item.num_experts, rows, item.in_features), (Q.MXFP4, Q.F32, Q.F16, Q.BF16)))
            continue
        for name, how, rows in ggml.gguf_parts(item.name, cfg.q_dim, cfg.kv_dim):
            if rows is not None:
                shape = (rows[1] - rows[0], *item.shape[1:])
            elif how == ggml.WHOLE:
                shape = item.shape
            else:
                shape = (*item.shape[:-1], item.shape[-1] // 2)
            found.append((name, shape, floats))
    return found
