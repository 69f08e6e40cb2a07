"""inspect: what a checkpoint is, and what is wrong with it.

The report is data (dataclasses); the CLI renders it as text or JSON. MXFP4 statistics are gathered one
expert slice at a time, so inspecting a 120b checkpoint needs no more memory than a 20b one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ossconv.checkpoint import Checkpoint, open_checkpoint
from ossconv.files import ReadAhead
from ossconv.formats import layouts, mxfp4
from ossconv.formats.precision import SAFETENSORS_DTYPES, Precision
from ossconv.gguf_file import GgufModel
from ossconv.prefetch import READ_AHEAD, prefetch
from ossconv.problems import DTYPE, INF_BLOCKS, SHAPE, Problem


@dataclass
class Mxfp4Stats:
    """Statistics of one MXFP4 weight (its blocks and scales)."""

    blocks_tensor: str
    scales_tensor: str
    blocks: int
    scale_min: int
    scale_max: int
    scale_histogram: dict[int, int]  # scale byte -> number of blocks
    zero_blocks: int
    second_encoding_blocks: int  # nonzero blocks whose largest |value| is below 4: another (scale, codes) exists
    inf_blocks: int  # blocks that decode to +-inf in bf16/fp32 (scale 255, or 254 with |value| >= 2)


@dataclass
class InspectReport:
    path: str
    layout: str
    precision: str
    known_model: str
    config: dict[str, object]
    files: list[str]
    tensors: list[dict[str, object]]
    total_bytes: int
    total_parameters: int
    mxfp4: list[Mxfp4Stats] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    metadata: dict[str, object] = field(default_factory=dict)  # GGUF key/values (tokenizer arrays left out)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def mxfp4_stats(ckpt: Checkpoint | GgufModel, weight: layouts.ExpertWeight) -> Mxfp4Stats:
    """Statistics of one MXFP4 weight, read one expert at a time (the next ones read while this one is
    counted), from a checkpoint (mapped from the page cache: read once, not copied) or a GGUF file."""
    counts = mxfp4.BlockCounts.empty()
    if isinstance(ckpt, Checkpoint):
        experts = prefetch(
            (
                (ckpt.map_rows(weight.blocks, expert), ckpt.map_rows(weight.scales, expert))
                for expert in range(weight.num_experts)
            ),
            depth=READ_AHEAD,
        )
    else:
        experts = prefetch(ckpt.get_expert_packed(weight, expert) for expert in range(weight.num_experts))
    for blocks, scales in experts:
        counts.add(mxfp4.count_blocks(blocks, scales))
    histogram = counts.scale_histogram
    used = histogram.nonzero().view(-1)
    return Mxfp4Stats(
        blocks_tensor=weight.blocks,
        scales_tensor=weight.scales,
        blocks=int(histogram.sum()),
        scale_min=int(used.min()) if used.numel() else 0,
        scale_max=int(used.max()) if used.numel() else 0,
        scale_histogram={int(s): int(histogram[s]) for s in used},
        zero_blocks=counts.zero,
        second_encoding_blocks=counts.second_encoding,
        inf_blocks=counts.inf,
    )


def inspect_checkpoint(path: str | Path, *, stats: bool = False) -> InspectReport:
    """Read a checkpoint's headers and config: layout, precision, tensors, problems, in well under a second
    whatever the model's size. ``stats`` also reads every MXFP4 scale and block (the histogram, zero,
    re-encodable and Inf blocks), which takes as long as reading the experts from disk.

    Example:
        >>> report = inspect_checkpoint("gpt-oss-20b/original")  # doctest: +SKIP
        >>> report.layout, report.precision, report.problems  # doctest: +SKIP
        ('openai', 'mxfp4', [])
    """
    ckpt = open_checkpoint(path)
    if not isinstance(ckpt, Checkpoint):
        return _inspect_gguf(ckpt, stats)
    problems = ckpt.problems()
    tensors = [
        {
            "name": info.name,
            "shape": list(info.shape),
            "dtype": SAFETENSORS_DTYPES[info.dtype],
            "bytes": info.nbytes,
            "file": info.file.name,
        }
        for info in ckpt.tensors.values()
    ]
    parameters = 0
    for info in ckpt.tensors.values():
        count = info.nbytes // info.dtype.itemsize
        parameters += (
            count * 2 if info.name.endswith(("blocks", "_blocks")) else 0 if info.name.endswith("scales") else count
        )
    report = InspectReport(
        path=str(path),
        layout=ckpt.layout,
        precision=ckpt.precision.value,
        known_model=ckpt.config.known_model(),
        config=ckpt.config.to_openai(),
        files=sorted({info.file.name for info in ckpt.tensors.values()}),
        tensors=tensors,
        total_bytes=ckpt.total_bytes,
        total_parameters=parameters,
        problems=problems,
    )
    if stats and ckpt.precision is Precision.MXFP4:
        unreadable = {p.subject for p in problems if p.code in (SHAPE, DTYPE)}
        weights = [w for w in ckpt.expert_weights if {w.blocks, w.scales} <= set(ckpt.tensors)]
        weights = [w for w in weights if not {w.blocks, w.scales} & unreadable]
        with ReadAhead([ckpt.stored(weight) for weight in weights]) as read_ahead:  # the disk reads ahead
            for index, weight in enumerate(weights):
                read_ahead.reached(index)
                found = mxfp4_stats(ckpt, weight)
                report.mxfp4.append(found)
                if found.inf_blocks:
                    message = f"{weight.blocks}: {found.inf_blocks} block(s) decode to Inf"
                    problems.append(Problem(INF_BLOCKS, weight.blocks, message))
    return report


def _inspect_gguf(model: GgufModel, stats: bool) -> InspectReport:
    """A GGUF file: its metadata, tensors with their ggml types, and the same MXFP4 statistics."""
    tensors, parameters = [], 0
    for t in model.reader.tensors:
        shape = [int(d) for d in reversed(list(t.shape))]  # numpy order, as for checkpoints
        tensors.append(
            {
                "name": t.name,
                "shape": shape,
                "dtype": t.tensor_type.name,
                "bytes": int(t.n_bytes),
                "file": model.path.name,
            }
        )
        parameters += int(t.n_elements)
    report = InspectReport(
        path=str(model.path),
        layout=model.layout,
        precision=model.precision.value,
        known_model=model.config.known_model(),
        config=model.config.to_openai(),
        files=[model.path.name],
        tensors=tensors,
        total_bytes=sum(t["bytes"] for t in tensors),
        total_parameters=parameters,
        metadata=model.metadata,
    )
    if stats and model.precision is Precision.MXFP4:
        for weight in model.expert_weights:
            found = mxfp4_stats(model, weight)
            found.blocks_tensor = found.scales_tensor = " + ".join(model.expert_names(weight))
            report.mxfp4.append(found)
            if found.inf_blocks:
                message = f"{found.blocks_tensor}: {found.inf_blocks} block(s) decode to Inf"
                report.problems.append(Problem(INF_BLOCKS, found.blocks_tensor, message))
    return report
