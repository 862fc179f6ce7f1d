"""Benchmark of ``max_unpool3d`` against ``F.max_unpool3d`` and the zeros-then-scatter idiom.

Indices come from ``max_pool3d_with_indices`` of a random volume of the output size. Each
measurement runs in a fresh interpreter (best of 3 after a warm-up). On CUDA the table also gives
the bandwidth floor: read values + indices once, write the output once. Writes
``benchmarks/results/unpool-<device>.md``.

Usage: python benchmarks/bench_unpool.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common
from pacseg_kernels import max_pool3d_with_indices, max_unpool3d


def worker(method: str, size: int, c: int, k: int, device: str) -> dict:
    torch.set_grad_enabled(False)
    x = torch.randn(1, c, size, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    vals, idx = max_pool3d_with_indices(x, k)
    del x

    def scatter():
        out = torch.zeros(1, c, size**3, device=device)
        return out.scatter_(2, idx.view(1, c, -1), vals.view(1, c, -1))

    fns = {
        "ours": lambda: max_unpool3d(vals, idx, k),
        "torch": lambda: F.max_unpool3d(vals, idx, k),
        "scatter": scatter,
    }
    res = {"time": common.best_time(fns[method], device, repeats=3)}
    if device == "cuda":
        big = torch.empty(2**28, device=device)
        res["bandwidth"] = 2 * big.numel() * 4 / common.best_time(lambda: big.clone(), device)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, size, c, k, device = args.worker
        print(json.dumps(worker(method, int(size), int(c), int(k), device)))
        return
    dev = args.device
    sizes = [32] if args.quick else [128, 256]
    lines = [
        f"# max_unpool3d benchmark, {common.device_name(dev)}",
        "",
        f"Command: `python benchmarks/bench_unpool.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d %H:%M')})  ",
        f"Machine: {common.describe_machine(dev)}  ",
        "float32 values, int64 indices from max_pool3d, batch 1; output size^3 per channel.",
        "",
        "| output | C | k | ours (s) | F.max_unpool3d (s) | zeros + scatter_ (s) | vs F.max_unpool3d | vs scatter |"
        + (" % of bandwidth floor |" if dev == "cuda" else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if dev == "cuda" else ""),
    ]
    for size in sizes:
        for c in (1, 16):
            for k in (2, 4):
                r = {
                    m: common.run_isolated(__file__, [m, str(size), str(c), str(k), dev])
                    for m in ("ours", "torch", "scatter")
                }
                t = {m: r[m]["time"] for m in r}
                row = (
                    f"| {size}^3 | {c} | {k} | {t['ours']:.4g} | {t['torch']:.4g} | {t['scatter']:.4g} "
                    f"| {t['torch'] / t['ours']:.2f}x | {t['scatter'] / t['ours']:.2f}x |"
                )
                if dev == "cuda":
                    moved = c * size**3 * 4 + c * (size // k) ** 3 * (4 + 8)
                    row += f" {100 * moved / r['ours']['bandwidth'] / t['ours']:.0f}% |"
                lines.append(row)
                print(row, flush=True)
    path = common.write_result(
        f"unpool-{common.device_name(dev)}{'-quick' if args.quick else ''}.md",
        "\n".join(lines) + "\n",
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
