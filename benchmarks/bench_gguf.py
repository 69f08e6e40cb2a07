"""convert --to gguf and back on one layer of real gpt-oss-20b shape, against `cp`, same run.

    python benchmarks/bench_gguf.py [--layers 1] [--workdir /tmp/ossconv-bench-gguf]

An HF-layout MXFP4 checkpoint of 20b layers (32 experts of 2880, 64/8 heads x 64): `convert --to gguf` (the
MXFP4 experts repacked to ggml's block_mxfp4, one expert at a time) and reading it back (`convert X.gguf
--to hf`), each against `cp` of the source measured in the same rounds. Targets (issue 12): >= 0.7x `cp`,
peak RSS < 1 GB. Medians of alternating rounds, timed to stable storage.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common import REAL_20B_LAYER, folder_bytes, median_runs, run_child

from ossconv import synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ossconv-bench-gguf"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ossconv = [sys.executable, "-m", "ossconv"]
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = synthetic.tiny_config(num_hidden_layers=args.layers, **REAL_20B_LAYER)
    source = synthetic.build(work / "src", config, layout="hf")
    size = folder_bytes(source)
    run_child([*ossconv, "convert", str(source), str(work / "read.gguf"), "--to", "gguf", "-q"])
    gguf_size = (work / "read.gguf").stat().st_size
    startup, _, _ = run_child([sys.executable, "-c", "import ossconv.cli, ossconv.convert.to_gguf"])
    results = median_runs(
        {
            "cp": ["cp", "-r", str(source), str(work / "cp")],
            "to": [*ossconv, "convert", str(source), str(work / "out.gguf"), "--to", "gguf", "-q", "--overwrite"],
            "back": [*ossconv, "convert", str(work / "read.gguf"), str(work / "back"), "--to", "hf", "-q"],
        },
        args.repeat,
        [work / "cp", work / "back"],
    )
    (cp, _), (to, to_rss), (back, back_rss) = results["cp"], results["to"], results["back"]
    print(f"{args.layers} layer(s) of gpt-oss-20b shape: source {size / 1e9:.3f} GB, GGUF {gguf_size / 1e9:.3f} GB")
    print(f"  cp -r (anchor)         {cp:6.2f} s  {size / cp / 1e9:5.2f} GB/s; interpreter start-up {startup:.2f} s")
    print(
        f"  convert --to gguf      {to:6.2f} s  = {cp / to:.2f}x cp ({cp / (to - startup):.2f}x without start-up; "
        f"target >= 0.7x)  peak RSS {to_rss / 1e9:.2f} GB (target < 1 GB)"
    )
    print(
        f"  convert X.gguf --to hf {back:6.2f} s  = {cp / back:.2f}x cp ({cp / (back - startup):.2f}x without "
        f"start-up)  peak RSS {back_rss / 1e9:.2f} GB"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
