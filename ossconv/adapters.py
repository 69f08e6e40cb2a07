"""LoRA adapters (as PEFT writes them for gpt-oss) read, checked against a base checkpoint, and applied.

An Adapter maps onto the base in canonical terms: deltas on rows of canonical dense tensors (q/k/v land on
rows of the fused ``attn.qkv``), per-expert deltas on expert weights (``[out, in]``), and whole-tensor
replacements (``modules_to_save``). Every tensor in the adapter file is accounted for, or loading fails:
nothing is silently dropped. Adapters are small (rank x width); replacements are read when used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ossconv.checkpoint import Checkpoint
from ossconv.errors import CheckpointError
from ossconv.files import check_regular, inside_folder, open_file, read_json
from ossconv.formats import layouts, peft
from ossconv.formats.layouts import HF

SHOWN_UNKNOWN = 3


@dataclass(frozen=True)
class RowDelta:
    """A low-rank delta on rows ``start:stop`` of a canonical dense tensor (a linear layer or an embedding)."""

    canonical: str
    start: int
    stop: int
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False

    def rows(self, lo: int, hi: int) -> tuple[int, int, torch.Tensor] | None:
        """The delta on canonical rows ``lo:hi``: (first, stop, values) of the overlap, or None."""
        first, stop = max(lo, self.start), min(hi, self.stop)
        if first >= stop:
            return None
        if self.embedding:
            values = peft.embedding_delta_rows(self.a, self.b, self.scale, first - self.start, stop - self.start)
        else:
            values = self.scale * (self.b[first - self.start : stop - self.start].float() @ self.a.float())
        return first, stop, values


class ExpertDelta:
    """ParamWrapper's factors, read from the adapter file when this weight is merged and regrouped per expert:
    ``B[e]`` ``[out, r]`` and ``A[e]`` ``[r, in]`` in fp32, so merging expert e is one ``addmm`` into its weight
    (no ``[out, in]`` delta is ever formed). :meth:`release` drops them again: memory holds one weight's
    factors, not the whole adapter's."""

    def __init__(self, layer: int, proj: str, file: Path, keys: tuple[str, str], rank: int, scale: float, experts: int):
        self.layer, self.proj, self.rank, self.scale, self.num_experts = layer, proj, rank, scale, experts
        self.file, self.keys = file, keys
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._factors is None:
            with open_file(self.file) as handle:
                a, b = (handle.get_tensor(key) for key in self.keys)
            self._factors = peft.expert_factors(a, b, self.rank, self.num_experts)
        return self._factors

    @property
    def a(self) -> torch.Tensor:
        return self._load()[0]

    @property
    def b(self) -> torch.Tensor:
        return self._load()[1]

    def add_to(self, matrix: torch.Tensor, expert: int) -> torch.Tensor:
        """``matrix += s * B[e] @ A[e]`` in place (fp32)."""
        a, b = self._load()
        return matrix.addmm_(b[expert], a[expert], alpha=self.scale)

    def release(self) -> None:
        self._factors = None


@dataclass(frozen=True)
class Replacement:
    """A whole base tensor from ``modules_to_save``: rows ``start:stop`` of a canonical tensor."""

    canonical: str
    start: int
    stop: int
    file: Path
    key: str

    def rows(self, lo: int, hi: int) -> tuple[int, int, torch.Tensor] | None:
        first, stop = max(lo, self.start), min(hi, self.stop)
        if first >= stop:
            return None
        with open_file(self.file) as handle:
            values = handle.get_slice(self.key)[first - self.start : stop - self.start]
        return first, stop, values.float()


