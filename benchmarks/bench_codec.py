"""MXFP4 codec on one gpt-oss-20b layer of experts, against anchors measured in the same run.

    python benchmarks/bench_codec.py [--experts 32] [--skip-oracles]

One layer: mlp1 blocks [32, 5760, 90, 16] + mlp2 blocks [32, 2880, 90, 16] (1.59 GB of bf16 when decoded).
Each measurement runs in a fresh child process so its peak memory is its own; "temp" is the peak resident memory
above what the child held before the call (inputs and reused output buffers excluded), as a share of the
output size. Targets (issue 3): decode >= 25x transformers and >= 0.25x a copy into touched memory;
encode >= 10x torchao's to_mx; temporary memory under 10% of the output.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

from ossconv.formats import mxfp4

HIDDEN = INTER = 2880


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _layer(experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(experts, 2 * INTER, HIDDEN // 32), (experts, HIDDEN, INTER // 32)]
    return [
        (
            torch.randint(0, 256, (*rows, 16), generator=g, dtype=torch.uint8),
            torch.randint(115, 125, rows, generator=g, dtype=torch.uint8),
        )
        for rows in shapes
    ]


def _child(name: str, experts: int, queue: mp.Queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    layer = _layer(experts)
    outputs = [torch.empty((*b.shape[:-2], b.shape[-2] * 32), dtype=torch.bfloat16) for b, _ in layer]
    for out in outputs:
        out.fill_(0)  # touch the reused buffers: first-touch page faults are not the codec's cost
    floats = None
    if name.startswith("encode") or name == "torchao":
        floats = [mxfp4.decode(b, s, torch.bfloat16) for b, s in layer]
        packed = [(torch.zeros_like(b), torch.zeros_like(s)) for b, s in layer]
    # one-time table construction is not per-layer cost
    mxfp4.encode(torch.ones(64, dtype=torch.bfloat16))
    mxfp4.decode(layer[1][0][:1, :1], layer[1][1][:1, :1])
    source = [torch.ones_like(o) for o in outputs] if name == "copy" else None

    def run() -> None:
        if name == "decode":
            for (b, s), out in zip(layer, outputs, strict=True):
                mxfp4.decode(b, s, torch.bfloat16, out=out)
        elif name == "transformers":
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            for b, s in layer:
                convert_moe_packed_tensors(b, s, dtype=torch.bfloat16)
        elif name == "copy":
            for out, src in zip(outputs, source, strict=True):
                out.copy_(src)
        elif name.startswith("encode"):
            rule = name.split("-")[1]
            for x, out in zip(floats, packed, strict=True):
                mxfp4.encode(x, rule, out=out)
        elif name == "torchao":
            from torchao.prototype.mx_formats.mx_tensor import to_mx

            for x in floats:
                to_mx(x.view(-1, x.shape[-1]), torch.float4_e2m1fn_x2, 32)

    seconds = []
    # Ours and the copy: best of 2 (the first run after allocating gigabytes is noisy on this kind of machine).
    # The oracles take 20-50 s: one run.
    for _ in range(1 if name in ("transformers", "torchao") else 2):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak-RSS mark to now
        before = _status_kb("VmRSS")
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    queue.put((min(seconds), (_status_kb("VmHWM") - before) * 1024))


def measure(name: str, experts: int) -> tuple[float, int]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(name, experts, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--skip-oracles", action="store_true", help="skip transformers and torchao (slow)")
    args = parser.parse_args()
    out_bytes = args.experts * (2 * INTER * HIDDEN + HIDDEN * INTER) * 2
    print(
        f"one gpt-oss-20b expert layer, {args.experts} experts: {out_bytes / 1e9:.2f} GB of bf16, "
        f"{torch.get_num_threads()} threads"
    )
    names = ["copy", "decode", "encode-up", "encode-floor"]
    if not args.skip_oracles:
        names += ["transformers", "torchao"]
    results = {}
    for name in names:
        results[name] = measure(name, args.experts)
        seconds, temp = results[name]
        print(
            f"  {name:13s} {seconds:7.3f} s  {out_bytes / seconds / 1e9:6.2f} GB/s of bf16   "
            f"temp {temp / 1e6:8.1f} MB ({temp / out_bytes:6.1%} of output)"
        )
    print("ratios (same run):")
    decode, copy = results["decode"][0], results["copy"][0]
    print(f"  decode vs copy into touched memory: {copy / decode:.2f}x   (target >= 0.25x)")
    if "transformers" in results:
        print(f"  decode vs transformers' dequantizer: {results['transformers'][0] / decode:.1f}x  (target >= 25x)")
    if "torchao" in results:
        for rule in ("up", "floor"):
            ratio = results["torchao"][0] / results[f"encode-{rule}"][0]
            print(f"  encode ({rule}) vs torchao to_mx: {ratio:.1f}x  (target >= 10x)")
    worst = max(results[n][1] for n in ("decode", "encode-up", "encode-floor"))
    print(f"  largest codec temporary memory: {worst / out_bytes:.1%} of the output  (target < 10%)")


if __name__ == "__main__":
    main()
