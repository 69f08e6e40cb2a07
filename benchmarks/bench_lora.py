"""convert --lora on real gpt-oss-20b layer shapes, against the same convert without an adapter, same run.

    python benchmarks/bench_lora.py [--layers 1 2] [--rank 16] [--workdir /tmp/ossconv-bench-lora]

A synthetic OpenAI-layout MXFP4 checkpoint of 20b layers (hidden 2880, 64/8 heads x 64, 32 experts) and a
rank-16 adapter in PEFT's form on attention (q/k/v/o) and both expert weights of every layer. Both runs write
the HF layout with MXFP4 experts: without an adapter the experts are byte copies; with it every expert is
decoded, merged in fp32 and re-encoded, so the honest anchor is also given: the same convert to bf16
(decode + write, no merge). Targets (issue 11): --lora <= 1.3x the time of the plain convert that re-expresses
the experts, peak RSS < 1.5 GB and flat from 1 to 2 layers. Medians of alternating rounds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common import REAL_20B_LAYER, fresh_folder, median_runs

from ossconv import synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ossconv-bench-lora"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ossconv = [sys.executable, "-m", "ossconv"]
    for layers in args.layers:
        work = fresh_folder(args.workdir / f"layers-{layers}")
        config = synthetic.tiny_config(num_hidden_layers=layers, **REAL_20B_LAYER)
        source = synthetic.build(work / "src", config)
        adapter = synthetic.build_lora(work / "adapter", config, rank=args.rank)
        outputs = {name: work / name for name in ("plain", "bf16", "unpacked", "lora", "lora-bf16")}
        convert = [*ossconv, "convert", str(source)]
        results = median_runs(
            {
                "plain": [*convert, str(outputs["plain"]), "--to", "hf", "--dtype", "mxfp4", "-q"],
                "bf16": [*convert, str(outputs["bf16"]), "--to", "hf", "--dtype", "bf16", "-q"],
                "lora": [
                    *convert,
                    str(outputs["lora"]),
                    "--to",
                    "hf",
                    "--dtype",
                    "mxfp4",
                    "--lora",
                    str(adapter),
                    "-q",
                ],
                "lora-bf16": [
                    *convert,
                    str(outputs["lora-bf16"]),
                    *("--to", "hf", "--dtype", "bf16", "--lora", str(adapter), "-q"),
                ],
            },
            args.repeat,
            list(outputs.values()),
        )
        plain, bf16, lora, lora_bf16 = (results[k] for k in ("plain", "bf16", "lora", "lora-bf16"))
        print(f"{layers} layer(s) of gpt-oss-20b shape, rank-{args.rank} adapter on attention and all experts")
        print(f"  convert --to hf (MXFP4 copied)       {plain[0]:6.2f} s  peak RSS {plain[1] / 1e9:.2f} GB")
        print(f"  convert --to hf --dtype bf16 (anchor) {bf16[0]:6.2f} s  peak RSS {bf16[1] / 1e9:.2f} GB")
        print(
            f"  --dtype bf16 --lora                   {lora_bf16[0]:6.2f} s  = {lora_bf16[0] / bf16[0]:.2f}x the same "
            f"without adapter (target <= 1.3x)  peak RSS {lora_bf16[1] / 1e9:.2f} GB"
        )
        print(
            f"  --dtype mxfp4 --lora (decode, merge, encode) {lora[0]:6.2f} s  = {lora[0] / bf16[0]:.2f}x the bf16 "
            f"convert, {lora[0] / plain[0]:.1f}x the byte copy  peak RSS {lora[1] / 1e9:.2f} GB (target < 1.5 GB)"
        )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
