"""inspect: what a checkpoint is, and what is wrong with it.

The report is data (dataclasses); the CLI renders it as text or JSON. MXFP4 statistics are gathered one
expert slice at a time, so inspecting a 120b checkpoint needs no more memory than a 20b one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ossconv.checkpoint import Checkpoint, format_ranges, open_checkpoint
from ossconv.formats import layouts, mxfp4
from ossconv.formats.layouts import MXFP4, SAFETENSORS_DTYPES

MAX_FP4_CODE = 7  # magnitude index of 6.0
SECOND_ENCODING_BELOW = 6  # a block whose largest magnitude index is below 6 (value 4.0) can be re-scaled


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
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def mxfp4_stats(ckpt: Checkpoint, weight: layouts.ExpertWeight) -> Mxfp4Stats:
    histogram = torch.zeros(256, dtype=torch.int64)
    code_counts = torch.zeros(MAX_FP4_CODE + 1, dtype=torch.int64)
    inf = 0
    for expert in range(ckpt.info(weight.blocks).shape[0]):
        blocks = ckpt.get_rows(weight.blocks, expert)
        scales = ckpt.get_rows(weight.scales, expert)
        largest = mxfp4.max_code_magnitude(blocks).view(-1)
        scales = scales.view(-1)
        histogram += torch.bincount(scales, minlength=256)
        code_counts += torch.bincount(largest, minlength=MAX_FP4_CODE + 1)
        inf += int((((scales == 255) & (largest > 0)) | ((scales == 254) & (largest >= 4))).sum())
    used = histogram.nonzero().view(-1)
    return Mxfp4Stats(
        blocks_tensor=weight.blocks,
        scales_tensor=weight.scales,
        blocks=int(histogram.sum()),
        scale_min=int(used.min()) if used.numel() else 0,
        scale_max=int(used.max()) if used.numel() else 0,
        scale_histogram={int(s): int(histogram[s]) for s in used},
        zero_blocks=int(code_counts[0]),
        second_encoding_blocks=int(code_counts[1:SECOND_ENCODING_BELOW].sum()),
        inf_blocks=inf,
    )


def find_problems(ckpt: Checkpoint) -> list[str]:
    """Missing or unexpected tensors, and shapes or dtypes that disagree with the config and layout."""
    first = next(iter(ckpt.tensors.values()))
    dense_dtype = first.dtype if first.dtype.is_floating_point else torch.bfloat16
    expected = {s.name: s for s in layouts.layout_specs(ckpt.layout, ckpt.config, ckpt.expert_format, dense_dtype)}
    problems = []
    for name, spec in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            problems.append(f"missing tensor {name}")
        elif info.shape != spec.shape:
            problems.append(f"{name} has shape {list(info.shape)}, the config implies {list(spec.shape)}")
        elif spec.dtype == torch.uint8 and info.dtype != torch.uint8:
            problems.append(f"{name} is {SAFETENSORS_DTYPES[info.dtype]}, MXFP4 data must be U8")
        elif spec.dtype != torch.uint8 and not info.dtype.is_floating_point:
            problems.append(f"{name} is {SAFETENSORS_DTYPES[info.dtype]}, expected a float dtype")
    problems += [f"unexpected tensor {name}" for name in ckpt.tensors if name not in expected]
    if ckpt.expert_format != MXFP4:  # float experts: one dtype for all, or "as the source" means nothing
        for weight in layouts.expert_weights(ckpt.layout, ckpt.config):
            info = ckpt.tensors.get(weight.float_name)
            if info is not None and info.dtype != ckpt.expert_format:
                problems.append(
                    f"{weight.float_name} is {SAFETENSORS_DTYPES[info.dtype]}, other expert weights are "
                    f"{SAFETENSORS_DTYPES[ckpt.expert_format]}"
                )
    if ckpt.layout == layouts.HF:
        problems += hf_config_problems(ckpt.raw_config, ckpt.config.num_hidden_layers)
    for name in ckpt.pieces:
        missing = ckpt.missing_experts(name)
        if missing:
            problems.append(f"{name} lacks experts {format_ranges(missing)} of {ckpt.info(name).shape[0]}")
    return problems


def hf_config_problems(raw: dict, layers: int) -> list[str]:
    """HF config keys that ModelConfig does not carry but that change what transformers computes."""
    found = []
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", "yarn") != "yarn":
        found.append(f"config.json: rope_type is {rope.get('rope_type')!r}, gpt-oss uses 'yarn'")
    if rope.get("truncate", True) is not False:
        found.append(
            "config.json: rope_scaling.truncate is not false, so transformers rounds YaRN's correction bounds "
            "(gpt-oss, OpenAI's reference and ossconv do not): set it to false"
        )
    expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if "layer_types" in raw and raw["layer_types"] != expected:
        found.append("config.json: layer_types is not sliding on even layers and full on odd ones, as gpt-oss is")
    return found


def inspect_checkpoint(path: str | Path, *, stats: bool = True) -> InspectReport:
    """Read a checkpoint's headers and config (and, with ``stats``, every MXFP4 scale and block).

    Example:
        >>> report = inspect_checkpoint("gpt-oss-20b/original")  # doctest: +SKIP
        >>> report.layout, report.precision, report.problems  # doctest: +SKIP
        ('openai', 'mxfp4', [])
    """
    ckpt = open_checkpoint(path)
    problems = find_problems(ckpt)
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
        precision=ckpt.precision,
        known_model=ckpt.config.known_model(),
        config=ckpt.config.to_openai(),
        files=sorted({info.file.name for info in ckpt.tensors.values()}),
        tensors=tensors,
        total_bytes=ckpt.total_bytes,
        total_parameters=parameters,
        problems=problems,
    )
    if stats and ckpt.expert_format == MXFP4:
        for weight in layouts.expert_weights(ckpt.layout, ckpt.config):
            if weight.blocks in ckpt.tensors and weight.scales in ckpt.tensors and not _shape_problem(weight, problems):
                found = mxfp4_stats(ckpt, weight)
                report.mxfp4.append(found)
                if found.inf_blocks:
                    problems.append(f"{weight.blocks}: {found.inf_blocks} block(s) decode to Inf")
    return report


def _shape_problem(weight: layouts.ExpertWeight, problems: list[str]) -> bool:
    return any(p.startswith((weight.blocks + " ", weight.scales + " ")) for p in problems)
