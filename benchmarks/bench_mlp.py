"""Benchmark of ``voxel_mlp`` against what people write instead.

Compares, on a (1, C, S, S, S) float32 volume:
  * ours: ``pacseg_kernels.voxel_mlp`` (blocked torch path on CPU, fused Triton kernel on CUDA),
    channels-first and channels-last, and on the CPU with ``matmul_dtype=torch.bfloat16``;
  * ``nn.Sequential`` applied to the whole flattened (S^3, C) volume (what people write);
  * ``numpy.apply_along_axis`` with a numpy MLP, on a subsample (what people start from);
  * the ceilings of ``common.measure_rates`` (a large copy, a large float32 ``torch.mm``): every
    time is also given as a fraction of its counted floor, max(bytes / bandwidth, flops / mm
    rate), bytes = input read once + output written once + the weights.
Every measurement runs in a fresh interpreter so peak-memory readings are not hidden by heap
memory kept from earlier work. Writes ``benchmarks/results/mlp-<device>.md``.

Usage: python benchmarks/bench_mlp.py [--device cpu|cuda] [--size 128 [256 ...]]
       [--widths 8 16 ...] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import itertools

import common
from pacseg_kernels import voxel_mlp

MAIN_WIDTHS = (16, 64, 64, 4)


def _flops_per_voxel(widths) -> int:
    return 2 * sum(a * b for a, b in itertools.pairwise(widths))


def _floor_bytes(widths, n_vox: int) -> int:
    """Fewest bytes the op moves: the input read once, the output written once, the weights."""
    params = sum(a * b + b for a, b in itertools.pairwise(widths))
    return 4 * (n_vox * (widths[0] + widths[-1]) + params)


def _layers(widths, device):
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=gen) / i**0.5 for i, o in itertools.pairwise(widths)]
    bs = [torch.randn(o, generator=gen) * 0.1 for o in widths[1:]]
    return [w.to(device) for w in ws], [b.to(device) for b in bs]


def _sequential(weights, biases) -> nn.Sequential:
    mods = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        lin = nn.Linear(w.shape[1], w.shape[0]).to(w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        mods.append(lin)
        if i < len(weights) - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def worker(method: str, size: int, widths: tuple[int, ...], device: str) -> dict:
    """One measurement in this (fresh) process: time and peak extra memory of ``method``."""
    torch.manual_seed(0)
    c, k = widths[0], widths[-1]
    weights, biases = _layers(widths, device)
    n_vox = size**3
    peak_fn = common.cuda_peak_extra_bytes if device == "cuda" else common.cpu_peak_extra_bytes
    out_bytes = n_vox * k * 4
    torch.set_grad_enabled(False)
    if method in ("apply_along_axis", "apply_along_axis_numpy"):
        # What people start from: their trained PyTorch MLP called once per voxel through
        # numpy.apply_along_axis (a conversion each way per voxel), or the same MLP in numpy.
        sub = 16  # 4096 voxels, extrapolated: the per-voxel Python call dominates
        x = np.random.default_rng(0).standard_normal((sub, sub, sub, c)).astype(np.float32)
        if method == "apply_along_axis":
            seq = _sequential([w.cpu() for w in weights], [b.cpu() for b in biases])

            def per_voxel(v):
                return seq(torch.from_numpy(v)).numpy()
        else:
            wn = [w.cpu().numpy() for w in weights]
            bn = [b.cpu().numpy() for b in biases]

            def per_voxel(v):
                for i, (w, b) in enumerate(zip(wn, bn)):
                    v = w @ v + b
                    if i < len(wn) - 1:
                        v = np.maximum(v, 0)
                return v

        t = common.best_time(lambda: np.apply_along_axis(per_voxel, -1, x), "cpu", repeats=1)
        return {"time": t * n_vox / sub**3, "peak_extra": None}
    if method in ("ours", "ours_cl", "ours_bf16"):
        channels_last = method == "ours_cl"
        matmul_dtype = torch.bfloat16 if method == "ours_bf16" else None

        def make(s):
            return torch.randn((s, s, s, c) if channels_last else (1, c, s, s, s), device=device)

        def apply(v):
            return voxel_mlp(v, weights, biases, channels_last=channels_last,
                             matmul_dtype=matmul_dtype)  # fmt: skip
    elif method == "sequential":
        seq = _sequential(weights, biases)

        def make(s):
            return torch.randn(s, s, s, c, device=device)  # (X, Y, Z, n): no copy needed

        def apply(v):
            return seq(v.view(-1, c))
    else:
        raise ValueError(method)
    apply(make(4))  # load code pages and library state before the memory reading
    x = make(size)

    def run():
        return apply(x)

    peak = peak_fn(run) - out_bytes
    t = common.best_time(run, device)
    return {"time": t, "peak_extra": peak}


def measure(method, size, widths, device) -> dict:
    """One worker's result, or ``{"error": last line}`` when it failed (e.g. out of memory)."""
    args = [method, str(size), ",".join(map(str, widths)), device]
    try:
        return common.run_isolated(__file__, args)
    except RuntimeError as err:
        return {"error": str(err).strip().splitlines()[-1][:120]}


