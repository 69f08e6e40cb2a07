"""convert --to gguf: one ``.gguf`` file for llama.cpp, byte for byte as its own converter writes it.

The plan is the list of GGUF tensors in llama.cpp's file order (its converter first writes every MXFP4 expert
tensor, then every other tensor in the order it loads the HF checkpoint: shard files sorted by name, tensor
names sorted within each file), each with its ggml type and where its values come from. gguf-py's writer
takes the header, metadata and tensor table; the data is then streamed one tensor, or one expert, at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ossconv.checkpoint import Checkpoint, open_folder_checkpoint
from ossconv.convert.target import ConversionResult, precision_of
from ossconv.errors import CheckpointError, OssconvError, OutputExistsError
from ossconv.files import ReadAhead
from ossconv.formats import ggml, layouts, mxfp4
from ossconv.formats.layouts import HF, ExpertWeight
from ossconv.formats.precision import Precision
from ossconv.outputs import place, temporary
from ossconv.prefetch import prefetch
from ossconv.progress import NoProgress, Progress
from ossconv.writer import WRITE_CHUNK, check_output_apart

DENSE_ROWS = 16384  # rows of a 2-D tensor read and written at a time
TOKENIZER_NOTE = "no tokenizer.json beside the source: llama.cpp needs the tokenizer metadata to run this file"


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists the dims reversed)
    ggml_type: gguf.GGMLQuantizationType
    source: str | ExpertWeight  # a canonical dense tensor, or an expert weight (OpenAI names)
    how: str  # ggml.WHOLE, GATE or UP
    rows: tuple[int, int] | None = None  # a row range (q, k or v of qkv)

    @property
    def nbytes(self) -> int:
        count = int(np.prod(self.shape))
        if self.ggml_type == gguf.GGMLQuantizationType.MXFP4:
            return count // mxfp4.BLOCK_SIZE * ggml.GGML_MXFP4_BLOCK_BYTES
        return count * ggml.TORCH_OF_TYPE[self.ggml_type].itemsize


def plan_gguf(ckpt: Checkpoint, experts: Precision) -> list[GgufTensor]:
    """Every GGUF tensor in llama.cpp's file order."""
    problems = ckpt.problems()
    if problems:
        raise CheckpointError(problems[0].message, ckpt.path)
    cfg = ckpt.config
    dense_type = ggml.FLOAT_TYPES[ckpt.dense_dtype]
    by_hf_name: dict[str, list[GgufTensor]] = {}
    hf_weights = {(w.layer, w.proj): w for w in layouts.expert_weights(HF, cfg)}
    for item in layouts.canonical_tensors(cfg):
        if isinstance(item, ExpertWeight):
            hf = hf_weights[(item.layer, item.proj)]
            key = hf.scales if experts is Precision.MXFP4 else hf.float_name
            by_hf_name[key] = [
                GgufTensor(name, _expert_shape(item, how), ggml.expert_type(experts), item, how)
                for name, how, _ in ggml.gguf_parts(item.float_name, cfg.q_dim, cfg.kv_dim)
            ]
            continue
        parts = ggml.gguf_parts(item.name, cfg.q_dim, cfg.kv_dim)
        hf_parts = layouts.layout_parts(HF, item.name, cfg)
        groups = [[part] for part in parts] if len(hf_parts) == len(parts) else [parts]
        for (hf_name, _, _), group in zip(hf_parts, groups, strict=True):
            found = []
            for name, how, rows in group:
                shape = _dense_shape(item.shape, how, rows)
                kind = gguf.GGMLQuantizationType.F32 if ggml.keeps_f32(name, len(shape)) else dense_type
                found.append(GgufTensor(name, shape, kind, item.name, how, rows))
            by_hf_name[hf_name] = found
    order = _load_order(ckpt, list(by_hf_name))
    first = [t for name in order if name.endswith("_scales") for t in by_hf_name[name]]  # MXFP4 experts
    return first + [t for name in order if not name.endswith("_scales") for t in by_hf_name[name]]


def _expert_shape(weight: ExpertWeight, how: str) -> tuple[int, ...]:
    rows = weight.out_features if how == ggml.WHOLE else weight.out_features // 2
    return (weight.num_experts, rows, weight.in_features)


