"""convert on real gpt-oss-20b layer shapes, against `cp` of the same bytes measured in the same run.

    python benchmarks/bench_convert.py [--layers 2 4] [--workdir /tmp/ossconv-bench]

Builds synthetic OpenAI-layout MXFP4 checkpoints with gpt-oss-20b's layer shapes (hidden 2880, 64/8 heads,
32 experts of 2880, top-4) and a small vocabulary, then runs the CLI in a child process per conversion and
reads that child's own peak RSS (wait4). Targets (issue 4): same-precision conversion >= 0.7x the speed of
`cp`; MXFP4 -> bf16 bound by the codec (compare with the decode-only time of the same experts); peak RSS
under 1.5 GB and not growing with the number of layers. Every command is timed to stable storage (sync), in
alternating rounds; medians.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from common import REAL_20B_LAYER, folder_bytes, fresh_folder, median_runs, run_child

from ossconv import synthetic
from ossconv.checkpoint import open_checkpoint
from ossconv.formats import layouts, mxfp4


def run(args: list[str]) -> tuple[float, int]:
    seconds, rss, _ = run_child(args)
    return seconds, rss


def decode_only_seconds(folder: Path) -> float:
    ckpt = open_checkpoint(folder)
    started = time.perf_counter()
    for weight in layouts.expert_weights(ckpt.layout, ckpt.config):
        out = torch.empty(weight.out_features, weight.in_features, dtype=torch.bfloat16)
        for expert in range(weight.num_experts):
            mxfp4.decode(ckpt.get_rows(weight.blocks, expert)[0], ckpt.get_rows(weight.scales, expert)[0], out=out)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ossconv-bench"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are printed")
    args = parser.parse_args()
    ossconv = [sys.executable, "-m", "ossconv"]
    for layers in args.layers:
        work = fresh_folder(args.workdir / f"layers-{layers}")
        source = synthetic.build(work / "src", synthetic.tiny_config(num_hidden_layers=layers, **REAL_20B_LAYER))
        size = folder_bytes(source)
        run(["cat", *map(str, source.iterdir())])  # warm the page cache for both cp and convert
        startup, _ = run([sys.executable, "-c", "import ossconv.cli, ossconv.convert.layout"])
        results = median_runs(
            {
                "cp": ["cp", "-r", str(source), str(work / "cp")],
                "same": [*ossconv, "convert", str(source), str(work / "hf"), "--to", "hf", "--quiet"],
                "bf16": [
                    *ossconv,
                    "convert",
                    str(source),
                    str(work / "hf-bf16"),
                    "--to",
                    "hf",
                    "--dtype",
                    "bf16",
                    "-q",
                ],
                "unpack": [*ossconv, "unpack", str(source), str(work / "openai-bf16"), "--quiet"],
            },
            args.repeat,
            [work / "cp", work / "hf", work / "hf-bf16", work / "openai-bf16"],
        )
        (cp_seconds, _), (same_seconds, same_rss), (bf16_seconds, bf16_rss), (unpack_seconds, _) = results.values()
        decode_seconds = decode_only_seconds(source)
        out_size = folder_bytes(work / "hf-bf16")
        print(f"{layers} layers of gpt-oss-20b shape: source {size / 1e9:.2f} GB, bf16 output {out_size / 1e9:.2f} GB")
        print(
            f"  cp -r (anchor)              {cp_seconds:6.2f} s  {size / cp_seconds / 1e9:5.2f} GB/s; "
            f"interpreter start-up {startup:.2f} s"
        )
        print(
            f"  convert --to hf (mxfp4)     {same_seconds:6.2f} s  {size / same_seconds / 1e9:5.2f} GB/s  "
            f"= {cp_seconds / same_seconds:.2f}x cp ({cp_seconds / (same_seconds - startup):.2f}x without start-up; "
            f"target >= 0.7x)   peak RSS {same_rss / 1e9:.2f} GB"
        )
        print(
            f"  convert --to hf --dtype bf16 {bf16_seconds:5.2f} s  {out_size / bf16_seconds / 1e9:5.2f} GB/s out  "
            f"peak RSS {bf16_rss / 1e9:.2f} GB (target < 1.5 GB)"
        )
        print(
            f"  unpack (OpenAI layout, no transpose) {unpack_seconds:5.2f} s  "
            f"{out_size / unpack_seconds / 1e9:5.2f} GB/s out"
        )
        print(
            f"  decode alone, same experts  {decode_seconds:6.2f} s  = "
            f"{decode_seconds / unpack_seconds:.0%} of unpack, "
            f"{decode_seconds / bf16_seconds:.0%} of convert to HF bf16 "
            "(the rest: start-up, writing, and HF's [E, in, out] transpose)"
        )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
