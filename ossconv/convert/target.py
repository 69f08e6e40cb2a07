"""What a writing command is asked to produce (Target), how it writes (WriteOptions), what it wrote.

Every writing command (convert, pack, unpack, reshard, merge) is one plan from a source checkpoint to a
Target, executed with WriteOptions; the library functions take these values (or plain keywords that build
them), so a conflicting request is refused here, whichever way it arrives.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from ossconv.errors import OssconvError
from ossconv.formats import mxfp4
from ossconv.formats.layouts import LAYOUTS
from ossconv.formats.precision import Precision
from ossconv.progress import Progress
from ossconv.units import DEFAULT_MAX_SHARD_SIZE


class ExpertForm(enum.Enum):
    FUSED = "fused"  # one [E, ...] tensor per expert weight
    SPLIT = "split"  # one tensor per expert, ...experts.{j}...


@dataclass(frozen=True)
class Target:
    """The output's layout, expert precision and form. ``rule`` is the MXFP4 scale rule used when float
    experts are encoded; ``expert_range`` keeps only those experts (an expert-parallel rank, split form);
    ``adapters`` are LoRA adapters merged on the way."""

    layout: str
    precision: Precision
    rule: str = "up"
    experts: ExpertForm = ExpertForm.FUSED
    expert_range: range | None = None
    adapters: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise OssconvError(f"unknown layout {self.layout!r}; choose {' or '.join(LAYOUTS)}")
        if not isinstance(self.precision, Precision):
            raise TypeError(f"precision must be a Precision, got {self.precision!r}")
        if self.rule not in mxfp4.RULES:
            raise OssconvError(f"unknown rule {self.rule!r}; choose {' or '.join(mxfp4.RULES)}")
        if self.expert_range is not None and self.experts is not ExpertForm.SPLIT:
            raise OssconvError("a range of experts is written in split form only")

    def merges_into(self, weight: Any) -> bool:
        """Whether an adapter of this target has a delta for ``weight`` (an expert weight of either layout)."""
        return any((weight.layer, weight.proj) in adapter.experts for adapter in self.adapters)


@dataclass(frozen=True)
class WriteOptions:
    """How to write: replace an existing output, largest shard in bytes, where progress goes."""

    overwrite: bool = False
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    progress: Progress | None = None  # None: report to nobody

    def __post_init__(self) -> None:
        if not isinstance(self.max_shard_size, int) or self.max_shard_size <= 0:
            raise OssconvError(f"max_shard_size must be a positive number of bytes, got {self.max_shard_size!r}")


@dataclass
class ConversionResult:
    """What a command wrote; the CLI renders it as text or JSON."""

    command: str
    source: str
    output: str
    source_layout: str
    layout: str
    source_precision: str
    precision: str
    tensors: int
    files: int
    bytes_written: int
    seconds: float
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def experts_form(value: str | ExpertForm | None) -> ExpertForm | None:
    """``fused``/``split`` (or None: as the source) from a keyword argument."""
    if value is None or isinstance(value, ExpertForm):
        return value
    try:
        return ExpertForm(value)
    except ValueError:
        raise OssconvError(f"unknown experts form {value!r}; choose fused or split") from None


def precision_of(value: str | Precision) -> Precision:
    """A Precision from a keyword argument, refusing unknown names as bad input."""
    try:
        return Precision.parse(value)
    except ValueError as error:
        raise OssconvError(str(error)) from None
