"""verify: run two checkpoints through the reference forward pass side by side, layer by layer.

Both runs compute in fp32 from the same tokens. After the embedding and after every layer the hidden states
are compared; the first layer whose error passes the tolerance is named. Two checkpoints that hold the
same values (a lossless conversion in any layout or precision) give bit-identical states, so the default
tolerance can be tight: it passes every lossless path and fails every layout bug, whose errors are O(1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ossconv.checkpoint import Checkpoint, open_checkpoint
from ossconv.errors import OssconvError
from ossconv.verify import model
from ossconv.verify.compare import LogitMetrics, StateMetrics, logit_metrics, state_metrics

# Defaults. A lossless conversion gives 0 everywhere (the same fp32 values go through the same code); a
# transposed, mis-split, swapped or mis-decoded weight moves hidden states and logits by O(0.1 - 10).
DEFAULT_ATOL = 1e-3  # max |a - b| allowed for hidden states after each layer and for logits
DEFAULT_KL_MAX = 1e-4  # max KL(softmax(a) || softmax(b)) over positions
DEFAULT_NUM_TOKENS = 32


@dataclass
class CheckpointIdentity:
    path: str
    layout: str
    precision: str
    config_sha256: str


@dataclass
class VerifyReport:
    a: CheckpointIdentity
    b: CheckpointIdentity
    tokens: list[int]
    mode: str  # "exact" or "tolerance"
    atol: float
    kl_max: float
    states: list[StateMetrics] = field(default_factory=list)  # "embedding", then "layer 0", "layer 1", ...
    logits: LogitMetrics | None = None
    first_divergent_layer: int | None = None
    same: bool = True

    @property
    def verdict(self) -> str:
        return "same" if self.same else "differ"

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["verdict"] = self.verdict
        return data


def identity(ckpt: Checkpoint) -> CheckpointIdentity:
    digest = hashlib.sha256(ckpt.config_file.read_bytes()).hexdigest()
    return CheckpointIdentity(str(ckpt.path), ckpt.layout, ckpt.precision, digest)


def parse_tokens(text: str, source: str = "--tokens") -> list[int]:
    """Token ids written as ``1,2,3``, ``1 2 3`` or a JSON list."""
    text = text.strip()
    try:
        values = json.loads(text) if text.startswith("[") else [int(t) for t in text.replace(",", " ").split()]
    except (ValueError, json.JSONDecodeError):
        raise OssconvError("token ids must be integers separated by commas or spaces, or a JSON list", source) from None
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise OssconvError("expected at least one integer token id", source)
    return values


def random_tokens(vocab_size: int, count: int, seed: int) -> list[int]:
    return torch.randint(0, vocab_size, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def _check_pair(a: Checkpoint, b: Checkpoint, tokens: list[int]) -> None:
    if a.config != b.config:
        differences = [
            f"{f.name} {getattr(a.config, f.name)} vs {getattr(b.config, f.name)}"
            for f in dataclasses.fields(a.config)
            if getattr(a.config, f.name) != getattr(b.config, f.name)
        ]
        raise OssconvError(f"the two checkpoints have different configs: {', '.join(differences)}", b.path)
    bad = [t for t in tokens if not 0 <= t < a.config.vocab_size]
    if bad:
        raise OssconvError(f"token id {bad[0]} is outside the vocabulary (0..{a.config.vocab_size - 1})")


def verify(
    a: str | Path,
    b: str | Path,
    tokens: list[int] | None = None,
    *,
    exact: bool = False,
    atol: float = DEFAULT_ATOL,
    kl_max: float = DEFAULT_KL_MAX,
    on_layer: Callable[[StateMetrics], None] | None = None,
) -> tuple[VerifyReport, torch.Tensor, torch.Tensor]:
    """Run A and B in lockstep; returns the report and both runs' logits ``(T, vocab)`` in fp32.

    ``exact`` requires bit-identical states and logits; otherwise ``atol`` bounds every hidden state and
    the logits, and ``kl_max`` bounds the KL divergence at every position.

    Example:
        >>> report, _, _ = verify("gpt-oss-20b/original", "gpt-oss-20b-hf")  # doctest: +SKIP
        >>> report.verdict, report.first_divergent_layer  # doctest: +SKIP
        ('same', None)
    """
    ckpt_a, ckpt_b = open_checkpoint(a), open_checkpoint(b)
    tokens = random_tokens(ckpt_a.config.vocab_size, DEFAULT_NUM_TOKENS, 0) if tokens is None else tokens
    _check_pair(ckpt_a, ckpt_b, tokens)
    report = VerifyReport(identity(ckpt_a), identity(ckpt_b), tokens, "exact" if exact else "tolerance", atol, kl_max)
    weights_a, weights_b = model.WeightReader(ckpt_a), model.WeightReader(ckpt_b)
    ids = torch.tensor(tokens)
    rotary = model.rotary_cos_sin(ckpt_a.config, len(tokens))

    def within(metrics: StateMetrics | LogitMetrics) -> bool:
        return metrics.identical if exact else metrics.max_abs_error <= atol

    def record(step: str, layer: int | None, x_a: torch.Tensor, x_b: torch.Tensor) -> None:
        metrics = state_metrics(step, x_a, x_b)
        report.states.append(metrics)
        if not within(metrics):
            report.same = False
            if report.first_divergent_layer is None:
                report.first_divergent_layer = 0 if layer is None else layer
        if on_layer:
            on_layer(metrics)

    x_a, x_b = model.embed(weights_a, ids), model.embed(weights_b, ids)
    record("embedding", None, x_a, x_b)
    for layer in range(ckpt_a.config.num_hidden_layers):
        x_a, x_b = model.block(x_a, weights_a, layer, rotary), model.block(x_b, weights_b, layer, rotary)
        record(f"layer {layer}", layer, x_a, x_b)
    logits_a, logits_b = model.unembed(x_a, weights_a), model.unembed(x_b, weights_b)
    report.logits = logit_metrics(logits_a, logits_b)
    if not within(report.logits) or (not exact and report.logits.kl_max > kl_max):
        report.same = False
    return report, logits_a, logits_b