def _dense_shape(shape: tuple[int, ...], how: str, rows: tuple[int, int] | None) -> tuple[int, ...]:
    if rows is not None:
        return (rows[1] - rows[0], *shape[1:])
    if how == ggml.WHOLE:
        return shape
    return (*shape[:-1], shape[-1] // 2)  # a gate/up bias [E, 2I] -> [E, I]


def _load_order(ckpt: Checkpoint, hf_names: list[str]) -> list[str]:
    """The order llama.cpp reads an HF checkpoint in: files sorted by name, names sorted within a file. A
    source that is not that HF checkpoint (another layout or precision) is read as one HF file would be."""
    same = ckpt.layout == HF and not ckpt.pieces and all(name in ckpt.tensors for name in hf_names)
    if same:
        return sorted(hf_names, key=lambda name: (ckpt.info(name).file.name, name))
    return sorted(hf_names)


# ---------------------------------------------------------------------------------------------- metadata


def _hf_config(ckpt: Checkpoint) -> dict:
    return ckpt.raw_config if ckpt.layout == HF else ckpt.config.to_hf(mxfp4=ckpt.precision is Precision.MXFP4)


def _model_card_folder(ckpt: Checkpoint) -> Path:
    """Where llama.cpp would take the model's name from: the folder, or above OpenAI's ``original/``."""
    folder = ckpt.path.resolve()
    return folder.parent if ckpt.layout == layouts.OPENAI and folder.name == "original" else folder


def _add_metadata(writer: gguf.GGUFWriter, ckpt: Checkpoint, experts: Precision) -> None:
    """The keys llama.cpp's converter writes for gpt-oss, in its order."""
    cfg, hf = ckpt.config, _hf_config(ckpt)
    total, shared, expert, count = writer.get_total_parameter_count()
    card = _model_card_folder(ckpt)
    metadata = gguf.Metadata.load(None, card, None, total)
    if metadata.name is None:
        metadata.name = card.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, count)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(
        hf.get("max_position_embeddings", int(cfg.initial_context_length * cfg.rope_scaling_factor))
    )
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn" and "factor" in rope:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", cfg.initial_context_length))
        writer.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", cfg.rope_ntk_beta))
        writer.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", cfg.rope_ntk_alpha))
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(hf.get("rms_norm_eps", 1e-5))
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.experts_per_token)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_file_type(ggml.file_type(experts, ckpt.dense_dtype))
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_expert_feed_forward_length(cfg.intermediate_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------------------------------------- data


class _Streamed:
    """What gguf-py's ``write_tensor_data`` needs of an array (``nbytes``, ``tofile``), filled piece by piece
    so that only one expert is in memory."""

    def __init__(self, nbytes: int, pieces: Iterator[torch.Tensor], progress: Progress):
        self.nbytes, self.pieces, self.progress = nbytes, pieces, progress

    def tofile(self, handle) -> None:  # noqa: ANN001 (a binary file)
        written = 0
        for piece in self.pieces:
            data = memoryview(piece.contiguous().view(-1).view(torch.uint8).numpy())
            for start in range(0, len(data), WRITE_CHUNK):  # 1 MiB writes, as the checkpoint writer's
                handle.write(data[start : start + WRITE_CHUNK])
            written += len(data)
            self.progress(len(data))
        if written != self.nbytes:
            raise RuntimeError(f"wrote {written} bytes of a {self.nbytes}-byte tensor")


def _pieces(ckpt: Checkpoint, tensor: GgufTensor, rule: str) -> Iterator[torch.Tensor]:
    if isinstance(tensor.source, ExpertWeight):
        yield from _expert_pieces(ckpt, tensor, rule)
        return
    dtype = ggml.TORCH_OF_TYPE[tensor.ggml_type]
    if tensor.rows is not None:  # q, k or v: rows of the fused qkv
        yield ckpt.canonical_rows(tensor.source, *tensor.rows).to(dtype)
        return
    rows = tensor.shape[0] if len(tensor.shape) > 1 else None
    if rows is None:  # 1-D: norms, biases, sinks
        yield ggml.cut(ckpt.canonical(tensor.source), tensor.how, None, axis=-1).to(dtype)
        return
    for start in range(0, rows, DENSE_ROWS):  # an embedding is never whole in memory
        chunk = ckpt.canonical_rows(tensor.source, start, min(rows, start + DENSE_ROWS))
        yield ggml.cut(chunk, tensor.how, None, axis=-1).to(dtype)


def _expert_pieces(ckpt: Checkpoint, tensor: GgufTensor, rule: str) -> Iterator[torch.Tensor]:
    weight = next(w for w in ckpt.expert_weights if (w.layer, w.proj) == (tensor.source.layer, tensor.source.proj))
    mxfp4_out = tensor.ggml_type == gguf.GGMLQuantizationType.MXFP4
    for expert in range(weight.num_experts):
        if mxfp4_out and ckpt.precision is Precision.MXFP4:  # the same codes and scales, repacked
            blocks = ggml.cut(ckpt.get_rows(weight.blocks, expert)[0], tensor.how, None)
            scales = ggml.cut(ckpt.get_rows(weight.scales, expert)[0], tensor.how, None)
            yield ggml.to_block_mxfp4(blocks, scales)
            continue
        dtype = ckpt.precision.torch_dtype if mxfp4_out else ggml.TORCH_OF_TYPE[tensor.ggml_type]
        matrix = ggml.cut(ckpt.get_expert(weight, expert, dtype), tensor.how, None)
        if not mxfp4_out:
            yield matrix
            continue
        try:
            blocks, scales = mxfp4.encode(matrix.contiguous(), rule)
        except mxfp4.NonFiniteError as error:
            raise CheckpointError(f"{weight.float_name} expert {expert}: {error}", ckpt.path) from None
        yield ggml.to_block_mxfp4(blocks, scales)


# ---------------------------------------------------------------------------------------------- the command


def convert_to_gguf(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | Precision = Precision.MXFP4,
    rule: str = "up",
    overwrite: bool = False,
    progress: Progress | None = None,
    tokenizer_pre: str | None = None,
) -> ConversionResult:
    """Write ``src`` (either layout, any precision) as one GGUF file for llama.cpp; ``dtype`` sets the experts
    (``mxfp4``, ``bf16``, ``fp16``, ``fp32``), every other tensor as llama.cpp's converter stores it. With a
    ``tokenizer.json`` beside the source (or above OpenAI's ``original/``) the tokenizer metadata is written
    as llama.cpp writes it; ``tokenizer_pre`` names the pre-tokenizer where llama.cpp's hash table would not
    know it (gpt-oss's own tokenizer is "gpt-4o").

    Example:
        >>> convert_to_gguf("gpt-oss-20b", "gpt-oss-20b.gguf")  # doctest: +SKIP
    """
    started = time.perf_counter()
    experts = precision_of(dtype)
    if rule not in mxfp4.RULES:
        raise OssconvError(f"unknown rule {rule!r}; choose {' or '.join(mxfp4.RULES)}")
    out = Path(out)
    ckpt = open_folder_checkpoint(src, "convert --to gguf")
    check_output_apart(ckpt.path, out)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    if out.exists() and out.is_dir():
        raise OssconvError("is a folder; GGUF output is one file", out)
    tensors = plan_gguf(ckpt, experts)
    progress = progress or NoProgress()
    progress.add_total(sum(t.nbytes for t in tensors))
    writer = gguf.GGUFWriter(None, ggml.ARCH)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    _add_metadata(writer, ckpt, experts)
    tokenizer = _tokenizer_folder(ckpt)
    if tokenizer is not None:
        from ossconv.gguf_vocab import add_tokenizer  # only needed with a tokenizer

        try:
            add_tokenizer(writer, tokenizer, ckpt.config.vocab_size, _hf_config(ckpt), pre=tokenizer_pre)
        except (ValueError, KeyError, OSError) as error:
            raise CheckpointError(f"tokenizer: {error}", tokenizer / "tokenizer.json") from None
    temp = temporary(out)
    try:
        writer.write_header_to_file(path=temp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ReadAhead([ckpt.stored(t.source) for t in tensors]) as read_ahead:
            for index, t in enumerate(tensors):
                read_ahead.reached(index)
                writer.write_tensor_data(_Streamed(t.nbytes, prefetch(_pieces(ckpt, t, rule)), progress))
        writer.close()
        place(temp, out, overwrite=overwrite)
    except OSError as error:
        raise OssconvError(f"cannot write: {error.strerror or error}", out) from None
    finally:
        writer.close()
        temp.unlink(missing_ok=True)
    details: dict[str, object] = {"tokenizer": str(tokenizer) if tokenizer else None}
    if tokenizer is None:
        details["note"] = TOKENIZER_NOTE
    return ConversionResult(
        "convert",
        str(ckpt.path),
        str(out),
        ckpt.layout,
        "gguf",
        ckpt.precision.value,
        experts.value,
        len(tensors),
        1,
        out.stat().st_size,
        time.perf_counter() - started,
        details,
    )


def _tokenizer_folder(ckpt: Checkpoint) -> Path | None:
    for folder in (ckpt.path, _model_card_folder(ckpt)):
        if (folder / "tokenizer.json").is_file():
            return folder
    return None