@dataclass
class Adapter:
    path: Path
    rows: list[RowDelta | Replacement] = field(default_factory=list)
    experts: dict[tuple[int, str], ExpertDelta] = field(default_factory=dict)

    def touches(self, canonical: str, start: int = 0, stop: int | None = None) -> bool:
        """Whether any term changes rows ``start:stop`` (None: to the end) of ``canonical``."""
        end = float("inf") if stop is None else stop
        return any(t.canonical == canonical and t.start < end and t.stop > start for t in self.rows)

    def apply_rows(self, canonical: str, lo: int, hi: int, values: torch.Tensor) -> None:
        """Merge into ``values`` (fp32 canonical rows ``lo:hi``): replacements first, then deltas."""
        terms = [t for t in self.rows if t.canonical == canonical]
        for term in sorted(terms, key=lambda t: not isinstance(t, Replacement)):
            found = term.rows(lo, hi)
            if found is None:
                continue
            first, stop, update = found
            if isinstance(term, Replacement):
                values[first - lo : stop - lo] = update
            else:
                values[first - lo : stop - lo] += update

    def describe(self) -> dict[str, object]:
        canonical = sorted({t.canonical for t in self.rows})
        return {"path": str(self.path), "dense": canonical, "experts": [f"block.{n}.mlp.{p}" for n, p in self.experts]}


def merge_rows(adapters: Sequence[Adapter], canonical: str, lo: int, hi: int, values: torch.Tensor) -> torch.Tensor:
    for adapter in adapters:
        adapter.apply_rows(canonical, lo, hi, values)
    return values


def release_expert(adapters: Sequence[Adapter], layer: int, proj: str) -> None:
    """Drop the factors of one expert weight once it is merged."""
    for adapter in adapters:
        term = adapter.experts.get((layer, proj))
        if term is not None:
            term.release()


def merge_expert(adapters: Sequence[Adapter], layer: int, proj: str, expert: int, matrix: torch.Tensor) -> torch.Tensor:
    """Add every adapter's delta for one expert to ``matrix`` (fp32 ``[out, in]``), in order, in place."""
    for adapter in adapters:
        term = adapter.experts.get((layer, proj))
        if term is not None:
            term.add_to(matrix, expert)
    return matrix


def expert_delta_norm(adapters: Sequence[Adapter], layer: int, proj: str, expert: int) -> float:
    """``||sum_i s_i B_i A_i||`` from r x r products only: ``<B_i A_i, B_j A_j> = tr((B_i^T B_j)(A_j A_i^T))``."""
    terms = [t for t in (a.experts.get((layer, proj)) for a in adapters) if t is not None]
    total = 0.0
    for first in terms:
        for second in terms:
            gram_b = first.b[expert].T @ second.b[expert]  # [r_i, r_j]
            gram_a = second.a[expert] @ first.a[expert].T  # [r_j, r_i]
            total += first.scale * second.scale * float((gram_b * gram_a.T).sum())
    return max(total, 0.0) ** 0.5


# ---------------------------------------------------------------------------------------------- loading


