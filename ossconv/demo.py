"""demo: a synthetic gpt-oss checkpoint through every command, with a check after each step.

A new user sees every command work, on their machine, in seconds, with no download.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ossconv import harmony, synthetic
from ossconv.checkpoint import Checkpoint, open_checkpoint
from ossconv.convert.layout import convert
from ossconv.convert.precision import pack, unpack
from ossconv.convert.reshard import reshard
from ossconv.expert_parallel import merge
from ossconv.formats import layouts
from ossconv.inspection import inspect_checkpoint
from ossconv.verify.lockstep import verify

TEXT_VOCAB = 320  # room for a byte-level vocabulary and the 21 Harmony special tokens


@dataclass
class DemoStep:
    step: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class DemoResult:
    folder: str
    steps: list[DemoStep]

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    def to_dict(self) -> dict[str, object]:
        return {"folder": self.folder, "ok": self.ok, "steps": [asdict(s) for s in self.steps]}


def same_expert_values(a: Checkpoint, b: Checkpoint) -> tuple[bool, str]:
    """True when both hold the same expert values (decoded to fp32) and byte-identical other tensors."""
    weights_a, weights_b = a.expert_weights, b.expert_weights
    expert_names = set()
    for wa, wb in zip(weights_a, weights_b, strict=True):
        expert_names |= set(wa.stored_names())
        for expert in range(wa.num_experts):
            va, vb = a.get_expert(wa, expert, torch.float32), b.get_expert(wb, expert, torch.float32)
            if not torch.equal(va.view(torch.int32), vb.view(torch.int32)):
                return False, f"{wa.float_name} expert {expert} differs"
    others = [n for n in a.tensors if n not in expert_names]
    for name in others:
        if name not in b.tensors or not torch.equal(_bytes(a.get(name)), _bytes(b.get(name))):
            return False, f"{name} differs"
    return True, f"{len(weights_a)} expert weights equal, {len(others)} other tensors byte-identical"


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


def run_demo(out: str | Path | None = None, *, log: Callable[[DemoStep], None] | None = None) -> DemoResult:
    """Run every step; ``out`` keeps the checkpoints (otherwise a temporary folder is removed after)."""
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="ossconv-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    steps: list[DemoStep] = []

    def step(name: str, action: Callable[..., tuple[bool, str]], *args: object) -> bool:
        started = time.perf_counter()
        try:
            ok, detail = action(*args)
        except Exception as error:  # a failed step is reported in the table, not raised
            ok, detail = False, f"{type(error).__name__}: {error}"
        steps.append(DemoStep(name, ok, detail, time.perf_counter() - started))
        if log:
            log(steps[-1])
        return ok

    def path(name: str) -> Path:
        return folder / name

    def build(layout: str) -> tuple[bool, str]:
        synthetic.build(path(f"{layout}-mxfp4"), layout=layout, overwrite=True)
        ckpt = open_checkpoint(path(f"{layout}-mxfp4"))
        return True, f"{ckpt.layout} layout, {len(ckpt.tensors)} tensors, {ckpt.total_bytes / 1e6:.2f} MB"

    def inspect(layout: str) -> tuple[bool, str]:
        report = inspect_checkpoint(path(f"{layout}-mxfp4"), stats=True)
        blocks = sum(s.blocks for s in report.mxfp4)
        detail = f"{report.layout}/{report.precision}, {len(report.tensors)} tensors, {blocks} MXFP4 blocks"
        problems = "; ".join(p.message for p in report.problems[:2])
        return not report.problems, detail + (f"; problems: {problems}" if problems else "")

    def do_unpack(layout: str) -> tuple[bool, str]:
        result = unpack(path(f"{layout}-mxfp4"), path(f"{layout}-bf16"), dtype="bf16", overwrite=True)
        return True, f"{result.bytes_written / 1e6:.2f} MB written"

    def do_pack(layout: str) -> tuple[bool, str]:
        result = pack(path(f"{layout}-bf16"), path(f"{layout}-repacked"), rule="up", overwrite=True)
        return True, f"{result.bytes_written / 1e6:.2f} MB written"

    def check(layout: str) -> tuple[bool, str]:
        return same_expert_values(open_checkpoint(path(f"{layout}-mxfp4")), open_checkpoint(path(f"{layout}-repacked")))

    def do_convert(source: str, target: str, layout: str, dtype: str) -> tuple[bool, str]:
        result = convert(path(source), path(target), to=layout, dtype=dtype, overwrite=True)
        return True, f"{result.source_layout}/{result.source_precision} -> {result.layout}/{result.precision}"

    def byte_identical(a: str, b: str) -> tuple[bool, str]:
        first, second = open_checkpoint(path(a)), open_checkpoint(path(b))
        if list(first.tensors) != list(second.tensors):
            return False, "different tensor names"
        for name in first.tensors:
            if not torch.equal(_bytes(first.get(name)), _bytes(second.get(name))):
                return False, f"{name} differs"
        return True, f"all {len(first.tensors)} tensors byte-identical"

    def do_verify(a: str, b: str) -> tuple[bool, str]:
        report = verify(path(a), path(b), exact=True)
        if report.same:
            return True, f"{b} vs {a}: embedding, {len(report.states) - 1} layers and logits bit-identical"
        return False, f"{b} vs {a}: differ from layer {report.first_divergent_layer}"

    def do_ep(source: str, target: str, ranks: int) -> tuple[bool, str]:
        result = reshard(path(source), path(target), ep_ranks=ranks, overwrite=True)
        spans = ", ".join(f"{r['experts'][0]}-{r['experts'][1] - 1}" for r in result.details["ranks"])
        return True, f"{ranks} rank folders, experts {spans}"

    def do_merge(source: str, target: str) -> tuple[bool, str]:
        result = merge(path(source), path(target), overwrite=True)
        return True, f"{result.details['merged_ranks']} ranks checked against the manifest and merged"

    def to_gguf(source: str, target: str) -> tuple[bool, str]:
        result = convert(path(source), path(target), to="gguf", overwrite=True)
        return (
            True,
            f"{result.tensors} tensors, {result.bytes_written / 1e6:.2f} MB (llama.cpp's layout, MXFP4 experts)",
        )

    def inspect_gguf(name: str) -> tuple[bool, str]:
        report = inspect_checkpoint(path(name), stats=True)
        blocks = sum(s.blocks for s in report.mxfp4)
        arch = report.metadata.get("general.architecture")
        return not report.problems, f"architecture {arch}, {len(report.tensors)} tensors, {blocks} MXFP4 blocks"

    def text_model(name: str) -> tuple[bool, str]:
        config = synthetic.tiny_config(vocab_size=TEXT_VOCAB)
        synthetic.build(path(name) / "original", config, overwrite=True)
        harmony.build_tokenizer(path(name), TEXT_VOCAB)  # beside original/, as the released repositories are
        convert(path(name) / "original", path(f"{name}-hf"), to="hf", dtype="bf16", overwrite=True)
        return True, f"vocabulary {TEXT_VOCAB} with the Harmony special tokens, our own Harmony chat template"

    def verify_text(name: str) -> tuple[bool, str]:
        chat = [{"role": "user", "content": "What does a fox say?"}]
        (path(name) / "chat.json").write_text(json.dumps(chat))
        report = verify(
            path(name) / "original",
            path(f"{name}-hf"),
            prompts=["The quick brown fox"],
            chats=[path(name) / "chat.json"],
            generate=8,
        )
        same = all(c.generation.parted_at is None for c in report.cases)
        detail = "continuations identical (8 greedy tokens each)" if same else "continuations part"
        return report.same, f"{len(report.cases)} cases (a prompt, a Harmony chat), {detail}"

    def make_adapter(name: str) -> tuple[bool, str]:
        synthetic.build_lora(path(name), layers=[1], attention=False)  # experts: merged exactly in fp32
        return True, "rank 4 on both expert weights of layer 1"

    def do_lora(source: str, adapter: str, target: str, layout: str, dtype: str) -> tuple[bool, str]:
        result = convert(path(source), path(target), to=layout, dtype=dtype, lora=[path(adapter)], overwrite=True)
        merged = result.details["lora"]["tensors"]
        errors = [t["quantization_rms_error"] for t in merged if "quantization_rms_error" in t]
        detail = f"{len(merged)} tensors merged, largest ||delta||/||W|| {max(t['delta_ratio'] for t in merged):.3f}"
        return True, detail + (f", MXFP4 re-encoding RMS error up to {max(errors):.3f}" if errors else "")

    def verify_lora(base: str, merged: str, adapter: str) -> tuple[bool, str]:
        report = verify(path(base), path(merged), a_lora=[path(adapter)], exact=True)
        return report.same, f"{merged} vs {base} + adapter on the fly: bit-identical" if report.same else "differ"

    try:
        for layout in layouts.LAYOUTS:
            if not step(f"build synthetic ({layout})", build, layout):
                continue
            step(f"inspect ({layout})", inspect, layout)
            if step(f"unpack -> bf16 ({layout})", do_unpack, layout) and step(
                f"pack -> mxfp4 ({layout})", do_pack, layout
            ):
                step(f"values identical ({layout})", check, layout)
                step(f"verify unpacked ({layout})", do_verify, f"{layout}-mxfp4", f"{layout}-bf16")
                step(f"verify repacked ({layout})", do_verify, f"{layout}-mxfp4", f"{layout}-repacked")
        chain = [
            ("openai-mxfp4", "chain-hf-mxfp4", "hf", "mxfp4"),
            ("chain-hf-mxfp4", "chain-hf-bf16", "hf", "bf16"),
            ("chain-hf-bf16", "chain-openai-mxfp4", "openai", "mxfp4"),
        ]
        if all(step(f"convert {a} -> {b}", do_convert, a, b, layout, dtype) for a, b, layout, dtype in chain):
            step("round trip byte-identical", byte_identical, "openai-mxfp4", "chain-openai-mxfp4")
            for _, converted, _, _ in chain:
                step(f"verify {converted}", do_verify, "openai-mxfp4", converted)
        if step("reshard into 4 expert-parallel ranks", do_ep, "hf-mxfp4", "hf-ep4", 4):
            step("verify the EP ranks", do_verify, "hf-mxfp4", "hf-ep4")
            if step("merge the ranks", do_merge, "hf-ep4", "hf-merged"):
                step("merge byte-identical", byte_identical, "hf-mxfp4", "hf-merged")
        if step("convert -> gguf", to_gguf, "hf-mxfp4", "model.gguf"):
            step("inspect the gguf", inspect_gguf, "model.gguf")
            step("verify the gguf", do_verify, "hf-mxfp4", "model.gguf")
            if step("convert gguf -> hf", do_convert, "model.gguf", "hf-from-gguf", "hf", "mxfp4"):
                step("gguf round trip byte-identical", byte_identical, "hf-mxfp4", "hf-from-gguf")
        if step("text model: tokenizer and chat template", text_model, "text"):
            step("verify --prompt/--chat --generate 8", verify_text, "text")
        if step("LoRA adapter (synthetic, PEFT's form)", make_adapter, "lora-adapter"):
            if step(
                "convert --lora -> fp32 experts", do_lora, "openai-mxfp4", "lora-adapter", "lora-fp32", "openai", "fp32"
            ):
                step("verify the merge", verify_lora, "openai-mxfp4", "lora-fp32", "lora-adapter")
            step(
                "convert --lora -> mxfp4 (hf)", do_lora, "openai-mxfp4", "lora-adapter", "lora-hf-mxfp4", "hf", "mxfp4"
            )
    finally:
        if out is None:
            shutil.rmtree(folder, ignore_errors=True)
    return DemoResult(str(folder), steps)
