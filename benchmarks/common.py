"""Helpers shared by the benchmark scripts: timing, peak memory, device names, result files, and
the measured ceilings (copy bandwidth, matmul rate) that each benchmark's counted floor uses.

``python benchmarks/common.py --worker rates cuda`` prints the ceilings of a device as JSON (what
``machine_rates`` runs in a fresh interpreter).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_APOC = ROOT / ".apoc-venv" / "bin" / "python"


def add_apoc_python(parser) -> None:
    """The ``--apoc-python`` option of the benchmarks that run APOC (its own venv; see
    ``apoc_worker.py``)."""
    parser.add_argument(
        "--apoc-python", default=str(DEFAULT_APOC) if DEFAULT_APOC.exists() else "",
        help="interpreter with apoc installed (default: .apoc-venv/bin/python when present)",
    )  # fmt: skip


def shown_path(path: str) -> str:
    """``path`` relative to the repository when inside it (for the results file)."""
    try:
        return str(Path(path).absolute().relative_to(ROOT))
    except ValueError:
        return path


def run_apoc_worker(python: str, image, scribbles, repeats: int, feature_sets) -> dict:
    """``apoc_worker.py`` in the interpreter ``python`` on ``image`` and ``scribbles``: its
    output arrays by name (``<set>_labels``, ``<set>_times``; see the worker)."""
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, image=image, scribbles=scribbles)
        worker = str(Path(__file__).parent / "apoc_worker.py")
        subprocess.run([python, worker, str(src), str(dst), str(repeats), *feature_sets],
                       check=True, capture_output=True)  # fmt: skip
        with np.load(dst) as out:
            return {k: out[k] for k in out.files}


def device_name(device: str) -> str:
    """Short device label for file names and tables: 'cpu' or the CUDA device name."""
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-").lower()
    return "cpu"


def describe_machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def cpu_steal_meter():
    """A function returning the share of CPU time the hypervisor stole from this virtual
    machine since the meter was made (Linux ``/proc/stat``; None elsewhere). Stolen time
    slows every timing here: a run with much of it is not comparable with a quiet one."""

    def read():
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])

    start = read()

    def share() -> float | None:
        end = read()
        if start is None or end is None or end[1] <= start[1]:
            return None
        return (end[0] - start[0]) / (end[1] - start[1])

    return share


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: str, repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_extra_bytes(fn) -> int:
    """Peak resident memory ``fn()`` adds above what was resident before it, in bytes.

    Linux only: resets the process's high-water mark through ``/proc/self/clear_refs``. Run it
    first in a fresh process (see ``run_isolated``) so freed-but-kept heap memory from earlier
    work cannot hide the allocations.
    """
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) * 1024


def cuda_peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run_isolated(script: str, args: list[str]) -> dict:
    """Run ``script --worker ARGS`` in a fresh interpreter and return the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, script, "--worker", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def write_result(name: str, text: str) -> Path:
    """Write ``benchmarks/results/<name>`` atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# --- ceilings and floors ------------------------------------------------------------------------


def _copy_time(n: int, device: str, repeats: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.rand(n, device=device, generator=gen)
    dst = torch.empty_like(src)
    return best_time(lambda: dst.copy_(src), device, repeats=repeats)


def _exp_time(n: int, device: str, repeats: int) -> float:
    """Seconds of 32 in-place ``exp_`` passes over ``n`` floats (small enough to stay in cache)."""
    x = torch.full((n,), -1e-3, device=device)  # exp stays near 1: every pass the same values

    def run():
        for _ in range(32):
            x.exp_().neg_()

    return best_time(run, device, repeats=repeats) / 32


def _mm_time(n: int, device: str, repeats: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen)
    b = torch.randn(n, n, device=device, generator=gen)
    return best_time(lambda: torch.mm(a, b), device, repeats=repeats)


def measure_rates(device: str) -> dict:
    """The ceilings that counted floors are divided by, measured on ``device`` in this process.

    ``bandwidth``: bytes read plus bytes written per second by one large copy between two
    buffers of random floats (2 GiB each on CUDA, 256 MiB on CPU: far beyond any cache).
    ``exps``: float32 ``torch.exp`` per second over 2^18 floats in cache on CPU (2^24 on CUDA),
    each pass followed by a negation (counted as free).
    ``gflops``: float32 ``torch.mm`` of two random n x n matrices (n = 8192 on CUDA, 4096 on CPU)
    at torch's default precision, TF32 off on CUDA, as in the benchmark workers, where the
    Triton kernels then use IEEE float32 dots too. On CUDA also ``h2d`` and ``d2h``: pinned
    host <-> device copies of 512 MiB (bytes per second), the floor of what an op that takes
    and returns numpy arrays must transfer, and ``memory``, the device's total bytes.
    """
    torch.set_grad_enabled(False)
    cuda = device == "cuda"
    n_copy = 2**29 if cuda else 2**26
    n = 8192 if cuda else 4096
    t_copy = _copy_time(n_copy, device, repeats=10 if cuda else 5)
    t_mm = _mm_time(n, device, repeats=5 if cuda else 3)
    n_exp = 2**24 if cuda else 2**18
    t_exp = _exp_time(n_exp, device, repeats=5)
    rates = {
        "exps": n_exp / t_exp,
        "bandwidth": 2 * n_copy * 4 / t_copy,
        "copy_bytes": n_copy * 4,
        "gflops": 2 * n**3 / t_mm / 1e9,
        "mm_n": n,
        "tf32": bool(cuda and torch.backends.cuda.matmul.allow_tf32),
    }
    if cuda:
        n_host = 2**27  # 512 MiB of float32
        host = torch.rand(n_host).pin_memory()
        dev = torch.empty(n_host, device=device)
        rates["h2d"] = n_host * 4 / best_time(lambda: dev.copy_(host, non_blocking=True), device)
        rates["d2h"] = n_host * 4 / best_time(lambda: host.copy_(dev, non_blocking=True), device)
        rates["memory"] = torch.cuda.get_device_properties(0).total_memory
    return rates


def machine_rates(device: str, runs: int = 1) -> dict:
    """``measure_rates`` in ``runs`` fresh interpreters, the best of each ceiling."""
    best: dict = {}
    for _ in range(runs):
        r = run_isolated(__file__, ["rates", device])
        for key, value in r.items():
            if key not in best or (isinstance(value, float) and value > best[key]):
                best[key] = value
    return best


def floor_seconds(rates: dict, bytes_moved: float = 0.0, flops: float = 0.0) -> float:
    """Counted floor: the larger of ``bytes_moved`` over the copy bandwidth and ``flops`` over
    the matmul rate (both from ``measure_rates``)."""
    return max(bytes_moved / rates["bandwidth"], flops / (rates["gflops"] * 1e9))


def mlp_flops_per_voxel(widths) -> int:
    """Flops of an MLP's matmuls per voxel: 2 x in x out per layer."""
    return 2 * sum(a * b for a, b in itertools.pairwise(widths))


