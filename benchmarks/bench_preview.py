"""The live preview's own work, headless: what ``bench_live`` times without napari around it.

1. ``pac_crf3d`` on the default preview's CRF region (the visible plane +-1 with the demo
   refinement's reach: 13 x 256 x 256, 2 classes, 3 x 5 x 5 window, 5 steps), the whole result
   vs ``keep`` of its 3 middle planes, over the z and over the y wavefront; interleaved medians.
2. ``RegionSegmenter.probabilities`` of the sample's planes 32-34 after a one-plane move (one new
   plane of logits; the refinement with its local fit), quiet and with one busy process, with
   the preview's load-adaptive threads and with torch's threads fixed at their count (what the
   preview ran before 2026-12-04).

Writes ``benchmarks/results/preview-cpu.md``.

Usage: python benchmarks/bench_preview.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common


def _crf(repeats: int) -> dict:
    import pacseg_kernels.crf_torch as crf_torch
    from pacseg_kernels import pac_crf3d

    gen = torch.Generator().manual_seed(0)
    unary = 2 * torch.randn(1, 2, 13, 256, 256, generator=gen)
    guide = torch.randn(1, 1, 13, 256, 256, generator=gen)
    keep = ((5, 8), (0, 256), (0, 256))
    axes = crf_torch.WAVEFRONT_AXES
    times: dict = {}
    try:
        for _ in range(repeats):
            for axis in (0, 1):
                crf_torch.WAVEFRONT_AXES = (axis,)
                for kept in (None, keep):
                    start = time.perf_counter()
                    pac_crf3d(unary, guide, 5, (3, 5, 5), compat=10.0,
                              spatial_sigma=(0.8, 2.0, 2.0), keep=kept)  # fmt: skip
                    times.setdefault((axis, kept is not None), []).append(
                        time.perf_counter() - start
                    )
    finally:
        crf_torch.WAVEFRONT_AXES = axes
    return {k: statistics.median(v) for k, v in times.items()}


def _preview(repeats: int, adaptive: bool) -> float:
    from napari_pacseg.engine.preview import RegionSegmenter
    from napari_pacseg.io.model_file import load_model
    from napari_pacseg.sample import DEMO_MODEL_FILE, load_sample
    from pacseg_kernels import threads

    threads.set_adaptive(adaptive)
    sample = load_sample()
    seg = RegionSegmenter(sample.image, load_model(DEMO_MODEL_FILE), spacing=sample.spacing)
    seg.probabilities(((31, 34), (0, 256), (0, 256)))  # the warm-up: the first slab's logits
    times = []
    for z in range(33, 33 + repeats):  # each a one-plane move
        start = time.perf_counter()
        seg.probabilities(((z - 1, z + 2), (0, 256), (0, 256)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=2, metavar=("ADAPTIVE", "REPEATS"))
    args = parser.parse_args()
    if args.worker:
        print(_preview(int(args.worker[1]), args.worker[0] == "1"))
        return
    crf = _crf(args.repeats)
    rows = []
    for busy in (0, 1):
        for adaptive in (1, 0):
            spin = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)
            ]
            steal = common.cpu_steal_meter()
            try:
                time.sleep(0.5 if busy else 0)
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", str(adaptive), str(args.repeats)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
            finally:
                for p in spin:
                    p.kill()
                    p.wait()
            rows.append((busy, adaptive, float(out.stdout.strip().splitlines()[-1]), steal()))
    stolen = [s for *_, s in rows if s is not None]
    lines = [
        "# The live preview's own work, headless (CPU)",
        "",
        f"Command: `python benchmarks/bench_preview.py --repeats {args.repeats}` "
        f"({time.strftime('%Y-%m-%d %H:%M')})  ",
        f"Machine: {common.describe_machine('cpu')}  ",
        "",
        "`pac_crf3d` on the default preview's CRF region (13 x 256 x 256, 2 classes, window "
        "3 x 5 x 5, 5 steps, 3 planes kept), medians of interleaved calls:",
        "",
        "| wavefront | whole result | keep 3 planes |",
        "|---|---|---|",
    ]
    for axis, name in ((0, "over z"), (1, "over y")):
        lines.append(f"| {name} | {crf[axis, False]:.3f} s | {crf[axis, True]:.3f} s |")
    lines += [
        "",
        "`RegionSegmenter.probabilities` of 3 planes of the sample after a one-plane move (demo "
        "model, default refinement with its local fit), median of the moves, a fresh "
        "interpreter per row:",
        "",
        "| config | threads | per preview |",
        "|---|---|---|",
    ]
    for busy, adaptive, seconds, _ in rows:
        config = "quiet" if not busy else "1 busy process"
        how = "load-adaptive (the preview now)" if adaptive else "torch's count, fixed (before)"
        lines.append(f"| {config} | {how} | {seconds:.3f} s |")
    if stolen:
        lines += [
            "",
            f"CPU stolen by the hypervisor during the rows: up to {100 * max(stolen):.0f}%.",
        ]
    out = common.write_result("preview-cpu.md", "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
