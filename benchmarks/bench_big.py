"""A volume far larger than the bundled sample end to end: ``segment_zarr`` on a (256, 1024,
1024) zarr (268 Mvoxel, uint16, the sample tiled), quiet and with one busy process. Writes
``results/big-<device>.md``.

    python benchmarks/bench_big.py [--shape 256 1024 1024] [--chunks 64 256 256] [--busy 0 1]
        [--folder DIR]

Each run is a fresh interpreter (``--worker``) calling ``segment_zarr`` with its defaults
(synchronous scheduler, the default memory budget, the demo model and its refinement) and the
CLI's progress rate; the table gives the wall time, Mvoxel/s, the work blocks, the peak resident
memory the call adds (``common.cpu_peak_extra_bytes``) against the budget, and the labels' and
matte's sizes on disk. Every run's labels are compared with the first run's. The source and
outputs live in ``--folder`` (default: a temporary folder, removed at the end), never in the
repository.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_batch import make_volume

import common


def worker(src: str, out: str, chunks: str) -> dict:
    """One ``segment_zarr`` run in this fresh interpreter."""
    import zarr

    from napari_pacseg import segment
    from napari_pacseg.batch import segment_zarr
    from napari_pacseg.sample import load_demo_model, load_sample

    model = load_demo_model()
    # Code loaded once per process (numba and the compiled loops) is not the run's memory.
    segment(load_sample().image[:8, :64, :64], model)
    result, seen = {}, []

    def go():
        result["res"] = segment_zarr(
            src, model, out, Path(out).with_suffix(".matte.zarr"),
            chunks=tuple(map(int, chunks.split(","))), overwrite=True,
            progress=lambda done, total: seen.append((time.perf_counter(), done, total)),
        )  # fmt: skip

    start = time.perf_counter()
    peak = common.cpu_peak_extra_bytes(go)
    wall = time.perf_counter() - start
    res = result["res"]
    labels = zarr.open_array(out, mode="r")
    digest = __import__("hashlib").sha256()
    for z in range(0, labels.shape[0], labels.chunks[0]):
        digest.update(labels[z : z + labels.chunks[0]].tobytes())
    return {"wall": wall, "peak": peak, "budget": res.memory, "task": res.task_memory,
            "blocks": res.n_blocks, "block": list(res.blocks), "timings": res.timings,
            "progress_calls": len(seen), "labels_sha256": digest.hexdigest(),
            "disk": {p: _size(Path(p)) for p in (out, str(Path(out).with_suffix(".matte.zarr")))}}  # fmt: skip


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 1024, 1024))
    parser.add_argument("--chunks", type=int, nargs=3, default=(64, 256, 256))
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--folder", default=None, help="where the volumes go (default: a temp folder)")
    parser.add_argument("--worker", nargs=3, metavar=("SRC", "OUT", "CHUNKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="pacseg-big-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        src = folder / "source.zarr"
        start = time.perf_counter()
        make_volume(src, *args.shape)
        print(f"source {args.shape} written in {time.perf_counter() - start:.0f} s", flush=True)
        n_vox = args.shape[0] * args.shape[1] * args.shape[2]
        rows = []
        for busy in args.busy:
            spinners = _spinners(busy)
            try:
                time.sleep(0.5 if busy else 0)
                out = folder / f"labels-busy{busy}.zarr"
                r = common.run_isolated(__file__, [str(src), str(out), ",".join(map(str, args.chunks))])
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
            print(f"busy {busy}: {json.dumps(r)[:400]}", flush=True)
            rows.append((busy, r))
        first = rows[0][1]["labels_sha256"]
        lines = [
            f"# A big volume end to end ({common.device_name('cpu')})",
            "",
            f"Command: `python benchmarks/bench_big.py{_flags(args)}` ({time.strftime('%Y-%m-%d %H:%M')})  ",
            f"Machine: {common.describe_machine('cpu')}  ",
            f"Volume: {' x '.join(map(str, args.shape))} uint16 ({n_vox / 1e6:.0f} Mvoxel; the "
            f"bundled sample tiled), storage chunks {' x '.join(map(str, args.chunks))}; "
            "`segment_zarr` with its defaults (synchronous, default memory budget, demo model, "
            "default refinement), labels (uint8) and matte (float32) written; one fresh "
            "interpreter per row.",
            "",
            "| config | wall | Mvoxel/s | work blocks | peak added | budget | largest task "
            "(estimate) | labels + matte on disk | labels as the first row's |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for busy, r in rows:
            name = "quiet" if busy == 0 else f"{busy} busy process" + ("es" if busy > 1 else "")
            disk = sum(r["disk"].values())
            lines.append(
                f"| {name} | {r['wall']:.0f} s | {n_vox / r['wall'] / 1e6:.2f} | {r['blocks']} "
                f"of {' x '.join(map(str, r['block']))} chunks | {common.mib(r['peak'])} MiB | "
                f"{common.mib(r['budget'])} MiB | {common.mib(r['task'])} MiB | "
                f"{disk / 2**20:.0f} MiB | {'yes' if r['labels_sha256'] == first else 'NO'} |"
            )
        path = common.write_result("big-cpu.md", "\n".join(lines) + "\n")
        print(f"wrote {path}")
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


def _flags(args) -> str:
    out = f" --shape {' '.join(map(str, args.shape))}" if tuple(args.shape) != (256, 1024, 1024) else ""
    out += f" --chunks {' '.join(map(str, args.chunks))}" if tuple(args.chunks) != (64, 256, 256) else ""
    out += f" --busy {' '.join(map(str, args.busy))}" if args.busy != [0, 1] else ""
    return out


if __name__ == "__main__":
    main()
