"""The plan of a write: every output tensor, and the step that produces it. Pure: headers and config only.

A step is either a Copy (byte ranges of stored source tensors, concatenated: renames, the qkv row
split/fuse, MXFP4 blocks and scales, which are the same bytes in both layouts, one expert's slice of a
fused tensor) or a Reencode (an expert weight re-expressed expert by expert: decode, encode, transpose
between ``[E, out, in]`` and HF's ``[E, in, out]``). :mod:`ossconv.convert.execute` carries it out.

Example:
    >>> p = plan(open_checkpoint("gpt-oss-20b/original"), Target("hf", Precision.BF16))  # doctest: +SKIP
    >>> sum(isinstance(step, Reencode) for step in p.steps)  # doctest: +SKIP
    48
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ossconv.checkpoint import CONFIG_NAME, DTYPES_NAME, Checkpoint
from ossconv.convert.target import ExpertForm, Target
from ossconv.errors import CheckpointError
from ossconv.files import TensorInfo
from ossconv.formats import layouts
from ossconv.formats.layouts import OPENAI, ExpertWeight, TensorSpec
from ossconv.formats.precision import Precision
from ossconv.writer import dtypes_json


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start:start + nbytes`` of a stored source tensor's data."""

    tensor: TensorInfo
    start: int
    nbytes: int


@dataclass(frozen=True)
class Copy:
    """Output tensor ``target`` is the concatenation of ``sources``, in order."""

    target: str
    sources: tuple[ByteRange, ...]


@dataclass(frozen=True)
class Reencode:
    """Output expert weight ``target`` is ``source`` re-expressed, one expert at a time (LoRA deltas of the
    target's adapters added on the way)."""

    source: ExpertWeight
    target: ExpertWeight


@dataclass(frozen=True)
class Merge:
    """Output tensor ``target`` is rows ``start:stop`` of canonical dense tensor ``canonical`` with the
    target's adapters merged, in the source dtype."""

    target: str
    canonical: str
    start: int
    stop: int


@dataclass(frozen=True)
class Repack:
    """Output MXFP4 expert weight ``target`` takes ``source``'s codes and scales, unchanged, from a source
    that packs them differently (GGUF's block_mxfp4, gate and up apart)."""

    source: ExpertWeight
    target: ExpertWeight


Step = Copy | Reencode | Merge | Repack


@dataclass(frozen=True)
class Plan:
    source: Checkpoint
    target: Target
    specs: list[TensorSpec]  # the output's tensors in file order
    steps: list[Step]
    json_files: dict[str, dict[str, Any]]  # config.json (and dtypes.json), written beside the weights


def plan(ckpt: Checkpoint, target: Target) -> Plan:
    """Plan writing ``ckpt`` as ``target``. Refuses a source with problems, and a split form combined with a
    change of layout or precision (splitting only re-cuts bytes)."""
    problems = ckpt.problems()
    if problems:
        more = f" (and {len(problems) - 1} more problems; see ossconv inspect)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0].message + more, ckpt.path)
    split = target.experts is ExpertForm.SPLIT
    if ckpt.layout == layouts.GGUF:
        if split:
            raise CheckpointError("convert the GGUF file first, then reshard", ckpt.path)
        return _plan_from_gguf(ckpt, target)
    if split and (target.layout != ckpt.layout or target.precision is not ckpt.precision):
        raise CheckpointError("splitting experts keeps layout and precision; convert first, then reshard", ckpt.path)
    if split and target.adapters:
        raise CheckpointError("adapters are merged into fused experts; merge first, then reshard", ckpt.path)
    cfg = ckpt.config
    target_weights = {(w.layer, w.proj): w for w in layouts.expert_weights(target.layout, cfg)}
    source_weights = {(w.layer, w.proj): w for w in ckpt.expert_weights}
    specs: list[TensorSpec] = []
    steps: list[Step] = []
    for item in layouts.canonical_tensors(cfg):
        if isinstance(item, ExpertWeight):
            source, output = source_weights[(item.layer, item.proj)], target_weights[(item.layer, item.proj)]
            touched = target.merges_into(item)
            if not touched and _same_stored_form(ckpt.precision, target.precision, source, output):
                for spec, stored in zip(output.specs(target.precision), source.specs(ckpt.precision), strict=True):
                    whole = [ByteRange(*piece) for piece in ckpt.byte_pieces(stored.name)]
                    _add_copies(specs, steps, spec, whole, 0, spec.nbytes, split, target.expert_range)
            else:
                specs += output.specs(target.precision)
                steps.append(Reencode(source, output))
            continue
        for spec, mapped, lo, hi in _dense_parts(ckpt, item.name, target.layout):
            row_bytes = spec.nbytes // spec.shape[0] if spec.shape else spec.nbytes
            start, stop = lo // row_bytes, hi // row_bytes
            if any(adapter.touches(item.name, start, stop) for adapter in target.adapters):
                specs.append(spec)
                steps.append(Merge(spec.name, item.name, start, stop))
            else:
                _add_copies(specs, steps, spec, mapped, lo, hi, split, target.expert_range)
    return Plan(ckpt, target, specs, steps, _json_files(ckpt, target, specs))