def segment_floor(rates: dict, n_vox: int, head_widths, in_bytes: int, out_bytes: int) -> float:
    """Counted floor of ``segment()`` (or ``segment_zarr``) of ``n_vox`` voxels: the larger of
    the head MLP's matmul flops over the mm rate, the image read and the outputs written once
    (``in_bytes`` and ``out_bytes`` per voxel) over the copy bandwidth, and, on CUDA, those
    bytes sent to and from the host over the pinned copy rates. The features' filters and the
    refinement's taps are not counted (no matmul): a lower bound, and a loose one."""
    floor = floor_seconds(
        rates, n_vox * (in_bytes + out_bytes), mlp_flops_per_voxel(head_widths) * n_vox
    )
    if "h2d" in rates:
        floor = max(floor, n_vox * in_bytes / rates["h2d"] + n_vox * out_bytes / rates["d2h"])
    return floor


def of_floor(floor: float, t: float | None) -> str:
    """``floor / t`` as a percentage: 100% is a run at the counted floor."""
    if t is None or not t > 0:
        return "-"
    pct = 100 * floor / t
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def rates_line(
    rates: dict, floor: str = "max(bytes / bandwidth, matmul flops / mm rate)"
) -> str:
    """One line for a results file: the ceilings this run measured and how ``floor`` uses them."""
    line = (
        f"Ceilings measured in this run: copy bandwidth {rates['bandwidth'] / 1e9:.0f} GB/s "
        f"(bytes read + written, {rates['copy_bytes'] / 2**20:.0f} MiB copy), float32 "
        f"`torch.mm` {rates['gflops']:.0f} GFLOP/s ({rates['mm_n']}^3"
        + (f", TF32 {'on' if rates['tf32'] else 'off'})" if "h2d" in rates else ")")
    )
    if "exps" in rates:
        line += f", float32 `torch.exp` {rates['exps'] / 1e9:.2f} G/s (in cache)"
    if "h2d" in rates:
        line += (
            f", pinned host->device {rates['h2d'] / 1e9:.1f} GB/s, device->host "
            f"{rates['d2h'] / 1e9:.1f} GB/s"
        )
    return line + f". Floor = {floor}."


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="print a device's ceilings as JSON")
    parser.add_argument("--worker", nargs=2, metavar=("rates", "DEVICE"), required=True)
    what, dev = parser.parse_args().worker
    if what != "rates":
        sys.exit(f"unknown worker {what!r}")
    print(json.dumps(measure_rates(dev)))
