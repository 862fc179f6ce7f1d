"""What carrying the logits of the planes two z-neighbouring work blocks share would save in
``segment_zarr`` (issue 37's "halo reuse along the slowest axis where it pays"). Writes
``results/halo-<device>.md``.

    python benchmarks/bench_halo.py [--shapes 256x1024x1024 1024x512x512] [--chunks 64 256 256]
        [--budgets 512M 1G 2G 4G] [--region 96 512 512] [--repeats 2]

Per volume shape and memory budget, ``choose_blocks`` gives the run's work blocks for a uint16
volume of that shape stored in ``--chunks`` (one task at a time, as the synchronous scheduler runs
them). Each block reads its core grown by the receptive field (``halo``: the features' halo
plus the refinement's read reach). Where two blocks meet along z, the lower one has already
computed exact logits for the ``2 x read_reach[0]`` planes around the boundary that the upper
one reads again; reuse would carry those planes to the next block and skip the logits pass
(features, context, head) there. The refinement cannot be carried: its mean field depends on
everything within its reach.

Measured in this run: ``segment()`` (demo model, default refinement, torch's threads) on a
``--region`` of the bundled sample tiled, best of ``--repeats``; its stage timings give the
logits pass's and the whole run's cost per voxel. The table's run time is the blocks' voxels
(each extent, halo included) at the whole run's cost per voxel; the saving is the shared
planes' voxels at the logits pass's cost per voxel: an estimate from measured costs, not a run
with reuse.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import describe_machine, write_result
from napari_pacseg import segment
from napari_pacseg.batch.zarr_runs import (
    choose_blocks,
    describe_bytes,
    memory_bytes,
    task_memory,
)
from napari_pacseg.engine.plan import extend_box, settle
from napari_pacseg.sample import load_demo_model, load_sample

STAGES_LOGITS = ("features", "context", "head")


def tiled(image: np.ndarray, shape) -> np.ndarray:
    reps = [-(-n // s) for n, s in zip(shape, image.shape)]
    return np.ascontiguousarray(np.tile(image, reps)[tuple(slice(0, n) for n in shape)])


def measure_costs(model, spacing, region, repeats: int) -> dict:
    """Seconds per voxel of the logits pass and of the whole ``segment()`` on ``region``."""
    image = tiled(load_sample().image, region)
    segment(image[:8, :64, :64], model, spacing=spacing)  # compiled loops loaded
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        seg = segment(image, model, spacing=spacing)
        wall = time.perf_counter() - start
        if best is None or wall < best[0]:
            best = (wall, seg.timings)
    wall, timings = best
    n = math.prod(region)
    logits = sum(timings.get(s, 0.0) for s in STAGES_LOGITS)
    return {"wall": wall, "logits": logits, "timings": timings,
            "whole_per_voxel": wall / n, "logits_per_voxel": logits / n}  # fmt: skip


def layout_saving(shape, chunks, halo, settings, model, budget: int, costs: dict) -> dict:
    """The blocks ``segment_zarr`` would run under ``budget`` and what z reuse would save."""

    def estimate(ext_shape):
        return task_memory(ext_shape, settings, model, 2)

    blocks = choose_blocks(shape, chunks, halo, settings, budget, 1, estimate)
    reach_z = settings.read_reach[0]
    ext_voxels = shared = 0
    for box in blocks.boxes:
        ext = extend_box(box, halo, shape)[0]  # the block's extent, as segment_zarr reads it
        ext_voxels += math.prod(b - a for a, b in ext)
        z0 = box[0][0]
        if z0 > 0:  # a block below: the planes around z0 both read
            planes = min(z0 + reach_z, shape[0]) - max(0, z0 - reach_z)
            shared += planes * math.prod(b - a for a, b in ext[1:])
    run = ext_voxels * costs["whole_per_voxel"]
    saved = shared * costs["logits_per_voxel"]
    grid = [len({b[a] for b in blocks.boxes}) for a in range(3)]
    return {"blocks": len(blocks.boxes), "grid": grid, "task": blocks.task_bytes,
            "overread": ext_voxels / math.prod(shape), "shared": shared / math.prod(shape),
            "run": run, "saved": saved}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["256x1024x1024", "1024x512x512"],
                   help="volume shapes as DxHxW")
    p.add_argument("--chunks", type=int, nargs=3, default=[64, 256, 256])
    p.add_argument("--budgets", nargs="+", default=["512M", "1G", "2G", "4G"])
    p.add_argument("--region", type=int, nargs=3, default=[96, 512, 512])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    model = load_demo_model()
    spacing = load_sample().spacing
    settings = settle(model, spacing)
    halo = settings.receptive_field
    costs = measure_costs(model, spacing, tuple(args.region), args.repeats)
    shapes = [tuple(int(n) for n in text.split("x")) for text in args.shapes]
    chunks = tuple(args.chunks)
    t = costs["timings"]

    lines = [
        "# Halo reuse along z: what it would save (cpu)",
        "",
        f"Command: `python benchmarks/bench_halo.py --shapes {' '.join(args.shapes)} "
        f"--chunks {' '.join(map(str, chunks))} --budgets {' '.join(args.budgets)} "
        f"--region {' '.join(map(str, args.region))} --repeats {args.repeats}`  ",
        f"Machine: {describe_machine('cpu')}  ",
        f"Volumes: uint16 in chunks {chunks}; "
        f"demo model, default refinement; receptive field {halo} voxels = the features' halo "
        f"{settings.halo} + the refinement's read reach {settings.read_reach}. One task at a "
        "time (synchronous scheduler).  ",
        f"Measured: `segment()` on {tuple(args.region)} voxels of the sample tiled, best of "
        f"{args.repeats}: {costs['wall']:.2f} s, of which the logits pass "
        f"{costs['logits']:.2f} s (features {t.get('features', 0):.2f}, head "
        f"{t.get('head', 0):.2f}) and the refinement {t.get('refine', 0):.2f} s: "
        f"{costs['whole_per_voxel'] * 1e9:.0f} ns per voxel in all, "
        f"{costs['logits_per_voxel'] * 1e9:.0f} ns in the logits pass.",
        "",
        "Estimated run time = the blocks' extents (core + halo, clipped) at the whole run's cost "
        "per voxel; saving = the planes z-neighbours share (2 x the read reach along z, the "
        "block's extent in y and x) at the logits pass's cost per voxel.",
        "",
        "| volume | budget | blocks (z, y, x) | largest task (estimate) | voxels read / volume "
        "| shared z planes / volume | estimated run s | reuse would save s | saving |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in shapes:
        for text in args.budgets:
            r = layout_saving(shape, chunks, halo, settings, model, memory_bytes(text), costs)
            volume = f"{'x'.join(map(str, shape))} ({math.prod(shape) / 1e6:.0f} Mvoxel)"
            lines.append(
                f"| {volume} | {text} | {r['blocks']} ({', '.join(map(str, r['grid']))}) "
                f"| {describe_bytes(r['task'])} | {r['overread']:.2f} | {r['shared']:.3f} "
                f"| {r['run']:.0f} | {r['saved']:.1f} | {100 * r['saved'] / r['run']:.1f}% |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "The saving is what carrying exact logits across a z boundary can win at most; it "
        "applies only where blocks meet along z and the next block runs in the same process "
        "right after (the synchronous scheduler; dask's pools and workers run blocks out of "
        "order or elsewhere), and the carried planes add to the task's memory.",
    ]
    path = write_result("halo-cpu.md", "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
