"""Text renderings of the library's reports for the command line (``--json`` prints the data itself).

Imports no torch: the reports arrive as values, their types are named for the reader only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ossconv.convert.target import ConversionResult
    from ossconv.demo import DemoResult
    from ossconv.hub import DownloadResult
    from ossconv.inspection import InspectReport
    from ossconv.verify.lockstep import CaseReport, VerifyReport


def conversion_text(result: ConversionResult) -> None:
    """One line for any writing command, then one per expert-parallel rank."""
    click.echo(
        f"{result.command}: {result.source} ({result.source_layout}, {result.source_precision}) -> "
        f"{result.output} ({result.layout}, {result.precision}): "
        f"{result.tensors} tensors in {result.files} file(s), "
        f"{result.bytes_written / 1e9:.3f} GB in {result.seconds:.1f} s"
    )
    for rank in result.details.get("ranks", []):
        click.echo(f"  {rank['folder']}: experts {rank['experts'][0]}-{rank['experts'][1] - 1}")
    lora = result.details.get("lora")
    if lora:
        merged = lora["tensors"]
        errors = [t["quantization_rms_error"] for t in merged if "quantization_rms_error" in t]
        click.echo(
            f"  lora: {len(lora['adapters'])} adapter(s), {len(merged)} tensors merged, largest ||delta||/||W|| "
            f"{max((t['delta_ratio'] for t in merged), default=0):.4f}"
            + (f", MXFP4 re-encoding RMS error up to {max(errors):.4f}" if errors else "")
            + " (--json lists each tensor)"
        )
    if result.details.get("note"):
        click.echo(f"  note: {result.details['note']}")


def download_text(result: DownloadResult) -> None:
    fetched = sum(1 for f in result.files if f.action == "downloaded")
    click.echo(
        f"{result.repo}@{result.commit[:12]} ({result.layout}): {len(result.files)} files in "
        f"{result.folder}, {fetched} downloaded ({result.bytes_downloaded / 1e9:.3f} GB), "
        f"{len(result.files) - fetched} already verified, every sha256 checked, {result.seconds:.1f} s"
    )
    for step in result.next_steps:
        click.echo(f"  next: {step}")


def demo_text(result: DemoResult, kept: bool) -> None:
    width = max(len(s.step) for s in result.steps)
    click.echo(f"{'step':<{width}}  result  {'time':>7}  detail")
    for s in result.steps:
        click.echo(f"{s.step:<{width}}  {'ok' if s.ok else 'FAILED':<6}  {s.seconds:6.2f}s  {s.detail}")
    click.echo(
        f"\n{'all steps passed' if result.ok else 'some steps FAILED'}"
        + (f"; checkpoints kept in {result.folder}" if kept else "")
    )


def inspect_text(report: InspectReport) -> None:
    """inspect's text output: summary, tensor table, MXFP4 scale histogram, problems."""
    cfg = report.config
    click.echo(f"{report.path}: {report.layout} layout, experts {report.precision}, model {report.known_model}")
    click.echo(
        f"  {cfg['num_hidden_layers']} layers, {cfg['num_experts']} experts (top {cfg['experts_per_token']}), "
        f"hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, heads {cfg['num_attention_heads']}/"
        f"{cfg['num_key_value_heads']} x {cfg['head_dim']}, vocab {cfg['vocab_size']}"
    )
    click.echo(
        f"  {len(report.tensors)} tensors, {report.total_parameters / 1e9:.3f} B parameters, "
        f"{report.total_bytes / 1e9:.3f} GB in {len(report.files)} file(s)"
    )
    for key, value in report.metadata.items():
        shown = f"[{len(value)} items]" if isinstance(value, list) and len(value) > 8 else value
        click.echo(f"  {key} = {shown}")
    width = max(len(t["name"]) for t in report.tensors)
    click.echo()
    for t in report.tensors:
        shape = "x".join(str(d) for d in t["shape"])
        click.echo(f"  {t['name']:<{width}}  {t['dtype']:>4}  {shape:>22}  {t['bytes'] / 1e6:10.2f} MB  {t['file']}")
    if report.mxfp4:
        blocks = sum(s.blocks for s in report.mxfp4)
        histogram: dict[int, int] = {}
        for s in report.mxfp4:
            for scale, count in s.scale_histogram.items():
                histogram[scale] = histogram.get(scale, 0) + count
        click.echo()
        click.echo(
            f"  MXFP4: {blocks} blocks in {len(report.mxfp4)} weights; scale bytes "
            f"{min(histogram)}..{max(histogram)} (2^{min(histogram) - 127}..2^{max(histogram) - 127})"
        )
        zero = sum(s.zero_blocks for s in report.mxfp4)
        second = sum(s.second_encoding_blocks for s in report.mxfp4)
        inf = sum(s.inf_blocks for s in report.mxfp4)
        click.echo(
            f"  all-zero blocks {zero / blocks:.4%}, blocks with a second encoding {second / blocks:.4%}, "
            f"blocks decoding to Inf {inf}"
        )
        peak = max(histogram.values())
        for scale in sorted(histogram):
            bar = "#" * max(1, round(40 * histogram[scale] / peak))
            click.echo(f"    scale {scale:3d} (2^{scale - 127:+4d}) {histogram[scale]:>12}  {bar}")
    click.echo()
    if report.problems:
        click.echo(f"  {len(report.problems)} problem(s):")
        for problem in report.problems[:50]:
            click.echo(f"    - {problem.message}")
        if len(report.problems) > 50:
            click.echo(f"    ... and {len(report.problems) - 50} more (--json lists all)")
    else:
        click.echo("  no problems found")