def _plan_from_gguf(model: Checkpoint, target: Target) -> Plan:
    """Nothing in a GGUF file is stored as a checkpoint stores it: every dense tensor is re-expressed (in the
    type of its 2-D weights: the F32 norms and biases llama.cpp wrote go back exactly), MXFP4 experts are
    repacked with their codes and scales unchanged, float experts re-encoded."""
    cfg, specs, steps = model.config, [], []
    target_weights = {(w.layer, w.proj): w for w in layouts.expert_weights(target.layout, cfg)}
    for item in layouts.canonical_tensors(cfg, model.dense_dtype):
        if isinstance(item, ExpertWeight):
            output = target_weights[(item.layer, item.proj)]
            specs += output.specs(target.precision)
            touched = target.merges_into(item)
            same = model.precision is Precision.MXFP4 and target.precision is Precision.MXFP4 and not touched
            steps.append(Repack(item, output) if same else Reencode(item, output))
            continue
        for part, start, stop in layouts.layout_parts(target.layout, item.name, cfg):
            stop = item.shape[0] if stop is None else stop
            specs.append(TensorSpec(part, (stop - start, *item.shape[1:]), item.dtype))
            steps.append(Merge(part, item.name, start, stop))
    return Plan(model, target, specs, steps, _json_files(model, target, specs))


def _same_stored_form(source: Precision, target: Precision, a: ExpertWeight, b: ExpertWeight) -> bool:
    """MXFP4 blocks and scales are the same bytes in both layouts; float experts only in the same
    orientation and dtype."""
    return source is target and (source is Precision.MXFP4 or a.transposed == b.transposed)


def _add_copies(
    specs: list[TensorSpec],
    steps: list[Step],
    spec: TensorSpec,
    mapped: list[ByteRange],
    lo: int,
    hi: int,
    split: bool,
    experts: range | None,
) -> None:
    """Bytes ``lo:hi`` of ``mapped`` as output tensor ``spec``: whole, or one tensor per expert (``split``),
    limited to ``experts``."""
    if not (split and layouts.is_expert_tensor(spec.name)):
        specs.append(spec)
        steps.append(Copy(spec.name, _window(mapped, lo, hi)))
        return
    per_expert = spec.nbytes // spec.shape[0]
    for j in range(spec.shape[0]) if experts is None else experts:
        piece = TensorSpec(layouts.split_name(spec.name, j), spec.shape[1:], spec.dtype)
        specs.append(piece)
        steps.append(Copy(piece.name, _window(mapped, lo + j * per_expert, lo + (j + 1) * per_expert)))


def _window(mapped: list[ByteRange], lo: int, hi: int) -> tuple[ByteRange, ...]:
    """Bytes ``lo:hi`` of the concatenation of ``mapped``."""
    found, begin = [], 0
    for piece in mapped:
        end = begin + piece.nbytes
        if begin < hi and end > lo:
            first, stop = max(lo, begin), min(hi, end)
            found.append(ByteRange(piece.tensor, piece.start + first - begin, stop - first))
        begin = end
    return tuple(found)


def _dense_parts(ckpt: Checkpoint, name: str, layout: str) -> list[tuple[TensorSpec, list[ByteRange], int, int]]:
    """One canonical dense tensor in ``layout``: each part's spec, and its window of the canonical bytes (a row
    split or fuse never reorders bytes)."""
    sources = [part for part, _, _ in layouts.layout_parts(ckpt.layout, name, ckpt.config)]
    infos = [ckpt.info(part) for part in sources]
    if len({info.dtype for info in infos}) > 1:
        raise CheckpointError(f"the parts of {name} have different dtypes", ckpt.path)
    first = infos[0]
    row_bytes = first.nbytes // first.shape[0] if first.shape else first.nbytes
    mapped = [ByteRange(*piece) for part in sources for piece in ckpt.byte_pieces(part)]
    rows = sum(piece.nbytes for piece in mapped) // row_bytes
    parts = []
    for part, start, stop in layouts.layout_parts(layout, name, ckpt.config):
        stop = rows if stop is None else stop
        shape = (stop - start, *first.shape[1:]) if first.shape else ()
        parts.append((TensorSpec(part, shape, first.dtype), mapped, start * row_bytes, stop * row_bytes))
    return parts


def _json_files(ckpt: Checkpoint, target: Target, specs: list[TensorSpec]) -> dict[str, dict[str, Any]]:
    """config.json (and dtypes.json) for the output; a source config of the same layout keeps its extra keys."""
    if target.layout == OPENAI:
        config = dict(ckpt.raw_config) if ckpt.layout == OPENAI else ckpt.config.to_openai()
        return {CONFIG_NAME: config, DTYPES_NAME: dtypes_json(specs)}
    if ckpt.layout == layouts.HF:
        config = dict(ckpt.raw_config)
    else:
        try:
            dense = Precision.of_dtype(ckpt.dense_dtype)
        except ValueError:
            dense = Precision.BF16
        config = ckpt.config.to_hf(mxfp4=False, torch_dtype=dense.config_name)
    config.pop("quantization_config", None)
    if target.precision is Precision.MXFP4:
        config["quantization_config"] = ckpt.config.to_hf(mxfp4=True)["quantization_config"]
    elif target.precision.torch_dtype.itemsize > ckpt.dense_dtype.itemsize:
        key = "dtype" if "dtype" in config else "torch_dtype"  # transformers 5 writes dtype, 4 torch_dtype
        config[key] = target.precision.config_name  # loading in that dtype must not round the experts
    return {CONFIG_NAME: config}
