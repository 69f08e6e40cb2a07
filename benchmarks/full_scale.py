"""Every command on a full-size synthetic gpt-oss checkpoint, against the disk measured in the same run.

    python benchmarks/full_scale.py [--model 20b|120b] [--layers N] [--workdir /tmp/ossconv-full] [--keep]

Builds the model by streaming (the generator the tests use, the real config: 24 layers x 32 experts for 20b,
36 x 128 for 120b, vocabulary 201088, real names, dtypes and file naming; ``--layers N`` for fewer layers of
that shape), then runs each command in a child process and prints one table: seconds, GB/s, the child's own
peak RSS (wait4), and two ratios from the same run: against ``cp -r`` of the source, and against the disk's
own rate for what bounds the step (reading: ``cat > /dev/null`` of the input; writing: ``dd`` of as many bytes
as the step writes). It checks what it can (merge byte-identical to the source by sha256, verify exit 0),
checks free disk first and says what it skips, and cleans up. ratio > 1 is faster than the anchor.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from common import folder_bytes, run_child

from ossconv import synthetic

MODELS = {
    "20b": dict(num_hidden_layers=24, num_experts=32),
    "120b": dict(num_hidden_layers=36, num_experts=128),
}


def tree_sha256(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        found[path.name] = digest.hexdigest()
    return found


def tensor_digests(folder: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes (a merge writes the same tensors, not necessarily the same files)."""
    from ossconv.checkpoint import open_checkpoint
    from ossconv.files import read_rows

    ckpt = open_checkpoint(folder)
    found = {}
    for name, info in ckpt.tensors.items():
        digest = hashlib.sha256()
        rows = info.shape[0] if info.shape else 1
        step = max(1, rows // 64)
        for start in range(0, rows, step):
            digest.update(read_rows(info, start, min(rows, start + step)).view(-1).view(torch.uint8).numpy().tobytes())
        found[name] = digest.hexdigest()
    return found


def disk_write_seconds(folder: Path, nbytes: int) -> float:
    target = folder / "dd.bin"
    seconds, _, _ = run_child(
        ["dd", "if=/dev/zero", f"of={target}", "bs=16M", "status=none", f"count={max(1, nbytes >> 24)}"]
    )
    target.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="20b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers of the model's shape")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ossconv-full"))
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic source for another run")
    args = parser.parse_args()
    shape = dict(MODELS[args.model])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = synthetic.tiny_config(
        hidden_size=2880, intermediate_size=2880, experts_per_token=4, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, sliding_window=128, vocab_size=201088, **shape,
    )  # fmt: skip
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source" / "original"
    if not (source / "config.json").is_file():
        print(f"building a synthetic gpt-oss-{args.model} ({shape['num_hidden_layers']} layers) in {source} ...")
        shutil.rmtree(source, ignore_errors=True)
        # In a child: the generator holds a whole embedding in fp32, and a child's peak RSS counts its parent's.
        build = f"from ossconv import synthetic; synthetic.build({str(source)!r}, synthetic.{config!r})"
        subprocess.run([sys.executable, "-c", build], check=True)
    size = folder_bytes(source)
    free = shutil.disk_usage(work).free
    print(f"source {size / 1e9:.2f} GB, {free / 1e9:.1f} GB free")
    ossconv = [sys.executable, "-m", "ossconv"]
    src, tokens = str(source), str(args.tokens)
    steps = [  # name, command arguments, output, what bounds the step (the disk's read or write)
        ("inspect (headers)", ["inspect", src, "--json"], None, "read"),
        ("inspect --stats", ["inspect", src, "--stats", "--json"], None, "read"),
        ("convert --to hf", ["convert", src, str(work / "hf"), "--to", "hf"], work / "hf", "write"),
        ("reshard --ep-ranks 4", ["reshard", src, str(work / "ep"), "--ep-ranks", "4"], work / "ep", "write"),
        ("reshard --merge", ["reshard", "--merge", str(work / "ep"), str(work / "merged")], work / "merged", "write"),
        ("convert --to gguf", ["convert", src, str(work / "m.gguf"), "--to", "gguf"], work / "m.gguf", "write"),
        ("verify A vs HF", ["verify", src, str(work / "hf"), "--num-tokens", tokens], None, "read"),
    ]
    bf16_size = size * 3.7  # MXFP4 experts (4.25 bits) to bf16 (16 bits); the rest unchanged
    if free > bf16_size + 3 * size:
        bf16 = ["convert", src, str(work / "bf16"), "--to", "hf", "--dtype", "bf16"]
        steps.append(("convert --to hf --dtype bf16", bf16, work / "bf16", "write"))
    else:
        print(f"skipping convert --dtype bf16: it writes about {bf16_size / 1e9:.0f} GB")
    for path in (work / "hf", work / "ep", work / "merged", work / "m.gguf", work / "bf16", work / "cp"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if free < 3 * size:
        raise SystemExit(f"need about {3 * size / 1e9:.0f} GB free beside {work} (source, one output, the cp anchor)")
    cp_seconds, _, _ = run_child(["cp", "-r", str(source), str(work / "cp")])
    shutil.rmtree(work / "cp")
    read_seconds, _, _ = run_child(["sh", "-c", f"cat {source}/*.safetensors > /dev/null"])
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"(this process: {parent / 2**30:.2f} GiB; Linux reports a child's peak RSS as at least that)")
    print(f"anchors: cp -r {cp_seconds:.1f} s ({size / cp_seconds / 1e9:.2f} GB/s), read {read_seconds:.1f} s")
    print(f"{'step':<30} {'seconds':>8} {'GB/s':>6} {'peak RSS':>9} {'vs cp':>6} {'vs disk':>8}  check")
    for name, command, output, bound in steps:
        seconds, rss, _ = run_child([*ossconv, *command, "--quiet"])
        moved = (
            size
            if output is None or not output.exists()
            else (folder_bytes(output) if output.is_dir() else output.stat().st_size)
        )
        disk = read_seconds if bound == "read" else disk_write_seconds(work, moved)
        check = ""
        if name == "reshard --merge":
            check = "tensors identical" if tensor_digests(work / "merged") == tensor_digests(source) else "DIFFERENT"
        if name.startswith("verify"):
            check = "exit 0"
        print(
            f"{name:<30} {seconds:8.1f} {moved / seconds / 1e9:6.2f} {rss / 2**30:7.2f}Gi "
            f"{cp_seconds / seconds:6.2f} {disk / seconds:8.2f}  {check}"
        )
        if output is not None and name not in ("convert --to hf", "reshard --ep-ranks 4"):
            if output.is_dir():
                shutil.rmtree(output, ignore_errors=True)
            else:
                output.unlink(missing_ok=True)
        if name == "reshard --merge":
            shutil.rmtree(work / "ep", ignore_errors=True)
    shutil.rmtree(work / "hf", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["sync"], check=False)


if __name__ == "__main__":
    main()