def verify_text(report: VerifyReport) -> None:
    """verify's text output: identities, then a table of steps (one case of token ids) or a line per case."""
    click.echo(f"A: {report.a.path} ({report.a.layout}, {report.a.precision})")
    click.echo(f"B: {report.b.path} ({report.b.layout}, {report.b.precision})")
    tolerance = "bit-identical" if report.mode == "exact" else f"atol {report.atol:g}, KL max {report.kl_max:g}"
    if len(report.cases) == 1 and report.cases[0].text is None:
        _case_table(report.cases[0], tolerance)
    else:
        click.echo(f"{len(report.cases)} case(s), fp32, {tolerance}")
        for case in report.cases:
            click.echo("  " + _case_line(case))
    click.echo("verdict: same" if report.same else f"verdict: DIFFER{_where(report.cases)}")


def _case_table(case: CaseReport, tolerance: str) -> None:
    click.echo(f"{len(case.tokens)} tokens, fp32, {tolerance}")
    click.echo(f"  {'step':<12} {'max |A-B|':>11} {'rel error':>11} {'cosine':>10}")
    for s in case.states:
        mark = "identical" if s.identical else ""
        click.echo(f"  {s.step:<12} {s.max_abs_error:11.3e} {s.relative_error:11.3e} {s.cosine:10.6f}  {mark}")
    lg = case.logits
    click.echo(
        f"  logits: max |A-B| {lg.max_abs_error:.3e}, KL mean {lg.kl_mean:.3e} max {lg.kl_max:.3e}, "
        f"top-1 agreement {lg.top1_agreement:.2%}"
    )
    if case.generation is not None:
        click.echo("  " + _generation(case))


def _case_line(case: CaseReport) -> str:
    where = "" if case.first_divergent_layer is None else f", first divergent layer {case.first_divergent_layer}"
    line = f"{case.id}: {'same' if case.same else 'DIFFER'} ({len(case.tokens)} tokens{where}"
    line += f", logits max |A-B| {case.logits.max_abs_error:.2e}"
    return line + (f"; {_generation(case)})" if case.generation is not None else ")")


def _generation(case: CaseReport) -> str:
    g = case.generation
    if g.parted_at is None:
        shown = f": {g.text_a!r}" if g.text_a is not None else ""
        return f"continuations identical ({len(g.a)} tokens){shown}"
    return f"continuations part at token {g.parted_at}: A {g.a[g.parted_at]} vs B {g.b[g.parted_at]}"


def _where(cases: list[CaseReport]) -> str:
    differing = [c for c in cases if not c.same]
    if len(cases) > 1:
        return f" ({len(differing)} of {len(cases)} cases)"
    case = differing[0]
    if case.first_divergent_layer == "embedding":
        return " (embedding)"
    if case.first_divergent_layer is not None:
        return f" (first divergent layer: {case.first_divergent_layer})"
    if case.generation is not None and case.generation.parted_at is not None:
        return f" (continuations part at token {case.generation.parted_at})"
    return " (logits)"
