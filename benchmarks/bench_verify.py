"""verify on real gpt-oss-20b layer shapes: seconds per layer and peak RSS, 32 tokens.

    python benchmarks/bench_verify.py [--layers 2] [--tokens 32] [--generate 8] [--workdir /tmp/ossconv-bench-verify]

A synthetic OpenAI-layout MXFP4 checkpoint with gpt-oss-20b's layer shapes (hidden 2880, 64 query / 8 KV
heads, 32 experts of 2880, top-4; small vocabulary) is verified against its HF-layout conversion, in a
child process whose own peak RSS is read (wait4); the interpreter start-up, measured in the same run, is
subtracted from the per-layer time. Targets (issue 5): under 10 s per layer and under 3 GB RSS.

``--generate N`` (issue 14) also times greedy continuations: seconds per generated token (both sides, with the
KV cache), against one forward step of one token (a 1-token verify, both sides) measured in the same run;
target under 2x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from common import REAL_20B_LAYER, run_child

from ossconv import convert, synthetic


def run(args: list[str]) -> tuple[float, int, dict]:
    seconds, rss, output = run_child(args, capture=True)
    return seconds, rss, json.loads(output or b"{}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--generate", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ossconv-bench-verify"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    config = synthetic.tiny_config(num_hidden_layers=args.layers, **REAL_20B_LAYER)
    source = synthetic.build(args.workdir / "openai", config)
    convert(source, args.workdir / "hf", to="hf")
    command = [
        sys.executable,
        "-m",
        "ossconv",
        "verify",
        str(source),
        str(args.workdir / "hf"),
        "--num-tokens",
        str(args.tokens),
        "--json",
    ]
    startup, _, _ = run([sys.executable, "-c", "import json, torch, ossconv.cli; print(json.dumps({}))"])
    seconds, rss, report = run(command)
    per_layer = (seconds - startup) / args.layers
    print(f"verify, {args.layers} layers of gpt-oss-20b shape, {args.tokens} tokens, A openai/mxfp4 vs B hf/mxfp4")
    print(
        f"  total {seconds:.1f} s (of which {startup:.1f} s interpreter start-up), "
        f"{per_layer:.2f} s per layer for both runs (target < 10 s)"
    )
    print(f"  peak RSS {rss / 1e9:.2f} GB (target < 3 GB); verdict {report['verdict']}")
    if args.generate:
        one_token, _, _ = run(command[:-3] + ["--tokens", "7", "--json"])
        prompt = ["--num-tokens", "16", "--json"]
        plain, _, _ = run(command[:-3] + prompt)
        generating, generate_rss, report = run(command[:-3] + prompt + ["--generate", str(args.generate)])
        per_token = (generating - plain) / args.generate
        step = one_token - startup
        print(
            f"  --generate {args.generate} after 16 tokens: {per_token:.2f} s per generated token (both sides), "
            f"one forward step of one token {step:.2f} s: {per_token / step:.2f}x (target < 2x); "
            f"peak RSS {generate_rss / 1e9:.2f} GB; verdict {report['verdict']}"
        )
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
