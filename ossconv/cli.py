"""The ``ossconv`` command line: parse, call the library, print. Nothing else lives here.

Exit codes: 0 ok; 1 problems found / checkpoints differ; 2 bad input, usage or I/O; 3 a bug in ossconv.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ossconv import __version__, render
from ossconv.console import Output, output_options, rule_option, run_group, text_options, write_command, write_options
from ossconv.errors import EXIT_DIFFER, EXIT_OK

# ---------------------------------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ossconv")
def cli() -> None:
    """Convert, check and move gpt-oss checkpoints (OpenAI and Hugging Face layouts, MXFP4 and float).

    \b
    Examples:
      ossconv demo
      ossconv download openai/gpt-oss-20b --layout openai
      ossconv inspect gpt-oss-20b/original
      ossconv unpack gpt-oss-20b/original gpt-oss-20b-bf16 --dtype bf16
      ossconv pack gpt-oss-20b-bf16 gpt-oss-20b-mxfp4 --rule up
      ossconv convert gpt-oss-20b/original gpt-oss-20b-hf --to hf --dtype bf16
      ossconv verify gpt-oss-20b/original gpt-oss-20b-hf
      ossconv reshard gpt-oss-120b/original gpt-oss-120b-ep4 --ep-ranks 4
    """


@cli.command()
@click.argument("repo")
@click.option(
    "--layout",
    type=click.Choice(["openai", "hf", "metal", "all"]),
    default="hf",
    show_default=True,
    help="openai: original/ (OpenAI's layout); hf: the transformers layout at the root (weights, index, "
    "config, tokenizer); metal: metal/; all: everything.",
)
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--out", "folder", type=click.Path(), default=None, help="Folder to fill (default: the repo's name).")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
@click.option(
    "--min-rate", type=click.FloatRange(min=1), default=50_000, show_default=True, help="Slowest bytes/s accepted."
)
@output_options
def download(
    repo: str, layout: str, revision: str | None, folder: str | None, token: str | None, min_rate: float, out: Output
) -> int:
    """Fetch one layout of REPO from the Hugging Face Hub, resumable, every file SHA-256 checked.

    \b
    A run that was killed continues from the bytes on disk; a second run skips files it verified before
    unless their size or modification time changed. Honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE.

    \b
    Examples:
      ossconv download openai/gpt-oss-20b --layout openai --out gpt-oss-20b
      ossconv download openai/gpt-oss-120b --layout hf --revision main
    """
    from ossconv.hub import download as run

    with out.progress("download") as progress:
        result = run(
            repo, layout=layout, revision=revision, out=folder, token=token, progress=progress, min_rate=min_rate
        )
    out.result(result.to_dict(), lambda: render.download_text(result))
    return EXIT_OK


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option(
    "--stats/--no-stats",
    default=False,
    help="Also read every MXFP4 block for the scale histogram and zero / re-encodable / Inf counts (as long as "
    "reading the experts); by default only headers and config are read, in well under a second.",
)
@output_options
def inspect(checkpoint: str, stats: bool, out: Output) -> int:
    """Show what CHECKPOINT is: layout, precision, config, tensors, MXFP4 statistics, problems.

    Exit 0 when no problem was found, 1 when problems are listed, 2 when the checkpoint cannot be read.
    """
    from ossconv.inspection import inspect_checkpoint

    report = inspect_checkpoint(checkpoint, stats=stats)
    out.result(report.to_dict(), lambda: render.inspect_text(report))
    return EXIT_DIFFER if report.problems else EXIT_OK


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("output", type=click.Path())
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    default="bf16",
    show_default=True,
    help="Precision of the unpacked expert weights.",
)
@write_options
@output_options
def unpack(checkpoint: str, output: str, dtype: str, overwrite: bool, max_shard_size: str, out: Output) -> int:
    """Dequantize the MXFP4 expert weights of CHECKPOINT into OUTPUT (same layout, every other tensor kept).

    In the Hugging Face layout float experts are stored transposed ([E, in, out]), as transformers expects.
    """
    from ossconv.convert.precision import unpack as run

    return write_command(
        out, "unpack", run, src=checkpoint, out=output, dtype=dtype, overwrite=overwrite, max_shard_size=max_shard_size
    )


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("output", type=click.Path())
@rule_option
@write_options
@output_options
def pack(checkpoint: str, output: str, rule: str, overwrite: bool, max_shard_size: str, out: Output) -> int:
    """Quantize the float expert weights of CHECKPOINT to MXFP4 into OUTPUT (same layout, others kept).

    NaN or Inf in an expert weight is an error naming the tensor and expert.
    """
    from ossconv.convert.precision import pack as run

    return write_command(
        out, "pack", run, src=checkpoint, out=output, rule=rule, overwrite=overwrite, max_shard_size=max_shard_size
    )


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("output", type=click.Path())
@click.option(
    "--to",
    "layout",
    type=click.Choice(["openai", "hf", "gguf"]),
    required=True,
    help="Target layout: 'openai' (original/: fused qkv, mlp1/mlp2, dtypes.json), 'hf' (transformers) or "
    "'gguf' (one file OUTPUT for llama.cpp, as its own converter writes it).",
)
@click.option(
    "--dtype",
    type=click.Choice(["mxfp4", "bf16", "fp16", "fp32"]),
    default=None,
    help="Precision of the expert weights only (mlp1/mlp2 = gate_up/down); every other tensor keeps its dtype. "
    "Default: as the source.",
)
@rule_option
@click.option(
    "--lora",
    "lora",
    multiple=True,
    type=click.Path(),
    help="A PEFT LoRA adapter folder to merge while converting (repeatable: applied in order).",
)
@write_options
@output_options
def convert(
    checkpoint: str,
    output: str,
    layout: str,
    dtype: str | None,
    rule: str,
    lora: tuple[str, ...],
    overwrite: bool,
    max_shard_size: str,
    out: Output,
) -> int:
    """Convert CHECKPOINT to the other layout (or the same one) in OUTPUT, streaming one tensor at a time.

    \b
    The layout of CHECKPOINT is detected from its tensor names and config. MXFP4 blocks and scales are
    copied byte for byte between layouts; float experts are stored [E, out, in] in the OpenAI layout and
    [E, in, out] in the HF one. Tokenizer, chat-template and generation files beside the weights are copied.

    \b
    Examples:
      ossconv convert gpt-oss-20b/original gpt-oss-20b-hf --to hf
      ossconv convert finetuned-hf-bf16 finetuned-original --to openai --dtype mxfp4
      ossconv convert gpt-oss-20b merged-mxfp4 --to hf --dtype mxfp4 --lora my-adapter
      ossconv convert gpt-oss-20b gpt-oss-20b.gguf --to gguf
    """
    from ossconv.convert.layout import convert as run

    return write_command(
        out,
        "convert",
        run,
        src=checkpoint,
        out=output,
        to=layout,
        dtype=dtype,
        rule=rule,
        lora=lora,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
    )


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("output", type=click.Path())
@click.option(
    "--experts",
    type=click.Choice(["fused", "split"]),
    default=None,
    help="fused: one [E, ...] tensor per weight; split: one tensor per expert, named ...experts.{j}... "
    "(default: as the source).",
)
@click.option(
    "--ep-ranks",
    type=click.IntRange(1),
    default=None,
    help="Write N expert-parallel rank folders rank-0000r-of-0000N/ (N must divide the expert count), "
    "each with every shared tensor and only its experts, and ep_manifest.json.",
)
@click.option(
    "--merge",
    "merge_ranks",
    is_flag=True,
    help="Put a split or expert-parallel checkpoint back together (fused experts), checking its manifest.",
)
@write_options
@output_options
def reshard(
    checkpoint: str,
    output: str,
    experts: str | None,
    ep_ranks: int | None,
    merge_ranks: bool,
    overwrite: bool,
    max_shard_size: str,
    out: Output,
) -> int:
    """Re-cut CHECKPOINT into OUTPUT without changing a byte of any tensor.

    \b
    Examples:
      ossconv reshard gpt-oss-20b gpt-oss-20b-1gb --max-shard-size 1GB
      ossconv reshard gpt-oss-20b gpt-oss-20b-split --experts split
      ossconv reshard gpt-oss-120b/original gpt-oss-120b-ep4 --ep-ranks 4
      ossconv reshard --merge gpt-oss-120b-ep4 gpt-oss-120b-again
    """
    from ossconv.convert.reshard import reshard as run_reshard
    from ossconv.expert_parallel import merge as run_merge

    if merge_ranks and (ep_ranks is not None or experts == "split"):
        raise click.UsageError("--merge puts experts back together; it takes neither --ep-ranks nor --experts split.")
    options = dict(src=checkpoint, out=output, overwrite=overwrite, max_shard_size=max_shard_size)
    if merge_ranks:
        return write_command(out, "merge", run_merge, **options)
    return write_command(out, "reshard", run_reshard, experts=experts, ep_ranks=ep_ranks, **options)


@cli.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--tokens", default=None, help="Token ids to run, e.g. 1,2,3.")
@text_options
@click.option("--prompt-tokens", type=click.Path(), default=None, help="File of token ids (commas, spaces or JSON).")
@click.option("--num-tokens", type=click.IntRange(1), default=None, help="Run N random token ids (default 32).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --num-tokens.")
@click.option("--exact", is_flag=True, help="Require bit-identical hidden states and logits.")
@click.option(
    "--atol",
    type=click.FloatRange(0),
    default=None,
    help="Largest |A - B| allowed in hidden states and "
    "logits (default 1e-3: lossless conversions give 0, layout bugs give O(1)).",
)
@click.option(
    "--kl-max",
    type=click.FloatRange(0),
    default=None,
    help="Largest KL(A || B) of the next-token distributions at any position (default 1e-4).",
)
@click.option("--report", "report_path", type=click.Path(), default=None, help="Also write the JSON report here.")
@click.option("--overwrite", is_flag=True, help="Replace existing --report / --save-logits files.")
@click.option(
    "--save-logits",
    type=click.Path(),
    default=None,
    help="Write both runs' logits to a safetensors file (tensors a and b, float32 [tokens, vocab]).",
)
@click.option("--a-lora", multiple=True, type=click.Path(), help="Merge this LoRA adapter into A on the fly.")
@click.option("--b-lora", multiple=True, type=click.Path(), help="Merge this LoRA adapter into B on the fly.")
@output_options
def verify(
    a: str,
    b: str,
    tokens: str | None,
    prompts: tuple[str, ...],
    chats: tuple[str, ...],
    cases_file: str | None,
    tokenizer: str | None,
    reasoning_effort: str | None,
    generate: int,
    prompt_tokens: str | None,
    num_tokens: int | None,
    seed: int,
    exact: bool,
    atol: float | None,
    kl_max: float | None,
    report_path: str | None,
    save_logits: str | None,
    overwrite: bool,
    a_lora: tuple[str, ...],
    b_lora: tuple[str, ...],
    out: Output,
) -> int:
    """Run the reference gpt-oss forward pass on A and B in lockstep (fp32) and compare layer by layer.

    \b
    A and B may be in any layout and precision. Exit 0 when they agree within tolerance (bit for bit
    under --exact), 1 when they differ (the report names the first divergent layer), 2 on bad input.

    \b
    Examples:
      ossconv verify gpt-oss-20b/original gpt-oss-20b-hf
      ossconv verify original converted --exact --report verify.json
      ossconv verify gpt-oss-20b converted --prompt "Why is the sky blue?" --generate 16
      ossconv verify gpt-oss-20b converted --prompts cases.jsonl --reasoning-effort low --generate 32
    """
    from ossconv.verify.lockstep import parse_tokens
    from ossconv.verify.lockstep import verify as run

    with out.progress("verify", unit="layer") as progress:
        report = run(
            a,
            b,
            parse_tokens(tokens) if tokens is not None else None,
            prompt_tokens=prompt_tokens,
            num_tokens=num_tokens,
            seed=seed,
            prompts=prompts,
            chats=chats,
            cases_file=cases_file,
            tokenizer=tokenizer,
            reasoning_effort=reasoning_effort,
            generate=generate,
            exact=exact,
            atol=atol,
            kl_max=kl_max,
            report=report_path,
            save_logits=save_logits,
            overwrite=overwrite,
            progress=progress,
            a_lora=a_lora,
            b_lora=b_lora,
        )
    out.result(report.to_dict(), lambda: render.verify_text(report))
    return EXIT_OK if report.same else EXIT_DIFFER


@cli.command()
@click.option(
    "--out",
    "folder",
    type=click.Path(),
    default=None,
    help="Keep the demo's checkpoints in this folder (default: a temporary folder, removed after).",
)
@output_options
def demo(folder: str | None, out: Output) -> int:
    """Build a small synthetic gpt-oss checkpoint and run every command on it, checking each result."""
    from ossconv.demo import run_demo

    def log(step: Any) -> None:
        if not out.as_json and not out.quiet and sys.stderr.isatty():
            click.echo(f"  {'ok ' if step.ok else 'FAIL'} {step.step}", err=True)

    result = run_demo(folder, log=log)
    out.result(result.to_dict(), lambda: render.demo_text(result, kept=folder is not None))
    return EXIT_OK if result.ok else EXIT_DIFFER


# ---------------------------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """The ``ossconv`` entry point."""
    run_group(cli, argv)
