"""Throughput of ``segment_zarr`` on a zarr volume: in this process (synchronous, with 1 and 2
torch threads; dask's thread pool) and on a dask ``LocalCluster`` of 1 and 2 single-threaded
worker processes. Writes ``results/batch-<device>.md``.

    python benchmarks/bench_batch.py [--device cpu|cuda] [--depth 128] [--height 512]
        [--width 256] [--chunks 64 256 256]

The volume is the bundled sample (64 x 256 x 256) tiled to ``depth x height x width``; the model
is the demo model with its default refinement. Every run's output is checked against the first.
On CUDA every configuration runs the chunks on the GPU (torch's default CPU threads). Each wall
time is also given as a fraction of the counted floor ``common.segment_floor`` (image in as
uint16, labels out as uint8, the head's matmul flops; zarr I/O, features and refinement not
counted: a loose lower bound).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import common
from common import describe_machine, write_result
from napari_pacseg.batch import segment_zarr
from napari_pacseg.engine.segment import receptive_field
from napari_pacseg.sample import load_demo_model, load_sample


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


def run(name, src, out, model, chunks, threads, **kwargs):
    import zarr

    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    res = segment_zarr(src, model, out, chunks=chunks, **kwargs)
    wall = time.perf_counter() - start
    labels = zarr.open_array(str(out), mode="r")[:]
    print(f"{name}: {wall:.1f} s", flush=True)
    return wall, labels, res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--chunks", type=int, nargs=3, default=(64, 256, 256))
    parser.add_argument("--note", default="", help="a line added to the results (e.g. load)")
    args = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    dev = args.device
    rates = common.machine_rates(dev)
    model = load_demo_model()
    chunks = tuple(args.chunks)
    tmp = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    threads_before = torch.get_num_threads()
    try:
        src = make_volume(tmp / "in.zarr", args.depth, args.height, args.width)
        voxels = int(np.prod(src.shape))
        configs = [
            ("synchronous, 1 torch thread", 1, {}),
            (f"synchronous, {threads_before} torch threads", threads_before, {}),
            ("dask threads (2), 1 torch thread each", 1, {"scheduler": "threads"}),
            ("LocalCluster, 1 worker x 1 thread", 1, {"workers": 1}),
            ("LocalCluster, 2 workers x 1 thread", 1, {"workers": 2}),
        ]
        if dev == "cuda":  # torch's CPU threads matter little there: one synchronous run
            configs = [
                (f"synchronous, GPU, {threads_before} torch threads", threads_before, {}),
                ("dask threads (2), GPU", threads_before, {"scheduler": "threads"}),
                ("LocalCluster, 1 worker x 1 thread, GPU", threads_before, {"workers": 1}),
                ("LocalCluster, 2 workers x 1 thread, GPU", threads_before, {"workers": 2}),
            ]
        rows, reference, res = [], None, None
        for name, threads, kwargs in configs:
            wall, labels, res = run(name, tmp / "in.zarr", tmp / "labels.zarr", model, chunks,
                                    threads, device=dev, **kwargs)  # fmt: skip
            if reference is None:
                reference = labels
            assert np.array_equal(labels, reference), f"{name}: labels differ from the first run"
            rows.append((name, wall))
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0][1]
    halo = receptive_field(model)
    config = model.config
    widths = (config.n_features, *config.head.hidden, config.n_classes)
    floor = common.segment_floor(rates, voxels, widths, in_bytes=2, out_bytes=1)
    lines = [
        f"# segment_zarr throughput ({common.device_name(dev)})",
        "",
        f"Command: `python benchmarks/bench_batch.py --device {dev} --depth {args.depth} "
        f"--height {args.height} --width {args.width} --chunks {' '.join(map(str, chunks))}`",
        f"Machine: {describe_machine(dev)}"
        + (f"; {describe_machine('cpu')}" if dev != "cpu" else ""),
        f"Volume: {src.shape} uint16 zarr ({voxels / 1e6:.1f} Mvoxel, the sample tiled), demo "
        f"model with default refinement, receptive field {halo} voxels; chunks {chunks} "
        f"({res.n_chunks} chunks). Wall time of one run each (segment_zarr call: intensity "
        "range, all chunks, outputs written and renamed; cluster start-up included for the "
        "LocalCluster rows). All runs give identical labels.",
        common.rates_line(rates) + f" Counted floor of the whole volume: {floor * 1e3:.3g} ms "
        "(`common.segment_floor`: image in, labels out, head flops; a loose lower bound).",
    ]
    if args.note:
        lines += ["", args.note]
    lines += [
        "",
        f"| scheduler | wall s | Mvoxel/s | speed-up vs {rows[0][0]} | % of floor |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {w:.3g} | {voxels / w / 1e6:.3g} | {base / w:.2f}x | {common.of_floor(floor, w)} |"
        for n, w in rows
    ]
    path = write_result(f"batch-{common.device_name(dev)}.md", "\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":  # LocalCluster spawns worker processes that import this module
    main()
