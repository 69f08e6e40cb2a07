"""Every command on a full-size synthetic gpt-oss checkpoint, against the disk measured in the same run.

    python benchmarks/full_scale.py [--model 20b|120b] [--layers N] [--ep-ranks 4] [--workdir /tmp/ossconv-full]
                                    [--repeat N] [--only TEXT] [--keep]

Builds the model by streaming (the generator the tests use, the real config: 24 layers x 32 experts for 20b,
36 x 128 for 120b, vocabulary 201088, real names, dtypes and file naming; ``--layers N`` for fewer layers of
that shape), then runs each command in a child process and prints one table: seconds, GB/s, the child's own
peak RSS (wait4), and two ratios from the same run: against ``cp -r`` of the source, and against the disk's
own rate for what bounds the step, measured right after it (reading: the step's own inputs, the faster of
``cat > /dev/null`` and ``dd iflag=direct``; writing: as many random bytes as the step writes, which nothing
below can compress or skip, the faster of buffered and direct writes). The float conversions read and write
gigabytes, so they are also compared with the disk doing both at once. Everything is measured from the disk:
the step's inputs are dropped from the page cache first (posix_fadvise), and writes count until synced, the
anchors' alike; with ``--repeat N`` each step runs N rounds, each followed by its anchors, and the table holds
the median seconds and the median of the rounds' ratios. It checks what it can (merge and the bf16 -> MXFP4
round trip byte-identical to the source tensors, verify exit 0), checks free disk first and says what it skips
(the bf16 round trip of the full 20b needs about 80 GB), and cleans up. ratio > 1 is faster than the anchor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import evict, folder_bytes, run_child

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


# Writes nbytes of data no layer below can compress or skip (zeros may be: a virtual disk can store them as
# holes), 16 MiB at a time, each chunk a 64 MiB pool of random words XORed with its own number; with "direct",
# past the page cache (O_DIRECT, from an aligned buffer), as ossconv writes tensor bytes.
WRITE_RANDOM = """
import mmap, os, sys, numpy as np
path, nbytes, direct = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "direct"
pool = np.random.default_rng(0).integers(0, 2**63, size=(64 << 20) // 8, dtype=np.uint64)
chunk = 2 << 20
staging = np.frombuffer(mmap.mmap(-1, chunk * 8), dtype=np.uint64)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
for number in range(max(1, nbytes // (chunk * 8))):
    start = (number * chunk) % (pool.size - chunk)
    np.bitwise_xor(pool[start:start + chunk], np.uint64(number), out=staging)
    view = memoryview(staging).cast("B")
    while view:
        view = view[os.write(fd, view):]
os.close(fd)
"""


def disk_write_seconds(folder: Path, nbytes: int) -> float:
    """The disk writing nbytes: the faster of buffered and direct writes."""
    target = folder / "random.bin"
    best = []
    for how in ("buffered", "direct"):
        seconds, _, _ = run_child([sys.executable, "-c", WRITE_RANDOM, str(target), str(nbytes), how])
        best.append(seconds)
        target.unlink()
    return min(best)


def read_command(files: list[str], how: str) -> str:
    """Reading ``files`` to nowhere: ``cat`` through the page cache, or ``dd`` past it."""
    if how == "buffered":
        return f"cat {shlex.join(files)} > /dev/null"
    return "; ".join(f"dd if={shlex.quote(f)} of=/dev/null bs=16M iflag=direct status=none" for f in files)


def disk_read_seconds(inputs: list[Path]) -> float:
    """The disk reading ``inputs`` (dropped from the page cache first): the faster of ``cat`` and a direct
    read. On a virtual machine a buffered read can cost the kernel more CPU than the disk takes."""
    files = [str(p) for folder in inputs for p in sorted(folder.rglob("*.safetensors"))]
    best = []
    for how in ("buffered", "direct"):
        evict(*inputs)
        seconds, _, _ = run_child(["sh", "-c", read_command(files, how)])
        best.append(seconds)
    return min(best)


def disk_read_while_writing_seconds(inputs: list[Path], folder: Path, nbytes: int) -> float:
    """The disk reading ``inputs`` (dropped from the page cache first) while it writes ``nbytes`` of random
    data, buffered or direct (the faster): the most a step that streams one into the other can hope for on
    one disk."""
    files = [str(p) for folder in inputs for p in sorted(folder.rglob("*.safetensors"))]
    target = folder / "random.bin"
    best = []
    for how in ("buffered", "direct"):
        evict(*inputs)
        write = shlex.join([sys.executable, "-c", WRITE_RANDOM, str(target), str(nbytes), how])
        seconds, _, _ = run_child(["sh", "-c", f"({read_command(files, how)}) & {write}; wait"])
        best.append(seconds)
        target.unlink()
    return min(best)


def measure_step(
    command: list[str], output: Path | None, bound: str, inputs: list[Path], work: Path
) -> tuple[float, float, int, float, int]:
    """One round of a step, from the disk, and its anchors measured right after it (a shared disk's rate
    drifts within a run): seconds, the disk's seconds for what bounds it, peak RSS, the disk's seconds
    reading the input while writing the output (float conversions only, else 0) and the bytes it moved."""
    if output is not None:
        remove(output)
    evict(*inputs)
    seconds, rss, _ = run_child([sys.executable, "-m", "ossconv", *command, "--quiet"])
    if bound == "read":
        moved = sum(folder_bytes(p) for p in inputs)
        disk = disk_read_seconds(inputs)
    else:
        moved = folder_bytes(output) if output.is_dir() else output.stat().st_size
        disk = disk_write_seconds(work, moved)
    both = 0.0
    if command[0] == "convert" and "--dtype" in command:  # reads and writes gigabytes; one disk does both
        both = disk_read_while_writing_seconds(inputs, work, folder_bytes(output))
    return seconds, disk, rss, both, moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="20b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers of the model's shape")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ossconv-full"))
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--ep-ranks", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic source for another run")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of each step and its anchors; medians")
    parser.add_argument("--only", default="", help="run only the steps whose names contain this text")
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
    built = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    if (built.get("num_hidden_layers"), built.get("num_experts")) != (config.num_hidden_layers, config.num_experts):
        print(f"building a synthetic gpt-oss-{args.model} ({shape['num_hidden_layers']} layers) in {source} ...")
        shutil.rmtree(source, ignore_errors=True)
        # In a child: the generator holds a whole embedding in fp32, and a child's peak RSS counts its parent's.
        build = f"from ossconv import synthetic; synthetic.build({str(source)!r}, synthetic.{config!r})"
        subprocess.run([sys.executable, "-c", build], check=True)
    size = folder_bytes(source)
    free = shutil.disk_usage(work).free + sum(
        folder_bytes(p) if p.is_dir() else p.stat().st_size for p in OUTPUTS(work) if p.exists()
    )
    print(f"source {size / 1e9:.2f} GB, {free / 1e9:.1f} GB free")
    src, tokens, layers = str(source), str(args.tokens), shape["num_hidden_layers"]
    hf, bf16 = work / "hf", work / "bf16"
    steps = [  # name, command arguments, output, what bounds the step (the disk's read or write), inputs
        ("inspect (headers)", ["inspect", src, "--json"], None, "read", [source]),
        ("inspect --stats", ["inspect", src, "--stats", "--json"], None, "read", [source]),
        ("convert --to hf", ["convert", src, str(hf), "--to", "hf"], hf, "write", [source]),
        ("verify A vs HF", ["verify", src, str(hf), "--num-tokens", tokens], None, "read", [source, hf]),
        ("reshard --ep-ranks N", ["reshard", src, str(work / "ep"), "--ep-ranks", str(args.ep_ranks)],
         work / "ep", "write", [source]),
        ("reshard --merge", ["reshard", "--merge", str(work / "ep"), str(work / "merged")], work / "merged", "write",
         [work / "ep"]),
        ("convert --to gguf", ["convert", src, str(work / "m.gguf"), "--to", "gguf"], work / "m.gguf", "write",
         [source]),
    ]  # fmt: skip
    bf16_size = size * 3.7  # MXFP4 experts (4.25 bits) to bf16 (16 bits); the rest unchanged
    if free > bf16_size + 2 * size:  # the bf16 copy, its MXFP4 round trip and an anchor as big as that
        steps += [
            ("convert --to hf --dtype bf16", ["convert", src, str(bf16), "--to", "hf", "--dtype", "bf16"], bf16,
             "write", [source]),
            ("convert bf16 --dtype mxfp4", ["convert", str(bf16), str(work / "back"), "--to", "openai", "--dtype",
             "mxfp4"], work / "back", "read", [bf16]),
        ]  # fmt: skip
    else:
        need = (bf16_size + 2 * size) / 1e9
        print(f"skipping the bf16 round trip: it needs about {need:.0f} GB free beside the source ({free / 1e9:.0f})")
    if args.only:
        steps = [step for step in steps if args.only in step[0]]
        print(f"steps: {', '.join(step[0] for step in steps) or 'none'}")
    done_with = {  # what each step leaves for a later one, removed after that
        "convert --to hf": [],
        "verify A vs HF": [hf],
        "reshard --ep-ranks N": [],
        "reshard --merge": [work / "ep", work / "merged"],
        "convert --to hf --dtype bf16": [],
        "convert bf16 --dtype mxfp4": [bf16, work / "back"],
    }
    for path in OUTPUTS(work):
        remove(path)
    if free < 3 * size:
        raise SystemExit(f"need about {3 * size / 1e9:.0f} GB free beside {work} (source, one output, the cp anchor)")
    evict(source)
    cp_seconds, _, _ = run_child(["cp", "-r", str(source), str(work / "cp")])
    remove(work / "cp")
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"(this process: {parent / 2**30:.2f} GiB; Linux reports a child's peak RSS as at least that)")
    print(
        f"anchors, from the disk (every input is dropped from the page cache before each step; writes count "
        f"until synced; each step's own disk anchor is measured right after it): cp -r {cp_seconds:.1f} s "
        f"({size / cp_seconds / 1e9:.2f} GB/s)"
    )
    print(f"{'step':<30} {'seconds':>8} {'GB/s':>6} {'peak RSS':>9} {'vs cp':>6} {'vs disk':>8}  check")
    for name, command, output, bound, inputs in steps:
        rounds = [measure_step(command, output, bound, inputs, work) for _ in range(args.repeat)]
        seconds = statistics.median(r[0] for r in rounds)  # each ratio pairs a round with its own anchor
        vs_disk, vs_both = (statistics.median(r[i] / r[0] for r in rounds) for i in (1, 3))
        rss, moved = max(r[2] for r in rounds), rounds[-1][4]
        check = ""
        if name == "reshard --merge":
            check = "tensors identical" if tensor_digests(work / "merged") == tensor_digests(source) else "DIFFERENT"
        if name == "convert bf16 --dtype mxfp4":
            check = "tensors identical" if tensor_digests(work / "back") == tensor_digests(source) else "DIFFERENT"
        if vs_both:
            check += f"{'; ' if check else ''}vs the disk reading the input while writing the output"
            check += f" {vs_both:.2f}"
        if name.startswith("verify"):
            check = f"exit 0, {seconds / layers:.2f} s/layer"
        print(
            f"{name:<30} {seconds:8.1f} {moved / seconds / 1e9:6.2f} {rss / 2**30:7.2f}Gi "
            f"{cp_seconds / seconds:6.2f} {vs_disk:8.2f}  {check}"
        )
        for path in done_with.get(name, [output] if output is not None else []):
            remove(path)
    for path in OUTPUTS(work):
        remove(path)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["sync"], check=False)


def OUTPUTS(work: Path) -> list[Path]:  # noqa: N802 - a constant list that depends on the folder
    return [work / n for n in ("hf", "ep", "merged", "m.gguf", "bf16", "back", "cp")]


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
