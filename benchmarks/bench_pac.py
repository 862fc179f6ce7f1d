"""Benchmark of ``pac3d`` and ``pac_crf3d`` against what people use instead.

* ``pac3d`` (weight given, 'same' padding, guide of 3 channels) vs an unfold (im2col) PAC
  written here the way the public 2D reference code works, and vs ``conv3d`` on the same shape
  (the price of adaptivity). Unfold runs are skipped, with the memory they would need, where
  their im2col tensors exceed what this machine can allocate.
* ``pac_crf3d`` (5 iterations, 2 classes, kernel 5, bilateral guide) vs pydensecrf2's dense CRF
  (permutohedral lattice) at 60x256x256, 128^3 and 256^3, when pydensecrf2 is installed
  (``pip install 'napari-pacseg[bench]'``), beside its plain-torch path (``backend="torch"``),
  and one mean-field step at the pac3d sizes.
Each measurement runs in a fresh interpreter (time and peak memory). Every time is also given as
a fraction of its counted floor, max(bytes / bandwidth, flops / mm rate) with the ceilings of
``common.measure_rates``: for ``pac3d`` and ``conv3d`` the input, guide (pac3d only), weight and
output moved once and the 2 C_in C_out k^3 flops per voxel of the weighted sum; for the CRF
(``crf_floor``) the weights' exps once over the exp rate, or the bytes a mean field that keeps
its weights streams (the weights written once and read once per iteration, the probabilities
and logits of each iteration), whichever is more. Writes ``benchmarks/results/pac-<device>.md``.

Usage: python benchmarks/bench_pac.py [--device cpu|cuda] [--sizes 256 512] [--channels 2 4 8 16]
       [--kernels 3 5 7] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common
from pacseg_kernels import pac3d, pac_crf3d

UNFOLD_LIMIT_BYTES = 12 * 2**30  # half of this machine's 24 GiB: beyond, unfold would swap or die
GUIDE = 3  # guide channels of the pac3d rows


def pac_floor(rates, n_vox: int, c: int, k: int, guide: int = GUIDE) -> float:
    """Counted floor of ``pac3d`` (``guide=0``: ``conv3d``) with C_in = C_out = c, 'same'."""
    moved = 4 * (n_vox * (c + guide + c) + c * c * k**3 + c)
    return common.floor_seconds(rates, moved, 2 * c * c * k**3 * n_vox)


def crf_floor(rates, n_vox: int, classes: int, k: int, iterations: int) -> float:
    """Counted floor of ``pac_crf3d``'s mean field with kept weights (guide of 1 channel, the
    k^3 - 1 taps of the window without its centre): the larger of the weights' exps (once) over
    the exp rate and, over the copy bandwidth, the bytes streamed: the weights written once and
    read once per iteration; per iteration the K - 1 kept probabilities read and written and the
    K logits written; the unary and the guide read once."""
    taps = k**3 - 1
    per_voxel = taps * (1 + iterations) + iterations * (2 * (classes - 1) + classes) + classes + 1
    return max(4 * n_vox * per_voxel / rates["bandwidth"], n_vox * taps / rates["exps"])


def unfold_pac(x, guide, weight, padding):
    """PAC through im2col, as the public 2D code does it (stride 1, 'same' padding)."""
    k = weight.shape[2:]

    def cols(t):
        t = F.pad(t, (padding,) * 6)
        for axis, size in enumerate(k):
            t = t.unfold(2 + axis, size, 1)
        return t.flatten(-3)  # (N, C, D, H, W, T)

    g = cols(guide)
    centre = g.shape[-1] // 2
    kern = torch.exp(-0.5 * (g - g[..., centre : centre + 1]).square().sum(1))  # (N, D, H, W, T)
    return torch.einsum("oct,ncdhwt->nodhw", weight.flatten(2), cols(x) * kern[:, None])


def unfold_bytes(n_vox, c, f, k) -> int:
    """im2col bytes of the unfold PAC: input and guide columns, their difference, the product."""
    return 4 * n_vox * k**3 * (2 * c + 2 * f + 1)


def _timed(fn, device) -> tuple[float, int]:
    peak_fn = common.cuda_peak_extra_bytes if device == "cuda" else common.cpu_peak_extra_bytes
    start = time.perf_counter()
    peak = peak_fn(fn)
    first = time.perf_counter() - start
    t = (
        first
        if first > 2.0 and device == "cpu"
        else common.best_time(fn, device, repeats=3, warmup=0)
    )
    return t, peak


def worker(kind: str, method: str, shape: tuple[int, ...], c: int, k: int, device: str) -> dict:
    torch.set_grad_enabled(False)
    gen = torch.Generator(device=device).manual_seed(0)  # on the device: fast at 512^3
    if kind == "pac":
        x = torch.randn(1, c, *shape, device=device, generator=gen)
        guide = torch.randn(1, GUIDE, *shape, device=device, generator=gen)
        weight = torch.randn(c, c, k, k, k, device=device, generator=gen) / (c * k**3) ** 0.5
        fns = {
            "ours": lambda: pac3d(x, guide, weight, padding=k // 2),
            "unfold": lambda: unfold_pac(x, guide, weight, k // 2),
            "conv3d": lambda: F.conv3d(x, weight, padding=k // 2),
        }
        t, peak = _timed(fns[method], device)
        return {"time": t, "peak_extra": peak}
    # CRF: a bright-blobs volume, unary from a noisy foreground probability.
    d, h, w = shape
    # sparse: the same values, without three dense float64 grids (seconds at 512^3)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij", sparse=True)
    image = (np.sin(6 * xx) * np.sin(5 * yy) * np.cos(3 * zz) > 0.2).astype(np.float32)
    image += 0.3 * np.random.default_rng(0).standard_normal(image.shape).astype(np.float32)
    prob = np.clip(0.5 + 0.35 * (image - 0.5), 0.01, 0.99).astype(np.float32)
    probs = np.stack([1 - prob, prob])  # (2, D, H, W)
    if method == "densecrf":
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import create_pairwise_bilateral, unary_from_softmax

        def run():
            crf = dcrf.DenseCRF(d * h * w, 2)
            crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
            feats = create_pairwise_bilateral(
                sdims=(2.0, 2.0, 2.0), schan=(0.25,), img=image[..., None], chdim=3
            )
            crf.addPairwiseEnergy(feats, compat=3)
            return np.array(crf.inference(k))

        t, peak = _timed(run, "cpu")
        return {"time": t, "peak_extra": peak}
    unary = torch.from_numpy(np.log(probs))[None].to(device)
    guide = torch.from_numpy(image / 0.25)[None, None].to(device)

    backend = "torch" if method == "ours-torch" else "auto"
    # Once per process: numba's import and compiled loops (~160 MiB), not counted in the peak.
    tiny = torch.zeros(1, 2, 4, 5, 6, device=device)
    pac_crf3d(tiny, tiny[:, :1], iterations=2, kernel_size=3, backend=backend)

    def run():
        return pac_crf3d(
            unary, guide, iterations=k, kernel_size=5, compat=3.0, spatial_sigma=2.0,
            backend=backend,
        )  # fmt: skip

    t, peak = _timed(run, device)
    return {"time": t, "peak_extra": peak}


def measure(kind, method, shape, c, k, device) -> dict:
    args = [kind, method, "x".join(map(str, shape)), str(c), str(k), device]
    try:
        return common.run_isolated(__file__, args)
    except RuntimeError as err:  # an allocation failure in the worker is a result, not a crash
        return {"error": str(err).strip().splitlines()[-1][:120]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None,
        help="edges of the pac3d volumes (default 64 128 on CPU, 256 512 on CUDA)",
    )  # fmt: skip
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="default 2 4 8 16")
    parser.add_argument("--kernels", type=int, nargs="+", default=None, help="default 3 5 7")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--crf-only", action="store_true",
        help="only the pac_crf3d tables (written to crf-<device>.md instead of pac-<device>.md)",
    )  # fmt: skip
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, method, shape, c, k, device = args.worker
        res = worker(kind, method, tuple(int(s) for s in shape.split("x")), int(c), int(k), device)
        print(json.dumps(res))
        return

    dev = args.device
    sizes = args.sizes or ([16] if args.quick else ([64, 128] if dev == "cpu" else [256, 512]))
    channels = args.channels or ([2, 4] if args.quick else [2, 4, 8, 16])
    kernels = args.kernels or ([3, 5] if args.quick else [3, 5, 7])
    crf_shape = (12, 48, 48) if args.quick else (60, 256, 256)
    rates = common.machine_rates(dev)
    # im2col beyond half the memory would swap or die: this machine's 24 GiB, or the GPU's own
    unfold_limit = rates["memory"] // 2 if "memory" in rates else UNFOLD_LIMIT_BYTES
    command = "python benchmarks/bench_pac.py " + " ".join(sys.argv[1:])
    lines = [
        f"# {'pac_crf3d' if args.crf_only else 'pac3d / pac_crf3d'} benchmark, "
        f"{common.device_name(dev)}",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M')})  ",
        f"Machine: {common.describe_machine(dev)}  ",
        (
            "float32, batch 1, 'same' padding. Memory ratio: (unary + guide + peak extra) / "
            "(unary + guide + output bytes).  "
            if args.crf_only
            else "float32, batch 1, guide 3 channels, C_in = C_out = C, 'same' padding, stride 1. "
            "Memory ratio: (input + guide + peak extra) / (input + guide + output bytes).  "
        ),
        common.rates_line(
            rates,
            *(["max(bytes streamed / bandwidth, exps / exp rate) (`crf_floor`)"] * args.crf_only),
        ),
    ]
    if not args.crf_only:
        lines += [
            "",
            "| size | C | k | ours (s) | unfold (s) | conv3d (s) | ours vs unfold "
            "| ours / conv3d | ours peak extra MiB | ours memory ratio | unfold peak extra MiB "
            "| floor (ms) | ours % of floor | conv3d % of its floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]

    def fmt(r, key="time"):
        return f"{r[key]:.4g}" if key in r else r.get("skipped", "failed: " + r.get("error", "?"))

    failed = 0
    for size in [] if args.crf_only else sizes:
        n_vox = size**3
        for c in channels:
            for k in kernels:
                shape = (size,) * 3
                ours = measure("pac", "ours", shape, c, k, dev)
                conv = measure("pac", "conv3d", shape, c, k, dev)
                need = unfold_bytes(n_vox, c, 3, k)
                if need > unfold_limit:
                    unf = {"skipped": f"needs ~{need / 2**30:.0f} GiB"}
                else:
                    unf = measure("pac", "unfold", shape, c, k, dev)
                io_bytes = 4 * n_vox * (c + 3 + c)
                ratio = (
                    (4 * n_vox * (c + 3) + ours["peak_extra"]) / io_bytes
                    if "peak_extra" in ours
                    else float("nan")
                )
                speed = (
                    f"{unf['time'] / ours['time']:.3g}x"
                    if "time" in unf and "time" in ours
                    else "-"
                )
                vs_conv = (
                    f"{ours['time'] / conv['time']:.3g}"
                    if "time" in conv and "time" in ours
                    else "-"
                )
                unf_mem = common.mib(unf["peak_extra"]) if "peak_extra" in unf else "-"
                floor = pac_floor(rates, n_vox, c, k)
                conv_floor = pac_floor(rates, n_vox, c, k, guide=0)
                lines.append(
                    f"| {size}^3 | {c} | {k} | {fmt(ours)} | {fmt(unf)} | {fmt(conv)} | {speed} | {vs_conv} "
                    f"| {common.mib(ours.get('peak_extra', float('nan')))} | {ratio:.2f} | {unf_mem} "
                    f"| {floor * 1e3:.3g} | {common.of_floor(floor, ours.get('time'))} "
                    f"| {common.of_floor(conv_floor, conv.get('time'))} |"
                )
                failed += "time" not in ours
                print(lines[-1], flush=True)

    lines += [
        "",
        "One mean-field step (`pac_crf3d`, iterations=1, kernel 5, 2 classes), floor `crf_floor`:",
        "",
    ]
    lines += ["| shape | time (s) | peak extra MiB | floor (ms) | % of floor |", "|---|---|---|---|---|"]  # fmt: skip
    for size in sizes:
        r = measure("crf", "ours", (size,) * 3, 2, 1, dev)
        floor = crf_floor(rates, size**3, 2, 5, 1)
        lines.append(
            f"| {size}^3 | {fmt(r)} | {common.mib(r.get('peak_extra', float('nan')))} "
            f"| {floor * 1e3:.3g} | {common.of_floor(floor, r.get('time'))} |"
        )
        failed += "time" not in r

    crf_shapes = [crf_shape] if args.quick else [crf_shape, (128,) * 3, (256,) * 3]
    lines += [
        "",
        "CRF refinement, 5 iterations, 2 classes: ours (`pac_crf3d`, kernel 5, spatial sigma 2, "
        "bilateral guide; on the CPU its default numba loops, and its plain-torch path "
        "`backend=\"torch\"`) vs pydensecrf2 (dense CRF, permutohedral lattice, spatial sigma 2, "
        "intensity sigma 0.25, one thread). Memory ratio as above with unary (2 ch) + guide "
        "(1 ch), measured after a warm-up call on a tiny volume (numba's import and loaded loops "
        "take ~160 MiB once per process). Floor: `crf_floor` (the kept weights' exps, or the bytes streamed, whichever is "
        "more); the weights of a few slabs can stay in the last-level cache, so a time under the "
        "floor is possible.",
        "",
        "| shape | method | time (s) | peak extra MiB | memory ratio | pydensecrf2 / this "
        "| floor (ms) | % of floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d, h, w in crf_shapes:
        shape = (d, h, w)
        io_bytes = 4 * d * h * w * (2 + 1 + 2)
        floor = crf_floor(rates, d * h * w, 2, 5, 5)
        rows = [
            ("pac_crf3d (ours)", measure("crf", "ours", shape, 2, 5, dev)),
            ("pac_crf3d, plain torch", measure("crf", "ours-torch", shape, 2, 5, dev)),
        ]
        failed += "time" not in rows[0][1]
        if dev == "cpu" and importlib.util.find_spec("pydensecrf") is not None:
            rows.append(("pydensecrf2", measure("crf", "densecrf", shape, 2, 5, "cpu")))
        elif dev == "cpu":
            rows.append(
                ("pydensecrf2", {"skipped": "not installed (pip install 'napari-pacseg[bench]')"})
            )
        dense = rows[-1][1] if rows[-1][0] == "pydensecrf2" else {}
        for name, r in rows:
            ratio = (
                (4 * d * h * w * 3 + r["peak_extra"]) / io_bytes
                if "peak_extra" in r
                else float("nan")
            )
            faster = f"{dense['time'] / r['time']:.3g}x" if "time" in r and "time" in dense else "-"
            lines.append(
                f"| {d}x{h}x{w} | {name} | {fmt(r)} | "
                f"{common.mib(r.get('peak_extra', float('nan')))} | {ratio:.2f} | {faster} "
                f"| {floor * 1e3:.3g} | {common.of_floor(floor, r.get('time'))} |"
            )
            print(lines[-1], flush=True)

    stem = "crf" if args.crf_only else "pac"
    name = f"{stem}-{common.device_name(dev)}{'-quick' if args.quick else ''}.md"
    path = common.write_result(name, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {path}")
    if failed:
        sys.exit(f"{failed} measurement(s) of ours failed (see the table)")


if __name__ == "__main__":
    main()
