"""verify: run two checkpoints through the reference forward pass side by side, layer by layer.

Both runs compute in fp32 from the same tokens. After the embedding and after every layer the hidden states
are compared; the first layer whose error passes the tolerance is named. Two checkpoints that hold the
same values (a lossless conversion in any layout or precision) give bit-identical states, so the default
tolerance can be tight: it passes every lossless path and fails every layout bug, whose errors are O(1).

The tokens come as ids, or as text cases (prompts and chats through the checkpoint's own tokenizer and chat
template, :mod:`ossconv.text`); with ``generate`` each side also continues each case greedily (KV cache), and
a different continuation is a difference too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ossconv.adapters import load_adapters
from ossconv.checkpoint import Checkpoint, open_checkpoint
from ossconv.errors import OssconvError
from ossconv.files import ReadAhead
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
class Case:
    """One input: token ids, and the text they came from (a prompt, or a rendered chat) when there is one."""

    id: str
    tokens: list[int]
    text: str | None = None


@dataclass
class Generation:
    """Greedy continuations of one case on A and on B, and the first position where they part (None: same)."""

    a: list[int]
    b: list[int]
    text_a: str | None = None
    text_b: str | None = None
    parted_at: int | None = None


@dataclass
class CaseReport:
    id: str
    tokens: list[int]
    text: str | None = None
    states: list[StateMetrics] = field(default_factory=list)  # "embedding", then "layer 0", "layer 1", ...
    logits: LogitMetrics | None = None
    first_divergent_layer: int | str | None = None  # a layer number, "embedding", or None
    generation: Generation | None = None
    same: bool = True


@dataclass
class VerifyReport:
    a: CheckpointIdentity
    b: CheckpointIdentity
    mode: str  # "exact" or "tolerance"
    atol: float
    kl_max: float
    cases: list[CaseReport] = field(default_factory=list)
    # The first case's logits (T, vocab) in fp32 on each side; not in the JSON (save them with save_logits).
    logits_a: torch.Tensor | None = field(default=None, repr=False, compare=False)
    logits_b: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def same(self) -> bool:
        return all(case.same for case in self.cases)

    @property
    def verdict(self) -> str:
        return "same" if self.same else "differ"

    # One case (token ids) reads as before: its fields at the top level.
    @property
    def tokens(self) -> list[int]:
        return self.cases[0].tokens

    @property
    def states(self) -> list[StateMetrics]:
        return self.cases[0].states

    @property
    def logits(self) -> LogitMetrics | None:
        return self.cases[0].logits

    @property
    def first_divergent_layer(self) -> int | str | None:
        return next((c.first_divergent_layer for c in self.cases if c.first_divergent_layer is not None), None)

    def to_dict(self) -> dict[str, object]:
        data = asdict(dataclasses.replace(self, logits_a=None, logits_b=None))
        del data["logits_a"], data["logits_b"]
        first = data["cases"][0]
        data.update(tokens=first["tokens"], states=first["states"], logits=first["logits"])
        data.update(first_divergent_layer=self.first_divergent_layer, verdict=self.verdict, same=self.same)
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
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError, as is Python's limit on digits
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


def _check_pair(a: Checkpoint, b: Checkpoint, cases: list[Case]) -> None:
    if a.config != b.config:
        differences = [
            f"{f.name} {getattr(a.config, f.name)} vs {getattr(b.config, f.name)}"
            for f in dataclasses.fields(a.config)
            if getattr(a.config, f.name) != getattr(b.config, f.name)
        ]
        raise OssconvError(f"the two checkpoints have different configs: {', '.join(differences)}", b.path)
    for case in cases:
        bad = [t for t in case.tokens if not 0 <= t < a.config.vocab_size]
        if bad:
            where = "" if case.id == "tokens" else f"case {case.id}: "
            raise OssconvError(f"{where}token id {bad[0]} is outside the vocabulary (0..{a.config.vocab_size - 1})")


def verify(
    a: str | Path,
    b: str | Path,
    tokens: list[int] | None = None,
    *,
    prompt_tokens: str | Path | None = None,
    num_tokens: int | None = None,
    seed: int = 0,
    prompts: Sequence[str] = (),
    chats: Sequence[str | Path] = (),
    cases_file: str | Path | None = None,
    tokenizer: str | Path | None = None,
    reasoning_effort: str | None = None,
    generate: int = 0,
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
    """Run A and B in lockstep and compare after the embedding, every layer and the logits.

    Inputs: ``tokens`` (ids), ids read from ``prompt_tokens``, ``num_tokens`` random ids (the default: 32),
    or text cases: ``prompts`` (plain text), ``chats`` (JSON files of ``{"role", "content"}`` messages,
    rendered with the checkpoint's chat template, ``reasoning_effort`` passed to it) and ``cases_file`` (JSON
    lines of ``{"text": ...}`` or ``{"messages": [...]}``, optionally an ``"id"``), tokenized with A's own
    ``tokenizer.json`` (or ``tokenizer``). ``generate``: greedy continuations of that many tokens on each side.

    ``exact`` requires bit-identical states and logits; otherwise ``atol`` (default 1e-3) bounds every hidden
    state and the logits, and ``kl_max`` (default 1e-4) the KL divergence at every position; differing
    continuations always differ. ``report`` and ``save_logits`` write the JSON report and the first case's
    logits (safetensors, tensors ``a`` and ``b``); neither replaces a file without ``overwrite``.
    ``a_lora`` / ``b_lora``: PEFT LoRA adapters merged into that side's weights as they are read.

    Example:
        >>> report = verify("gpt-oss-20b/original", "gpt-oss-20b-hf")  # doctest: +SKIP
        >>> report.verdict, report.first_divergent_layer  # doctest: +SKIP
        ('same', None)
    """
    if exact and (atol is not None or kl_max is not None):
        raise OssconvError("choose either exact or atol/kl_max, not both")
    if generate < 0:
        raise OssconvError(f"generate must be a number of tokens, got {generate}")
    for path in (report, save_logits):
        if path is not None and Path(path).exists() and not overwrite:
            raise OssconvError("already exists; pass --overwrite to replace it", path)
    tolerance = _Tolerance(exact, DEFAULT_ATOL if atol is None else atol, DEFAULT_KL_MAX if kl_max is None else kl_max)
    progress = progress or NoProgress()
    ckpt_a, ckpt_b = open_checkpoint(a), open_checkpoint(b)
    texts = bool(prompts or chats or cases_file)
    if texts and any(x is not None for x in (tokens, prompt_tokens, num_tokens)):
        raise OssconvError("choose token ids or text (prompts, chats, a cases file), not both")
    decoder = None
    if texts or (generate and tokenizer is not None):
        from ossconv import text

        source = text.TextSource.open(ckpt_a.path, tokenizer)
        cases = source.cases(prompts, chats, cases_file, reasoning_effort) if texts else []
        decoder = source.decode
    if not texts:
        ids = choose_tokens(ckpt_a.config.vocab_size, tokens, prompt_tokens, num_tokens, seed)
        cases = [Case("tokens", ids)]
    _check_pair(ckpt_a, ckpt_b, cases)
    result = VerifyReport(identity(ckpt_a), identity(ckpt_b), tolerance.mode, tolerance.atol, tolerance.kl_max)
    weights_a = model.WeightReader(ckpt_a, load_adapters(a_lora, ckpt_a))
    weights_b = model.WeightReader(ckpt_b, load_adapters(b_lora, ckpt_b))
    result.a.adapters = [str(path) for path in a_lora]
    result.b.adapters = [str(path) for path in b_lora]
    progress.add_total(len(cases) * (ckpt_a.config.num_hidden_layers + 1 + generate))
    for number, case in enumerate(cases):
        found, logits_a, logits_b = _run_case(case, weights_a, weights_b, tolerance, progress, generate, decoder)
        result.cases.append(found)
        if number == 0:
            result.logits_a, result.logits_b = logits_a, logits_b
    if report is not None:
        document = json.dumps(result.to_dict(), indent=2) + "\n"
        write_file_atomically(report, document.encode(), overwrite=overwrite)
    if save_logits is not None:
        from safetensors.torch import save

        logits = {"a": result.logits_a.contiguous(), "b": result.logits_b.contiguous()}
        write_file_atomically(save_logits, save(logits), overwrite=overwrite)
    return result


@dataclass(frozen=True)
class _Tolerance:
    exact: bool
    atol: float
    kl_max: float

    @property
    def mode(self) -> str:
        return "exact" if self.exact else "tolerance"

    def within(self, metrics: StateMetrics | LogitMetrics) -> bool:
        return metrics.identical if self.exact else metrics.max_abs_error <= self.atol


def _run_case(
    case: Case,
    weights_a: model.WeightReader,
    weights_b: model.WeightReader,
    tolerance: _Tolerance,
    progress: Progress,
    generate: int,
    decoder: Any,
) -> tuple[CaseReport, torch.Tensor, torch.Tensor]:
    found = CaseReport(case.id, case.tokens, case.text)
    ids = torch.tensor(case.tokens)
    rotary = model.rotary_cos_sin(weights_a.config, len(case.tokens))
    cache_a, cache_b = (model.KVCache(), model.KVCache()) if generate else (None, None)

    def record(step: str, where: int | str, x_a: torch.Tensor, x_b: torch.Tensor) -> None:
        metrics = state_metrics(step, x_a, x_b)
        found.states.append(metrics)
        if not tolerance.within(metrics):
            found.same = False
            if found.first_divergent_layer is None:
                found.first_divergent_layer = where
        progress(1)

    x_a, x_b = model.embed(weights_a, ids), model.embed(weights_b, ids)
    record("embedding", "embedding", x_a, x_b)
    layers = weights_a.config.num_hidden_layers
    sides = [w.ckpt for w in (weights_a, weights_b) if isinstance(w.ckpt, Checkpoint)]  # GGUF: read as it comes
    ranges = [[r for ckpt in sides for r in ckpt.layer_ranges(layer)] for layer in range(layers)]
    largest = max((sum(n for _, _, n in layer) for layer in ranges), default=0)
    with ReadAhead(ranges, window=2 * largest) as read_ahead:  # the next layer of both sides, while we compute
        for layer in range(layers):
            read_ahead.reached(layer)
            x_a = model.block(x_a, weights_a, layer, rotary, cache_a)
            x_b = model.block(x_b, weights_b, layer, rotary, cache_b)
            record(f"layer {layer}", layer, x_a, x_b)
    logits_a, logits_b = model.unembed(x_a, weights_a), model.unembed(x_b, weights_b)
    found.logits = logit_metrics(logits_a, logits_b)
    if not tolerance.within(found.logits) or (not tolerance.exact and found.logits.kl_max > tolerance.kl_max):
        found.same = False
    if generate:
        start = len(case.tokens)
        more_a = model.greedy(weights_a, logits_a[-1], start, generate, cache_a)
        more_b = model.greedy(weights_b, logits_b[-1], start, generate, cache_b)
        progress(generate)
        parted = next((i for i, (x, y) in enumerate(zip(more_a, more_b, strict=True)) if x != y), None)
        texts = (decoder(more_a), decoder(more_b)) if decoder else (None, None)
        found.generation = Generation(more_a, more_b, *texts, parted_at=parted)
        if parted is not None:
            found.same = False
    return found, logits_a, logits_b
