"""Throughput of ``segment_zarr`` on a zarr volume, and its cost per voxel against ``segment()``
in memory on the same volume. Writes ``results/batch-<device>.md``.

    python benchmarks/bench_batch.py [--device cpu|cuda] [--depth 128] [--height 512]
        [--width 256] [--chunks 64 256 256] [--small-chunks 32 128 128] [--repeats 3]
        [--budget 384M] [--busy-rounds 2] [--note TEXT]

The volume is the bundled sample (64 x 256 x 256) tiled to ``depth x height x width``; the model
is the demo model with its default refinement. Three parts:

1. Per-voxel cost against memory: for the storage chunks ``--chunks`` and ``--small-chunks``,
   ``segment()`` on the loaded volume and ``segment_zarr`` (synchronous, torch's default
   threads) with the default memory budget (work blocks of many chunks), run in turns
   (``--repeats`` rounds), so a change in the machine's load hits every method alike; the
   ratio is the median over rounds of each run over the same round's in-memory run. Then once
   each with a budget that keeps one chunk per block (what every chunk paid before work
   blocks), against the in-memory median. The three rows again in turns (``--busy-rounds``)
   with one process spinning beside them.
2. Peak memory against the budget: ``segment_zarr`` in a fresh interpreter with ``--budget``
   and with the default budget; the peak resident memory the call adds (above the loaded
   libraries and model) next to the budget and the estimate (``task_memory``) of its largest
   task.
3. Schedulers: in this process (synchronous, with 1 and all torch threads; dask's thread pool)
   and on a dask ``LocalCluster`` of 1 and 2 single-threaded worker processes, default budget.

Every run's labels are checked against the first. On CUDA the runs use the GPU (torch's default
CPU threads). Each wall time is also given as a fraction of the counted floor
``common.segment_floor`` (image in as uint16, labels out as uint8, the head's matmul flops;
zarr I/O, features and refinement not counted: a loose lower bound).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import common
from common import describe_machine, write_result
from napari_pacseg import segment
from napari_pacseg.batch import segment_zarr
from napari_pacseg.batch.zarr_runs import describe_bytes
from napari_pacseg.engine.segment import receptive_field
from napari_pacseg.sample import load_demo_model, load_sample

# A budget below any chunk's estimate: one chunk per work block
ONE_CHUNK_PER_BLOCK = "1M"


def make_volume(path: Path, depth: int, height: int, width: int):
    import zarr

    image = load_sample().image
    d, h, w = image.shape
    z = zarr.open_array(str(path), mode="w", shape=(depth, height, width), chunks=(32, 128, 128),
                        dtype=image.dtype)  # fmt: skip
    for k in range(0, depth, d):
        for j in range(0, height, h):
            for i in range(0, width, w):
                part = image[: min(d, depth - k), : min(h, height - j), : min(w, width - i)]
                z[k : k + part.shape[0], j : j + part.shape[1], i : i + part.shape[2]] = part
    return z


def run_zarr(name, src, out, model, chunks, threads, **kwargs):
    import zarr

    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-chunk-per-block budget warns so
        res = segment_zarr(src, model, out, chunks=chunks, **kwargs)
    wall = time.perf_counter() - start
    labels = zarr.open_array(str(out), mode="r")[:]
    print(f"{name}: {wall:.1f} s ({res.n_blocks} blocks of {res.blocks} chunks)", flush=True)
    return wall, labels, res


def run_memory(image, model, threads, device):
    torch.set_num_threads(threads)
    start = time.perf_counter()
    seg = segment(image, model, device=device)
    wall = time.perf_counter() - start
    print(f"segment() in memory: {wall:.1f} s", flush=True)
    return wall, seg.labels


def peak_worker(src: str, out: str, chunks: str, memory: str, device: str) -> dict:
    """``segment_zarr`` in this fresh interpreter: the peak resident memory it adds."""
    import dask.array  # noqa: F401  (libraries loaded before the measurement)
    import zarr  # noqa: F401

    model = load_demo_model()
    segment(load_sample().image[:8, :64, :64], model, device=device)  # torch's first-call pools
    result = {}

    def go():
        result["res"] = segment_zarr(src, model, out, chunks=tuple(map(int, chunks.split(","))),
                                     memory=None if memory == "default" else memory,
                                     device=device)  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peak = common.cpu_peak_extra_bytes(go)
    res = result["res"]
    return {"peak": peak, "budget": res.memory, "task": res.task_memory,
            "blocks": res.n_blocks, "size": list(res.blocks), "wall": res.timings["total"]}  # fmt: skip


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--chunks", type=int, nargs=3, default=(64, 256, 256))
    parser.add_argument("--small-chunks", type=int, nargs=3, default=(32, 128, 128))
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the per-voxel part")
    parser.add_argument("--budget", default="384M", help="the budget of the peak-memory part")
    parser.add_argument("--busy-rounds", type=int, default=2,
                        help="rounds of the per-voxel rows with one busy process")  # fmt: skip
    parser.add_argument("--note", default="", help="a line added to the results (e.g. load)")
    parser.add_argument("--worker", nargs=5, metavar=("SRC", "OUT", "CHUNKS", "MEMORY", "DEVICE"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(peak_worker(*args.worker)))
        return
    logging.getLogger("distributed").setLevel(logging.ERROR)
    dev = args.device
    rates = common.machine_rates(dev)
    model = load_demo_model()
    chunk_sets = [tuple(args.chunks), tuple(args.small_chunks)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    threads_before = torch.get_num_threads()
    load_before = load()
    try:
        src = make_volume(tmp / "in.zarr", args.depth, args.height, args.width)
        voxels = int(np.prod(src.shape))
        image = src[:]
        reference = None

        def check(name, labels):
            nonlocal reference
            if reference is None:
                reference = labels
            assert np.array_equal(labels, reference), f"{name}: labels differ from the first run"

        # warm-up, not timed: the first calls load dask, zarr's codecs and torch's pools
        run_memory(image[:32, :128, :128], model, threads_before, dev)
        make_volume(tmp / "small.zarr", 32, 128, 128)
        run_zarr("warm-up", tmp / "small.zarr", tmp / "labels.zarr", model, (32, 64, 64),
                 threads_before, device=dev)  # fmt: skip
        # 1. per-voxel cost against memory: in turns, then once each with one chunk per block
        methods = [("segment() in memory", None, None)]
        methods += [(f"segment_zarr, chunks {c}, default budget", c, None) for c in chunk_sets]
        slow = [(f"segment_zarr, chunks {c}, one chunk per block", c, ONE_CHUNK_PER_BLOCK)
                for c in chunk_sets]  # fmt: skip
        walls: dict[str, list[float]] = {name: [] for name, _, _ in methods + slow}
        info: dict[str, object] = {}
        for rounds, group in ((args.repeats, methods), (1, slow)):
            for _ in range(rounds):
                for name, chunks, memory in group:
                    if chunks is None:
                        wall, labels = run_memory(image, model, threads_before, dev)
                    else:
                        wall, labels, res = run_zarr(name, tmp / "in.zarr", tmp / "labels.zarr",
                                                     model, chunks, threads_before, device=dev,
                                                     memory=memory)  # fmt: skip
                        info[name] = res
                    check(name, labels)
                    walls[name].append(wall)

        # 1b. the same rows in turns with one busy process beside them
        busy_walls: dict[str, list[float]] = {name: [] for name, _, _ in methods}
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            for _ in range(args.busy_rounds):
                for name, chunks, _ in methods:
                    if chunks is None:
                        wall, labels = run_memory(image, model, threads_before, dev)
                    else:
                        wall, labels, _ = run_zarr(f"{name}, 1 busy", tmp / "in.zarr",
                                                   tmp / "labels.zarr", model, chunks,
                                                   threads_before, device=dev)  # fmt: skip
                    check(name, labels)
                    busy_walls[name].append(wall)
        finally:
            spinner.kill()
            spinner.wait()

        # 2. peak memory against the budget, each in a fresh interpreter
        peaks = []
        for memory in (args.budget, "default"):
            out = tmp / "peak.zarr"
            shutil.rmtree(out, ignore_errors=True)
            got = common.run_isolated(__file__, [str(tmp / "in.zarr"), str(out),
                                                 ",".join(map(str, chunk_sets[0])), memory, dev])  # fmt: skip
            print(f"peak with budget {memory}: {got}", flush=True)
            peaks.append((memory, got))

        # 3. schedulers
        configs = [
            ("synchronous, 1 torch thread", 1, {}),
            (f"synchronous, {threads_before} torch threads", threads_before, {}),
            ("dask threads (2), 1 torch thread each", 1, {"scheduler": "threads"}),
            ("LocalCluster, 1 worker x 1 thread", 1, {"workers": 1}),
            ("LocalCluster, 2 workers x 1 thread", 1, {"workers": 2}),
        ]
        if dev == "cuda":  # torch's CPU threads matter little there
            configs = [
                (f"synchronous, GPU, {threads_before} torch threads", threads_before, {}),
                ("dask threads (2), GPU", threads_before, {"scheduler": "threads"}),
                ("LocalCluster, 1 worker x 1 thread, GPU", threads_before, {"workers": 1}),
                ("LocalCluster, 2 workers x 1 thread, GPU", threads_before, {"workers": 2}),
            ]
        rows = []
        for name, threads, kwargs in configs:
            wall, labels, res = run_zarr(name, tmp / "in.zarr", tmp / "labels.zarr", model,
                                         chunk_sets[0], threads, device=dev, **kwargs)  # fmt: skip
            check(name, labels)
            rows.append((name, wall, res))
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = load()

    halo = receptive_field(model)
    config = model.config
    widths = (config.n_features, *config.head.hidden, config.n_classes)
    floor = common.segment_floor(rates, voxels, widths, in_bytes=2, out_bytes=1)
    small = " ".join(map(str, args.small_chunks))
    lines = [
        f"# segment_zarr throughput ({common.device_name(dev)})",
        "",
        f"Command: `python benchmarks/bench_batch.py --device {dev} --depth {args.depth} "
        f"--height {args.height} --width {args.width} --chunks {' '.join(map(str, args.chunks))} "
        f"--small-chunks {small} --repeats {args.repeats} --budget {args.budget}`  ",
        f"Machine: {describe_machine(dev)}"
        + (f"; {describe_machine('cpu')}" if dev != "cpu" else "")
        + f"; load average (1, 5, 15 min) {load_before} before, {load_after} after  ",
        f"Volume: {src.shape} uint16 zarr ({voxels / 1e6:.1f} Mvoxel, the sample tiled), demo "
        f"model with default refinement, receptive field {halo} voxels. Wall times of whole "
        "calls (segment_zarr: intensity range, all blocks, outputs written and renamed). All "
        "runs give identical labels.  ",
        common.rates_line(rates) + f" Counted floor of the whole volume: {floor * 1e3:.3g} ms "
        "(`common.segment_floor`: image in, labels out, head flops; a loose lower bound).",
    ]
    if args.note:
        lines += ["", args.note]
    memory_walls = walls[methods[0][0]]
    base = statistics.median(memory_walls)
    lines += [
        "",
        f"## Per-voxel cost against segment() in memory (synchronous, {threads_before} torch "
        "threads)",
        "",
        f"{args.repeats} rounds of the first three rows in turns; the ratio of each round is to "
        "the in-memory run of the same round, the last column the median of those. The "
        "one-chunk-per-block rows (every chunk paying its halo, as before work blocks) ran once "
        "after them, against the in-memory median.",
        "",
        "| method | blocks | wall s (each round) | Mvoxel/s (median) | per round / in memory "
        "| cost per voxel / in memory |",
        "|---|---|---|---:|---|---:|",
    ]
    for name, _, _ in methods + slow:
        med = statistics.median(walls[name])
        res = info.get(name)
        blocks = "-" if res is None else f"{res.n_blocks} of {res.blocks} chunks"
        each = ", ".join(f"{w:.3g}" for w in walls[name])
        if len(walls[name]) == len(memory_walls):
            ratios = [w / m for w, m in zip(walls[name], memory_walls)]
            per_round, ratio = ", ".join(f"{r:.2f}" for r in ratios), statistics.median(ratios)
        else:
            per_round, ratio = "-", med / base
        lines.append(f"| {name} | {blocks} | {each} | {voxels / med / 1e6:.3g} | {per_round} "
                     f"| {ratio:.2f}x |")  # fmt: skip
    busy_base = busy_walls[methods[0][0]]
    lines += [
        "",
        f"## The same with one busy process ({args.busy_rounds} rounds in turns; a process "
        "spinning on one core beside them)",
        "",
        "| method | wall s (each round) | Mvoxel/s (median) | cost per voxel / in memory "
        "| busy / quiet |",
        "|---|---|---:|---:|---:|",
    ]
    for name, _, _ in methods:
        med = statistics.median(busy_walls[name])
        ratio = statistics.median(w / m for w, m in zip(busy_walls[name], busy_base))
        each = ", ".join(f"{w:.3g}" for w in busy_walls[name])
        lines.append(f"| {name} | {each} | {voxels / med / 1e6:.3g} | {ratio:.2f}x "
                     f"| {med / statistics.median(walls[name]):.2f} |")  # fmt: skip
    lines += [
        "",
        "## Peak memory against the budget (fresh interpreter, synchronous, chunks "
        f"{tuple(args.chunks)})",
        "",
        "| budget | blocks | estimated peak of the largest task | peak the call adds | wall s |",
        "|---|---|---:|---:|---:|",
    ]
    for memory, got in peaks:
        given = "default: " if memory == "default" else ""
        lines.append(
            f"| {given}{describe_bytes(got['budget'])} | {got['blocks']} of {tuple(got['size'])} "
            f"chunks | {describe_bytes(got['task'])} | {describe_bytes(got['peak'])} | "
            f"{got['wall']:.3g} |"
        )
    lines += ["", "The peak also holds what the call does outside its tasks: the whole-volume "
              "intensity range's sample, dask's graph and the zarr stores."]  # fmt: skip
    rbase = rows[0][1]
    lines += [
        "",
        f"## Schedulers (chunks {tuple(args.chunks)}, default budget)",
        "",
        f"| scheduler | blocks | wall s | Mvoxel/s | speed-up vs {rows[0][0]} | % of floor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {r.n_blocks} of {r.blocks} chunks | {w:.3g} | {voxels / w / 1e6:.3g} | "
        f"{rbase / w:.2f}x | {common.of_floor(floor, w)} |"
        for n, w, r in rows
    ]
    lines += ["", "Target (issue 37): per-voxel cost of segment_zarr <= 1.25x segment() in memory "
              "for both chunkings."]  # fmt: skip
    path = write_result(f"batch-{common.device_name(dev)}.md", "\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":  # LocalCluster spawns worker processes that import this module
    main()
