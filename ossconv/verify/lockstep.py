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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ossconv.adapters import load_adapters
from ossconv.checkpoint import Checkpoint, open_checkpoint
from ossconv.errors import OssconvError
from ossconv.progress import NoProgress, Progress
from ossconv.verify import model
from ossconv.verify.compare import LogitMetrics, StateMetrics, logit_metrics, state_metrics
from ossconv.writer import write_file_atomically

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
    adapters: list[str] = field(default_factory=list)  # LoRA adapters merged on the fly


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
    first_divergent_layer: int | str | None = None  # a layer number, "embedding", or None
    same: bool = True
    # Both runs' logits (T, vocab) in fp32; not part of the JSON report (save them with save_logits).
    logits_a: torch.Tensor | None = field(default=None, repr=False, compare=False)
    logits_b: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def verdict(self) -> str:
        return "same" if self.same else "differ"

    def to_dict(self) -> dict[str, object]:
        data = asdict(dataclasses.replace(self, logits_a=None, logits_b=None))
        del data["logits_a"], data["logits_b"]
        data["verdict"] = self.verdict
        return data


def identity(ckpt: Checkpoint) -> CheckpointIdentity:
    if ckpt.config_file is not None:
        data = ckpt.config_file.read_bytes()
    else:  # a GGUF file: its model configuration, as ossconv reads it from the metadata
        data = json.dumps(ckpt.config.to_openai(), sort_keys=True).encode()
    digest = hashlib.sha256(data).hexdigest()
    return CheckpointIdentity(str(ckpt.path), ckpt.layout, ckpt.precision.value, digest)


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


def choose_tokens(
    vocab_size: int,
    tokens: list[int] | None = None,
    prompt_tokens: str | Path | None = None,
    num_tokens: int | None = None,
    seed: int = 0,
) -> list[int]:
    """The token ids to run: given, read from a file, or ``num_tokens`` random ones (default 32)."""
    if sum(x is not None for x in (tokens, prompt_tokens, num_tokens)) > 1:
        raise OssconvError("choose one of tokens, prompt_tokens and num_tokens")
    if tokens is not None:
        return list(tokens)
    if prompt_tokens is not None:
        try:
            text = Path(prompt_tokens).read_text()
        except OSError as error:
            raise OssconvError(f"cannot read: {error.strerror}", prompt_tokens) from None
        except UnicodeDecodeError:
            raise OssconvError("not UTF-8 text", prompt_tokens) from None
        return parse_tokens(text, str(prompt_tokens))
    return random_tokens(vocab_size, DEFAULT_NUM_TOKENS if num_tokens is None else num_tokens, seed)


def verify(
    a: str | Path,
    b: str | Path,
    tokens: list[int] | None = None,
    *,
    prompt_tokens: str | Path | None = None,
    num_tokens: int | None = None,
    seed: int = 0,
    exact: bool = False,
    atol: float | None = None,
    kl_max: float | None = None,
    report: str | Path | None = None,
    save_logits: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    a_lora: Sequence[str | Path] = (),
    b_lora: Sequence[str | Path] = (),
) -> VerifyReport:
    """Run A and B in lockstep on ``tokens`` (or ids read from ``prompt_tokens``, or ``num_tokens`` random
    ones, default 32) and compare after the embedding, every layer and the logits.

    ``exact`` requires bit-identical states and logits; otherwise ``atol`` (default 1e-3) bounds every
    hidden state and the logits, and ``kl_max`` (default 1e-4) the KL divergence at every position.
    ``report`` and ``save_logits`` write the JSON report and both runs' logits (safetensors, tensors ``a``
    and ``b``); neither replaces a file without ``overwrite``. ``progress`` counts layers. ``a_lora`` /
    ``b_lora``: PEFT LoRA adapters merged into that side's weights as they are read, so that
    ``verify(base, merged, a_lora=[adapter])`` proves a merge without writing a float model.

    Example:
        >>> report = verify("gpt-oss-20b/original", "gpt-oss-20b-hf")  # doctest: +SKIP
        >>> report.verdict, report.first_divergent_layer  # doctest: +SKIP
        ('same', None)
    """
    if exact and (atol is not None or kl_max is not None):
        raise OssconvError("choose either exact or atol/kl_max, not both")
    for path in (report, save_logits):
        if path is not None and Path(path).exists() and not overwrite:
            raise OssconvError("already exists; pass --overwrite to replace it", path)
    atol = DEFAULT_ATOL if atol is None else atol
    kl_max = DEFAULT_KL_MAX if kl_max is None else kl_max
    progress = progress or NoProgress()
    ckpt_a, ckpt_b = open_checkpoint(a), open_checkpoint(b)
    tokens = choose_tokens(ckpt_a.config.vocab_size, tokens, prompt_tokens, num_tokens, seed)
    _check_pair(ckpt_a, ckpt_b, tokens)
    result = VerifyReport(identity(ckpt_a), identity(ckpt_b), tokens, "exact" if exact else "tolerance", atol, kl_max)
    progress.add_total(ckpt_a.config.num_hidden_layers + 1)
    weights_a = model.WeightReader(ckpt_a, load_adapters(a_lora, ckpt_a))
    weights_b = model.WeightReader(ckpt_b, load_adapters(b_lora, ckpt_b))
    result.a.adapters = [str(path) for path in a_lora]
    result.b.adapters = [str(path) for path in b_lora]
    ids = torch.tensor(tokens)
    rotary = model.rotary_cos_sin(ckpt_a.config, len(tokens))

    def within(metrics: StateMetrics | LogitMetrics) -> bool:
        return metrics.identical if exact else metrics.max_abs_error <= atol

    def record(step: str, where: int | str, x_a: torch.Tensor, x_b: torch.Tensor) -> None:
        metrics = state_metrics(step, x_a, x_b)
        result.states.append(metrics)
        if not within(metrics):
            result.same = False
            if result.first_divergent_layer is None:
                result.first_divergent_layer = where
        progress(1)

    x_a, x_b = model.embed(weights_a, ids), model.embed(weights_b, ids)
    record("embedding", "embedding", x_a, x_b)
    for layer in range(ckpt_a.config.num_hidden_layers):
        x_a, x_b = model.block(x_a, weights_a, layer, rotary), model.block(x_b, weights_b, layer, rotary)
        record(f"layer {layer}", layer, x_a, x_b)
    result.logits_a, result.logits_b = model.unembed(x_a, weights_a), model.unembed(x_b, weights_b)
    result.logits = logit_metrics(result.logits_a, result.logits_b)
    if not within(result.logits) or (not exact and result.logits.kl_max > kl_max):
        result.same = False
    if report is not None:
        document = json.dumps(result.to_dict(), indent=2) + "\n"
        write_file_atomically(report, document.encode(), overwrite=overwrite)
    if save_logits is not None:
        from safetensors.torch import save

        logits = {"a": result.logits_a.contiguous(), "b": result.logits_b.contiguous()}
        write_file_atomically(save_logits, save(logits), overwrite=overwrite)
    return result
