"""Benchmark of ``max_unpool3d`` against ``F.max_unpool3d`` and the zeros-then-scatter idiom.

Indices come from ``max_pool3d_with_indices`` of a random volume of the output size. Each
measurement runs in a fresh interpreter (best of 3 after a warm-up). The table also gives each
time as a fraction of the counted floor: read the values (float32) and indices (int64) once,
write the whole dense output once, over the copy bandwidth ``common.measure_rates`` measures.
Writes ``benchmarks/results/unpool-<device>.md``.

Usage: python benchmarks/bench_unpool.py [--device cpu|cuda] [--sizes 256 512] [--channels 1 16]
       [--kernels 2 4] [--quick]
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
    gen = torch.Generator(device=device).manual_seed(0)  # on the device: fast at 512^3 x 16
    x = torch.randn(1, c, size, size, size, device=device, generator=gen)
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
    return {"time": common.best_time(fns[method], device, repeats=3)}


def floor_bytes(size: int, c: int, k: int) -> int:
    """Values and indices read once, the dense float32 output written once."""
    return c * size**3 * 4 + c * (size // k) ** 3 * (4 + 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None,
        help="output edges (default 128 256 on CPU, 256 512 on CUDA; 32 with --quick)",
    )  # fmt: skip
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--kernels", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, size, c, k, device = args.worker
        print(json.dumps(worker(method, int(size), int(c), int(k), device)))
        return
    dev = args.device
    sizes = args.sizes or ([32] if args.quick else [256, 512] if dev == "cuda" else [128, 256])
    rates = common.machine_rates(dev)
    lines = [
        f"# max_unpool3d benchmark, {common.device_name(dev)}",
        "",
        f"Command: `python benchmarks/bench_unpool.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d %H:%M')})  ",
        f"Machine: {common.describe_machine(dev)}  ",
        "float32 values, int64 indices from max_pool3d, batch 1; output size^3 per channel.  ",
        common.rates_line(rates) + " Bytes: values + indices read once, the output written once.",
        "",
        "| output | C | k | ours (s) | F.max_unpool3d (s) | zeros + scatter_ (s) | vs F.max_unpool3d "
        "| vs scatter | floor (ms) | ours % of floor | F.max_unpool3d % of floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for c in args.channels:
            for k in args.kernels:
                r = {
                    m: common.run_isolated(__file__, [m, str(size), str(c), str(k), dev])
                    for m in ("ours", "torch", "scatter")
                }
                t = {m: r[m]["time"] for m in r}
                row = (
                    f"| {size}^3 | {c} | {k} | {t['ours']:.4g} | {t['torch']:.4g} | {t['scatter']:.4g} "
                    f"| {t['torch'] / t['ours']:.2f}x | {t['scatter'] / t['ours']:.2f}x |"
                )
                floor = common.floor_seconds(rates, floor_bytes(size, c, k))
                row += (
                    f" {floor * 1e3:.3g} | {common.of_floor(floor, t['ours'])} "
                    f"| {common.of_floor(floor, t['torch'])} |"
                )
                lines.append(row)
                print(row, flush=True)
    path = common.write_result(
        f"unpool-{common.device_name(dev)}{'-quick' if args.quick else ''}.md",
        "\n".join(lines) + "\n",
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