def load_adapter(folder: str | Path, ckpt: Checkpoint) -> Adapter:
    """Read a PEFT LoRA adapter folder and check every tensor against ``ckpt``'s model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError("no such adapter folder", folder)
    config_path, weights = folder / peft.CONFIG_NAME, folder / peft.WEIGHTS_NAME
    if not weights.is_file() or not inside_folder(folder, weights):
        pickles = [name for name in peft.PICKLE_NAMES if (folder / name).exists()]
        if pickles:
            raise CheckpointError(
                f"holds only pickled weights ({pickles[0]}); ossconv never loads pickles: re-save the adapter "
                "with safe_serialization=True",
                folder,
            )
        raise CheckpointError(f"{peft.WEIGHTS_NAME} is missing", folder)
    if not config_path.is_file():
        raise CheckpointError(
            f"{peft.CONFIG_NAME} is missing (it holds lora_alpha, without which r cannot scale)", folder
        )
    config = read_json(config_path, folder, peft.CONFIG_NAME)
    _check_config(config, config_path)
    check_regular(weights, folder)
    with open_file(weights) as handle:  # attention factors are small: read now; experts' and replacements' later
        tensors = {
            key: handle.get_tensor(key) if _read_now(key) else _Shape(tuple(handle.get_slice(key).get_shape()), key)
            for key in handle.keys()
        }
    return _map(folder, weights, config, tensors, ckpt)


def _read_now(key: str) -> bool:
    return ".lora_" in key and ".mlp.experts" not in key


@dataclass(frozen=True)
class _Shape:
    """A tensor of the adapter file known by its shape until it is used."""

    shape: tuple[int, ...]
    key: str

    def dim(self) -> int:
        return len(self.shape)


def _check_config(config: dict[str, Any], path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"peft_type {config.get('peft_type')!r} is not LoRA", path)
    if config.get("use_dora"):
        raise CheckpointError(
            "use_dora: DoRA adapters are not supported (their magnitudes are not a low-rank delta)", path
        )
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"bias {config.get('bias')!r}: only adapters with bias 'none' are supported", path)
    if config.get("lora_bias"):
        raise CheckpointError("lora_bias: adapters that train biases are not supported", path)


def _hf_dense_parts(ckpt: Checkpoint) -> dict[str, tuple[str, int, int, tuple[int, ...]]]:
    """HF parameter name -> (canonical name, first row, stop row, HF shape) for every dense tensor."""
    found = {}
    for item in layouts.canonical_tensors(ckpt.config):
        if isinstance(item, layouts.ExpertWeight):
            continue
        for name, start, stop in layouts.layout_parts(HF, item.name, ckpt.config):
            stop = item.shape[0] if stop is None else stop
            found[name] = (item.name, start, stop, (stop - start, *item.shape[1:]))
    return found


def _map(folder: Path, weights: Path, config: dict, tensors: dict[str, torch.Tensor], ckpt: Checkpoint) -> Adapter:
    cfg = ckpt.config
    dense = _hf_dense_parts(ckpt)
    adapter = Adapter(folder)
    unknown: list[str] = []
    pairs: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path = key.removeprefix(peft.PREFIX)
        linear, embedding = peft.LINEAR_KEY.fullmatch(path), peft.EMBEDDING_KEY.fullmatch(path)
        match = linear or embedding
        if match:
            pairs.setdefault((match["module"], embedding is not None), {})[match["half"]] = tensor
        elif path in dense:  # modules_to_save: a whole replacement tensor
            canonical, start, stop, shape = dense[path]
            _check_shape(key, tuple(tensor.shape), shape, weights)
            adapter.rows.append(Replacement(canonical, start, stop, weights, key))
        elif path.endswith(".base_layer.weight") and path.replace(".base_layer", "") in dense:
            canonical, start, stop, shape = dense[path.replace(".base_layer", "")]  # saved with embedding targets
            _check_shape(key, tuple(tensor.shape), shape, weights)
            adapter.rows.append(Replacement(canonical, start, stop, weights, key))
        else:
            unknown.append(key)
    swapped = peft.base_version(config.get("peft_version")) in peft.SWAPPED_EXPERTS_VERSIONS
    for (module, is_embedding), halves in pairs.items():
        if set(halves) != {"A", "B"}:
            unknown.append(f"{module} (lora_{''.join(halves)} without its partner)")
            continue
        a, b = halves["A"], halves["B"]
        experts = peft.EXPERTS_MODULE.fullmatch(module)
        if experts and not is_embedding:
            if swapped:
                raise CheckpointError(
                    f"written by PEFT {config.get('peft_version')}, which stored expert LoRA with in and out "
                    "swapped; load it with PEFT >= 0.19.1 and save it again",
                    folder / peft.CONFIG_NAME,
                )
            term = _expert_term(int(experts["layer"]), a, b, config, cfg.num_experts, cfg, weights)
            if (term.layer, term.proj) in adapter.experts:
                raise CheckpointError(f"two LoRA pairs for block.{term.layer}.mlp.{term.proj}", weights)
            adapter.experts[(term.layer, term.proj)] = term
            continue
        name = module + ".weight"
        if name not in dense:
            unknown.append(f"{peft.PREFIX}{module}.lora_{'embedding_' if is_embedding else ''}A")
            continue
        canonical, start, stop, shape = dense[name]
        rank, scale = peft.scaling(config, _pattern_path(module, config))
        if is_embedding:
            expected_a, expected_b = (rank, shape[0]), (shape[1], rank)
        else:
            expected_a, expected_b = (rank, shape[1]), (shape[0], rank)
        _check_shape(f"{peft.PREFIX}{module} lora_A", tuple(a.shape), expected_a, weights)
        _check_shape(f"{peft.PREFIX}{module} lora_B", tuple(b.shape), expected_b, weights)
        adapter.rows.append(RowDelta(canonical, start, stop, a, b, scale, embedding=is_embedding))
    if unknown:
        shown = ", ".join(unknown[:SHOWN_UNKNOWN]) + (
            f" and {len(unknown) - SHOWN_UNKNOWN} more" if len(unknown) > SHOWN_UNKNOWN else ""
        )
        raise CheckpointError(f"{len(unknown)} adapter tensor(s) match nothing in the base model: {shown}", weights)
    return adapter


def _pattern_path(module: str, config: dict[str, Any]) -> str:
    """rank/alpha patterns match module paths, or parameter paths for ``target_parameters`` entries."""
    parameter = module + ".weight"
    for target in config.get("target_parameters") or []:
        if parameter == target or parameter.endswith("." + target):
            return parameter
    return module


def _expert_term(
    layer: int, a: torch.Tensor, b: torch.Tensor, config: dict, experts: int, cfg, weights: Path
) -> ExpertDelta:
    shapes = {"mlp1": (cfg.hidden_size, 2 * cfg.intermediate_size), "mlp2": (cfg.intermediate_size, cfg.hidden_size)}
    names = {"mlp1": "gate_up_proj", "mlp2": "down_proj"}
    where = f"{peft.PREFIX}model.layers.{layer}.mlp.experts"
    factors = (a.shape[-1], b.shape[0]) if a.dim() == 2 and b.dim() == 2 else None
    found = [proj for proj, (inp, out) in shapes.items() if factors == (inp, out)]
    if len(found) != 1:
        if any(factors == (out, inp) for inp, out in shapes.values()):
            raise CheckpointError(
                f"{where}: expert LoRA with in and out swapped (as PEFT 0.19.0 wrote it); load it with PEFT >= "
                "0.19.1 and save it again",
                weights,
            )
        raise CheckpointError(
            f"{where}: LoRA factors of shapes {list(a.shape)} and {list(b.shape)} fit no expert weight of this "
            f"model (gate_up [{2 * cfg.intermediate_size}, {cfg.hidden_size}], down [{cfg.hidden_size}, "
            f"{cfg.intermediate_size}]): an adapter for another model?",
            weights,
        )
    proj = found[0]
    inp, out = shapes[proj]
    rank, scale = peft.scaling(config, f"model.layers.{layer}.mlp.experts.{names[proj]}")
    _check_shape(f"{where} ({names[proj]}) lora_A", tuple(a.shape), (rank * experts, inp), weights)
    _check_shape(f"{where} ({names[proj]}) lora_B", tuple(b.shape), (out, rank * experts), weights)
    return ExpertDelta(layer, proj, weights, (a.key, b.key), rank, scale, experts)


def _check_shape(what: str, shape: tuple[int, ...], expected: tuple[int, ...], weights: Path) -> None:
    if shape != expected:
        raise CheckpointError(
            f"{what} has shape {list(shape)}, the base model implies {list(expected)} (an adapter for another model?)",
            weights,
        )


def load_adapters(folders: Sequence[str | Path], ckpt: Checkpoint) -> tuple[Adapter, ...]:
    return tuple(load_adapter(folder, ckpt) for folder in folders)
