"""Our ops and the pipeline on a busy machine: quiet and with competing processes spinning.

For ``voxel_mlp`` (16->64->64->4 on 128^3), ``pac3d`` (64^3, 4 channels, kernel 5),
``pac_crf3d`` (60x256x256, 2 classes, kernel 5, 5 iterations), ``segment()`` and ``train()`` on the
bundled sample, each in a fresh interpreter: median of ``--repeats`` calls after one warm-up, with
torch's default thread count and with one thread, while 0, 1 or 2 other processes spin on a core
each (``while True: pass``). Reports every time as a ratio to the quiet one-thread time (the
issue's target: with one core busy, <= 1.3x) and the quiet speed-up of the default threads.
Writes ``benchmarks/results/busy-cpu.md``.

Usage: python benchmarks/bench_busy.py [--repeats 3] [--ops segment train ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common

OPS = ("voxel_mlp", "pac3d", "pac_crf3d", "segment", "train")
# (label, busy processes, threads: None = torch's default)
CONFIGS = (
    ("quiet, 1 thread", 0, 1),
    ("quiet, default threads", 0, None),
    ("1 busy process, default threads", 1, None),
    ("1 busy process, 1 thread", 1, 1),
    ("2 busy processes, default threads", 2, None),
)


def _work(op: str):
    """A no-argument callable running ``op`` once (inputs made here, outside the timing)."""
    import torch

    from napari_pacseg import segment, train
    from napari_pacseg.sample import load_demo_model, load_sample
    from pacseg_kernels import pac3d, pac_crf3d, voxel_mlp

    gen = torch.Generator().manual_seed(0)
    if op == "voxel_mlp":
        x = torch.randn(1, 16, 128, 128, 128, generator=gen)
        ws = [torch.randn(64, 16, generator=gen) * 0.25, torch.randn(64, 64, generator=gen) * 0.1,
              torch.randn(4, 64, generator=gen) * 0.1]  # fmt: skip
        bs = [torch.zeros(64), torch.zeros(64), torch.zeros(4)]
        return lambda: voxel_mlp(x, ws, bs)
    if op == "pac3d":
        x = torch.randn(1, 4, 64, 64, 64, generator=gen)
        g = torch.randn(1, 3, 64, 64, 64, generator=gen)
        w = torch.randn(4, 4, 5, 5, 5, generator=gen)
        return lambda: pac3d(x, g, w, padding=2)
    if op == "pac_crf3d":
        u = torch.randn(1, 2, 60, 256, 256, generator=gen)
        g = torch.randn(1, 1, 60, 256, 256, generator=gen) * 3
        return lambda: pac_crf3d(u, g, iterations=5, kernel_size=5, compat=3.0, spatial_sigma=2.0)
    sample = load_sample()
    if op == "segment":
        model = load_demo_model()
        return lambda: segment(sample.image, model, spacing=sample.spacing)
    if op == "train":
        return lambda: train(sample.image, sample.scribbles, spacing=sample.spacing)
    raise ValueError(op)


def worker(op: str, threads: int, repeats: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    fn = _work(op)
    fn()  # warm-up: first-call costs (allocator, oneDNN primitives) are not what we compare
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "times": times, "threads": torch.get_num_threads()}


def _spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--worker", nargs=3, metavar=("OP", "THREADS", "REPEATS"))
    args = parser.parse_args()
    if args.worker:
        op, threads, repeats = args.worker
        print(json.dumps(worker(op, int(threads), int(repeats))))
        return
    results: dict[tuple[str, str], dict] = {}
    for label, busy, threads in CONFIGS:
        spinners = _spinners(busy)
        try:
            time.sleep(0.5 if busy else 0)  # let the spinners reach full speed
            for op in args.ops:
                res = common.run_isolated(__file__, [op, str(threads or 0), str(args.repeats)])
                results[(label, op)] = res
                print(f"{label:36s} {op:10s} {res['median']:.3f} s  {res['times']}", flush=True)
        finally:
            for p in spinners:
                p.kill()
                p.wait()
    base = {op: results[(CONFIGS[0][0], op)]["median"] for op in args.ops}
    lines = [
        "# Busy machine (CPU)",
        "",
        f"Command: `python benchmarks/bench_busy.py{f' --repeats {args.repeats}' if args.repeats != 3 else ''}`  ",
        f"Machine: {common.describe_machine('cpu')}, {os.cpu_count()} cores  ",
        f"Each cell: median of {args.repeats} calls in a fresh interpreter after a warm-up, and in "
        "brackets the ratio to the quiet one-thread time of the same op (target with one busy "
        "process: <= 1.3x). Busy processes spin in pure Python, one core each.",
        "",
        "| config | " + " | ".join(args.ops) + " |",
        "|---|" + "---|" * len(args.ops),
    ]
    for label, _, _ in CONFIGS:
        cells = [f"{results[(label, op)]['median']:.3f} s ({results[(label, op)]['median'] / base[op]:.2f}x)" for op in args.ops]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    quiet = {op: base[op] / results[(CONFIGS[1][0], op)]["median"] for op in args.ops}
    lines += ["", "Quiet speed-up of the default threads over one thread: " + ", ".join(
        f"{op} {quiet[op]:.2f}x" for op in args.ops)]  # fmt: skip
    out = common.write_result("busy-cpu.md", "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
