"""Throughput of ``segment_zarr`` on a zarr volume: in this process (synchronous, with 1 and 2
torch threads; dask's thread pool) and on a dask ``LocalCluster`` of 1 and 2 single-threaded
worker processes. Writes ``results/batch-<device>.md``.

    python benchmarks/bench_batch.py [--depth 128] [--height 512] [--chunks 64 256 256]

The volume is the bundled sample (64 x 256 x 256) tiled to ``depth x height x 256``; the model is
the demo model with its default refinement. Every run's output is checked against the first.
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

from common import describe_machine, write_result
from napari_pacseg.batch import segment_zarr
from napari_pacseg.pipeline import receptive_field
from napari_pacseg.sample import load_demo_model, load_sample


def make_volume(path: Path, depth: int, height: int):
    import zarr

    image = load_sample().image
    d, h, w = image.shape
    z = zarr.open_array(str(path), mode="w", shape=(depth, height, w), chunks=(32, 128, 128),
                        dtype=image.dtype)  # fmt: skip
    for k in range(0, depth, d):
        for j in range(0, height, h):
            part = image[: min(d, depth - k), : min(h, height - j)]
            z[k : k + part.shape[0], j : j + part.shape[1]] = part
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
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs=3, default=(64, 256, 256))
    parser.add_argument("--note", default="", help="a line added to the results (e.g. load)")
    args = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    model = load_demo_model()
    chunks = tuple(args.chunks)
    tmp = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    threads_before = torch.get_num_threads()
    try:
        src = make_volume(tmp / "in.zarr", args.depth, args.height)
        voxels = int(np.prod(src.shape))
        configs = [
            ("synchronous, 1 torch thread", 1, {}),
            (f"synchronous, {threads_before} torch threads", threads_before, {}),
            ("dask threads (2), 1 torch thread each", 1, {"scheduler": "threads"}),
            ("LocalCluster, 1 worker x 1 thread", 1, {"workers": 1}),
            ("LocalCluster, 2 workers x 1 thread", 1, {"workers": 2}),
        ]
        rows, reference, res = [], None, None
        for name, threads, kwargs in configs:
            wall, labels, res = run(name, tmp / "in.zarr", tmp / "labels.zarr", model, chunks,
                                    threads, **kwargs)  # fmt: skip
            if reference is None:
                reference = labels
            assert np.array_equal(labels, reference), f"{name}: labels differ from the first run"
            rows.append((name, wall))
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0][1]
    halo = receptive_field(model)
    lines = [
        "# segment_zarr throughput (CPU)",
        "",
        f"Command: `python benchmarks/bench_batch.py --depth {args.depth} --height {args.height} "
        f"--chunks {' '.join(map(str, chunks))}`",
        f"Machine: {describe_machine('cpu')}",
        f"Volume: {src.shape} uint16 zarr ({voxels / 1e6:.1f} Mvoxel, the sample tiled), demo "
        f"model with default refinement, receptive field {halo} voxels; chunks {chunks} "
        f"({res.n_chunks} chunks). Wall time of one run each (segment_zarr call: intensity "
        "range, all chunks, outputs written and renamed; cluster start-up included for the "
        "LocalCluster rows). All runs give identical labels.",
    ]
    if args.note:
        lines += ["", args.note]
    lines += [
        "",
        "| scheduler | wall s | Mvoxel/s | speed-up vs synchronous, 1 thread |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {w:.1f} | {voxels / w / 1e6:.2f} | {base / w:.2f}x |" for n, w in rows]
    path = write_result("batch-cpu.md", "\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":  # LocalCluster spawns worker processes that import this module
    main()
