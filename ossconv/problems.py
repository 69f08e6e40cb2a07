"""What is wrong with a checkpoint, as data: a code, the tensor or file, and a message for people.

``inspect`` lists these; every writing command refuses a source that has any. Callers decide by ``code``
and ``subject``, never by reading the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ossconv.formats import layouts
from ossconv.formats.config import SWIGLU_ALPHA
from ossconv.formats.precision import SAFETENSORS_DTYPES
from ossconv.units import format_ranges

if TYPE_CHECKING:
    from ossconv.checkpoint import Checkpoint

MISSING = "missing-tensor"
UNEXPECTED = "unexpected-tensor"
SHAPE = "shape"
DTYPE = "dtype"
MIXED_EXPERT_DTYPES = "mixed-expert-dtypes"
HF_CONFIG = "hf-config"
MISSING_EXPERTS = "missing-experts"
INF_BLOCKS = "inf-blocks"


@dataclass(frozen=True)
class Problem:
    code: str
    subject: str  # the tensor name, or the file name for config problems
    message: str

    def __str__(self) -> str:
        return self.message


def find_problems(ckpt: Checkpoint) -> list[Problem]:
    """Checks that need only headers and config (no tensor data)."""
    expected = {s.name: s for s in layouts.layout_specs(ckpt.layout, ckpt.config, ckpt.precision, ckpt.dense_dtype)}
    found = []
    for name, spec in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            found.append(Problem(MISSING, name, f"missing tensor {name}"))
        elif info.shape != spec.shape:
            found.append(
                Problem(SHAPE, name, f"{name} has shape {list(info.shape)}, the config implies {list(spec.shape)}")
            )
        elif not spec.dtype.is_floating_point and info.dtype != spec.dtype:
            found.append(Problem(DTYPE, name, f"{name} is {SAFETENSORS_DTYPES[info.dtype]}, MXFP4 data must be U8"))
        elif spec.dtype.is_floating_point and not info.dtype.is_floating_point:
            found.append(Problem(DTYPE, name, f"{name} is {SAFETENSORS_DTYPES[info.dtype]}, expected a float dtype"))
    found += [Problem(UNEXPECTED, name, f"unexpected tensor {name}") for name in ckpt.tensors if name not in expected]
    if ckpt.precision.is_float:  # float experts: one dtype for all, or "as the source" means nothing
        dtype = ckpt.precision.torch_dtype
        for weight in ckpt.expert_weights:
            info = ckpt.tensors.get(weight.float_name)
            if info is not None and info.dtype != dtype:
                found.append(
                    Problem(
                        MIXED_EXPERT_DTYPES,
                        weight.float_name,
                        f"{weight.float_name} is {SAFETENSORS_DTYPES[info.dtype]}, other expert weights are "
                        f"{SAFETENSORS_DTYPES[dtype]}",
                    )
                )
    if ckpt.layout == layouts.HF:
        found += [Problem(HF_CONFIG, "config.json", message) for message in hf_config_problems(ckpt)]
    for name in ckpt.pieces:
        missing = ckpt.missing_experts(name)
        if missing:
            total = ckpt.info(name).shape[0]
            found.append(Problem(MISSING_EXPERTS, name, f"{name} lacks experts {format_ranges(missing)} of {total}"))
    return found


def hf_config_problems(ckpt: Checkpoint) -> list[str]:
    """HF config keys that ModelConfig does not carry but that change what transformers computes."""
    raw, found = ckpt.raw_config, []
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", "yarn") != "yarn":
        found.append(f"config.json: rope_type is {rope.get('rope_type')!r}, gpt-oss uses 'yarn'")
    if rope.get("truncate", True) is not False:
        found.append(
            "config.json: rope_scaling.truncate is not false, so transformers rounds YaRN's correction bounds "
            "(gpt-oss, OpenAI's reference and ossconv do not): set it to false"
        )
    if raw.get("swiglu_alpha", SWIGLU_ALPHA) != SWIGLU_ALPHA:
        found.append(f"config.json: swiglu_alpha is {raw['swiglu_alpha']!r}, gpt-oss uses {SWIGLU_ALPHA}")
    if "layer_types" in raw and raw["layer_types"] != ckpt.config.layer_types():
        found.append("config.json: layer_types is not sliding on even layers and full on odd ones, as gpt-oss is")
    return found
