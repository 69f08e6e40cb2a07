"""reshard into 4 expert-parallel ranks on real gpt-oss-20b layer shapes, against `cp` in the same run.

    python benchmarks/bench_reshard.py [--layers 2] [--ranks 4] [--workdir /tmp/ossconv-bench-reshard]

Every rank carries the shared tensors, so the output is larger than the source; throughput is measured on
the bytes written. Every command is timed to stable storage (sync), in alternating rounds; medians.
Targets (issue 6): >= 0.7x `cp` of the same bytes, peak RSS bounded as in convert.
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
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ossconv-bench-reshard"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are printed")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    source = synthetic.build(
        args.workdir / "src", synthetic.tiny_config(num_hidden_layers=args.layers, **REAL_20B_LAYER)
    )
    run_child(["cat", *map(str, source.iterdir())])  # warm the page cache for both
    startup, _, _ = run_child([sys.executable, "-c", "import ossconv.cli, ossconv.convert.reshard"])
    ossconv = [sys.executable, "-m", "ossconv", "reshard"]
    ep, merged = args.workdir / "ep", args.workdir / "m"
    results = median_runs(
        {
            "cp": ["cp", "-r", str(source), str(args.workdir / "cp")],
            "ep": [*ossconv, str(source), str(ep), "--ep-ranks", str(args.ranks), "-q"],
            "merge": [*ossconv, "--merge", str(ep), str(merged), "-q"],
        },
        args.repeat,
        [args.workdir / "cp", ep, merged],
    )
    (cp_seconds, _), (ep_seconds, ep_rss), (merge_seconds, merge_rss) = results.values()
    size, ep_size = folder_bytes(source), folder_bytes(args.workdir / "ep")
    cp_rate = size / cp_seconds
    print(
        f"{args.layers} layers of gpt-oss-20b shape, {size / 1e9:.2f} GB -> {args.ranks} ranks, {ep_size / 1e9:.2f} GB"
    )
    print(f"  cp -r (anchor)     {cp_seconds:6.2f} s  {cp_rate / 1e9:5.2f} GB/s; interpreter start-up {startup:.2f} s")
    for label, seconds, rss, written in (
        ("reshard --ep-ranks", ep_seconds, ep_rss, ep_size),
        ("reshard --merge", merge_seconds, merge_rss, size),
    ):
        rate, work_rate = written / seconds, written / max(seconds - startup, 1e-9)
        print(
            f"  {label:18s} {seconds:6.2f} s  {rate / 1e9:5.2f} GB/s = {rate / cp_rate:.2f}x cp "
            f"({work_rate / cp_rate:.2f}x without start-up; target >= 0.7x)  peak RSS {rss / 1e9:.2f} GB"
        )
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