def _failed(r: dict) -> str:
    return "failed: " + r["error"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--size", type=int, nargs="+", default=None,
        help="edge(s) of the main volume (default 128 on CPU, 256 and 512 on CUDA); the memory "
        "table and the width sweep use the first",
    )  # fmt: skip
    parser.add_argument(
        "--widths", type=int, nargs="+", default=None,
        help="hidden widths w of the sweep 16->w->w->4 (default 8 16 32 64 128 256)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=None,
        help="interleaved rounds of the main table, best of each (default 2 on CPU, 1 on CUDA)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, size, widths, device = args.worker
        res = worker(method, int(size), tuple(int(w) for w in widths.split(",")), device)
        print(json.dumps(res))
        return

    dev = args.device
    # The workers run at torch's default precision (TF32 off): the Triton kernel then uses IEEE
    # float32 dots, like the torch.mm that measures the matmul rate.
    sizes = args.size or ([32] if args.quick else [256, 512] if dev == "cuda" else [128])
    size = sizes[0]
    mem_sizes = (
        [size // 2, size] if args.quick else [64, 128, 256] if dev == "cpu" else [128, 256, 512]
    )
    sweep = args.widths or ([16, 64] if args.quick else [8, 16, 32, 64, 128, 256])
    rounds = args.rounds or (2 if dev == "cpu" else 1)
    command = "python benchmarks/bench_mlp.py " + " ".join(sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M")

    fpv = _flops_per_voxel(MAIN_WIDTHS)
    methods = ["ours", "ours_cl", "sequential"]
    if dev == "cpu":
        methods.insert(2, "ours_bf16")
        methods += ["apply_along_axis", "apply_along_axis_numpy"]
    # Interleaved rounds, best of each: the shared 2-core CPU machine has slow spells lasting
    # seconds, and one process at the wrong moment should not decide a ratio.
    res = {}
    for s in sizes:
        for round_ in range(rounds):
            for m in methods:
                if round_ and m.startswith("apply_along_axis"):
                    continue  # slow baseline, ~100x away: one round is enough
                r = measure(m, s, MAIN_WIDTHS, dev)
                if (s, m) not in res or r.get("time", math.inf) < res[s, m].get("time", math.inf):
                    res[s, m] = r
    rates = common.machine_rates(dev, runs=2 if dev == "cpu" else 1)
    gflops = rates["gflops"]
    label = {
        "ours": "ours, channels-first" + (" (Triton)" if dev == "cuda" else " (torch path)"),
        "ours_cl": "ours, channels-last (X, Y, Z, n)",
        "ours_bf16": "ours, channels-first, matmul_dtype=bfloat16 (what segment() uses on CPUs "
        "with AMX; GFLOP/s and % against the float32 mm rate)",
        "sequential": "nn.Sequential on the flattened volume",
        "apply_along_axis": "np.apply_along_axis calling the nn.Sequential per voxel "
        "(16^3 subsample, extrapolated)",
        "apply_along_axis_numpy": "np.apply_along_axis with the MLP in numpy per voxel "
        "(16^3 subsample, extrapolated)",
    }
    lines = [
        f"# voxel_mlp benchmark, {common.device_name(dev)}",
        "",
        f"Command: `{command}` ({started})  ",
        f"Machine: {common.describe_machine(dev)}  ",
        f"MLP {'->'.join(map(str, MAIN_WIDTHS))} (ReLU), float32, {fpv} FLOP/voxel; best of "
        f"{rounds} round(s).  ",
        common.rates_line(rates) + " Bytes: input read once, output written once, weights.",
        "",
        "| size | method | time (s) | Mvoxel/s | GFLOP/s | % of mm rate | floor (ms) "
        "| % of floor | peak extra MiB | ours faster by |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sizes:
        n_vox = s**3
        floor = common.floor_seconds(rates, _floor_bytes(MAIN_WIDTHS, n_vox), fpv * n_vox)
        t_ours = res[s, "ours"].get("time")
        for m in methods:
            r = res[s, m]
            if "error" in r:
                lines.append(f"| {s}^3 | {label[m]} | {_failed(r)} |" + " - |" * 7)
                continue
            t = r["time"]
            peak = "n/a" if r.get("peak_extra") is None else common.mib(r["peak_extra"])
            lines.append(
                f"| {s}^3 | {label[m]} | {t:.4g} | {n_vox / t / 1e6:.3g} | {fpv * n_vox / t / 1e9:.3g} | "
                f"{100 * fpv * n_vox / t / 1e9 / gflops:.0f}% | {floor * 1e3:.3g} | "
                f"{common.of_floor(floor, t)} | {peak} | "
                + (f"{t / t_ours:.3g}x |" if t_ours else "- |")
            )
    n_vox = size**3
    failed = sum("error" in res[s, "ours"] for s in sizes)

    lines += ["", "Peak extra memory of ours (beyond input and output) by volume size:", ""]
    lines += ["| size | peak extra MiB |", "|---|---|"]
    for s in mem_sizes:
        r = measure("ours", s, MAIN_WIDTHS, dev)
        lines.append(f"| {s}^3 | {_failed(r) if 'error' in r else common.mib(r['peak_extra'])} |")
        failed += "error" in r

    lines += ["", f"Width sweep: MLP 16->w->w->4, {size}^3:", ""]
    lines += ["| w | ours (s) | nn.Sequential (s) | speed-up | ours GFLOP/s | % of mm rate "
              "| floor (ms) | ours % of floor |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for w in sweep:
        widths = (16, w, w, 4)
        r_ours = measure("ours", size, widths, dev)
        r_seq = measure("sequential", size, widths, dev)
        flops = _flops_per_voxel(widths) * n_vox
        floor = common.floor_seconds(rates, _floor_bytes(widths, n_vox), flops)
        if "error" in r_ours:
            failed += 1
            lines.append(f"| {w} | {_failed(r_ours)} |" + " - |" * 6 + f" {floor * 1e3:.3g} | - |")
            continue
        ours = r_ours["time"]
        seq = f"{r_seq['time']:.4g}" if "time" in r_seq else _failed(r_seq)
        speed = f"{r_seq['time'] / ours:.3g}x" if "time" in r_seq else "-"
        gf = flops / ours / 1e9
        lines.append(
            f"| {w} | {ours:.4g} | {seq} | {speed} | {gf:.3g} | {100 * gf / gflops:.0f}% "
            f"| {floor * 1e3:.3g} | {common.of_floor(floor, ours)} |"
        )

    path = common.write_result(
        f"mlp-{common.device_name(dev)}{'-quick' if args.quick else ''}.md", "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    print(f"\nwritten to {path}")
    if failed:
        sys.exit(f"{failed} measurement(s) of ours failed (see the table)")


if __name__ == "__main__":
    main()
