"""GPU on paper: each op at 256^3 and the pipeline at 512^3 on H100 / H200, computed, not measured.

For every op: the bytes it must move and the work it must do, counted from its launch (the
kernels' padded widths, one launch per CRF iteration), and the floor time those imply on an
H100 SXM and an H200 from their data-sheet rates: HBM 3.35 / 4.8 TB/s; float32 FMA 67 TFLOP/s
and TF32 tensor cores 495 TFLOP/s (dense; both GPUs are the same GH100 chip); the special
function units that evaluate ``exp`` (16 per SM per clock, 132 SMs at 1.98 GHz). The floor of
a kernel is the largest of its bytes, flops and exps over their rates; the pipeline's is the
sum of its stages' floors (they run one after another), plus the image and results crossing
PCIe 5 (~55 GB/s pinned) where the volume starts on the host.

Occupancy comes from the kernels compiled ahead of time for sm_90a as launched on aligned
tensors (``triton_aot``): resident warps per SM allowed by registers per thread (65,536 per SM,
allocated per warp in units of 256), shared memory per block (228 KiB per SM, 1 KiB reserved per
block) and the limits of 64 warps and 32 blocks per SM. Writes ``benchmarks/results/gpu-on-paper.md``.

Usage: python benchmarks/gpu_on_paper.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import triton_aot

import common

GPUS = {"H100 SXM": 3.35e12, "H200": 4.8e12}  # HBM bytes/s
FP32_FLOPS = 67e12
TF32_FLOPS = 495e12
EXP_RATE = 16 * 132 * 1.98e9  # MUFU.EX2 per second
PCIE = 55e9
SM_REGISTERS, SM_SHARED, SM_WARPS, SM_BLOCKS = 65536, 233472, 64, 32

# The pipeline of the bundled demo model: 19 features (raw + 6 per sigma x 3), MLP 19-64-64-2,
# 5 CRF iterations with a 3 x 5 x 5 window (spacing 1 x 0.4 x 0.4 um) and a 1-channel guide.
FEATURES, HEAD, CLASSES, ITERATIONS = 19, (19, 64, 64, 2), 2, 5


@dataclass
class Kernel:
    name: str
    case: triton_aot.Case
    bytes: float
    flops: float
    tensor: bool = False  # flops on TF32 tensor cores (else float32 FMA)
    exps: float = 0.0
    launches: int = 1


def occupancy(registers: int, shared: int, warps: int) -> tuple[int, str]:
    """Resident warps per SM and what limits them."""
    per_warp = -(-registers * 32 // 256) * 256
    limits = {
        "registers": SM_REGISTERS // (per_warp * warps),
        "shared memory": SM_SHARED // (shared + 1024),
        "blocks": SM_BLOCKS,
        "warps": SM_WARPS // warps,
    }
    blocks = min(limits.values())
    return blocks * warps, min(limits, key=limits.get)


def floor_s(k: Kernel, bandwidth: float) -> tuple[float, str]:
    parts = {
        "memory": k.bytes / bandwidth,
        "tensor cores" if k.tensor else "FP32 FMA": k.flops
        / (TF32_FLOPS if k.tensor else FP32_FLOPS),
        "exp units": k.exps / EXP_RATE,
    }
    bound = max(parts, key=parts.get)
    return parts[bound], bound


def kernels() -> list[Kernel]:
    from pacseg_kernels import mlp_triton, pac_triton, unpool_triton

    def mlp_case(widths, precision):
        meta = mlp_triton.launch_meta(widths[0], list(widths[1:]), "relu", precision)
        name = "->".join(map(str, widths)) + f" {precision}"
        return triton_aot.Case(
            "voxel_mlp", mlp_triton._voxel_mlp_kernel, name, meta, {"x_ptr": "fp32"}
        )

    def mlp_flops(meta):
        padded = [meta[f"P{i}"] for i in range(meta["NUM_LAYERS"] + 1)]
        return common.mlp_flops_per_voxel(padded)

    n = 256**3
    out = []
    for precision in ("ieee", "tf32"):
        c = mlp_case(HEAD, precision)
        out.append(Kernel(f"voxel_mlp {c.name}", c, 4 * n * (HEAD[0] + HEAD[-1]),
                          n * mlp_flops(c.meta), precision == "tf32"))  # fmt: skip
    meta = pac_triton.launch_meta(16, 16, 3, False, False, False, False)
    c = triton_aot.Case("pac3d", pac_triton._pac_kernel, "16->16 k3 guide 3", meta, {})
    taps = 27
    out.append(Kernel("pac3d 16->16, 3^3, guide 3", c, 4 * n * (16 + 3 + 16),
                      n * (2 * 16 * 16 * taps + taps * 3 * 3), exps=n * taps))  # fmt: skip
    meta = pac_triton.launch_meta(2, 2, 1, True, True, False, True)
    c = triton_aot.Case("pac_crf3d", pac_triton._pac_kernel, "crf step K=2 F=1", meta, {})
    taps = 5**3 - 1
    out.append(Kernel(f"pac_crf3d K=2, 5^3, {ITERATIONS} iterations", c,
                      ITERATIONS * 4 * n * (3 * 2 + 1), ITERATIONS * n * taps * (2 * 2 + 4),
                      exps=ITERATIONS * n * (taps + 2), launches=ITERATIONS))  # fmt: skip
    kernel, name, meta, dtypes, _ = unpool_triton.aot_cases()[0]
    c = triton_aot.Case("max_unpool3d", kernel, name, meta, dtypes)
    out.append(Kernel("max_unpool3d 16 ch, 128^3 -> 256^3 (k 2)", c,
                      16 * (4 * n + 12 * n // 8), 0.0))  # fmt: skip
    return out


def pipeline_rows(bandwidth: float) -> list[tuple[str, float, str]]:
    """``(stage, floor s, bound)`` of segment() at 512^3 with the demo model."""
    n = 512**3
    taps = 3 * 5 * 5 - 1
    head_flops = n * common.mlp_flops_per_voxel([32, 64, 64, 16])  # padded widths
    stages = [
        ("features: image read (uint16), 19 channels written", n * (2 + 4 * FEATURES), 0, 0, False),
        ("head IEEE (19 channels read, 2 logits written)", 4 * n * (FEATURES + 2), head_flops, 0, False),
        ("head TF32", 4 * n * (FEATURES + 2), head_flops, 0, True),
        (f"refinement, {ITERATIONS} iterations of 3x5x5", ITERATIONS * 4 * n * 7,
         ITERATIONS * n * taps * 8, ITERATIONS * n * (taps + 2), False),
        ("outputs: labels (uint8) and matte (float32) written", 5 * n, 0, 0, False),
    ]  # fmt: skip
    rows = []
    for name, b, f, e, tensor in stages:
        k = Kernel(name, None, b, f, tensor, e)
        rows.append((name, *floor_s(k, bandwidth)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="results file (default: results/...)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    lines = [
        "# GPU on paper: computed, not measured",
        "",
        f"Command: `python benchmarks/gpu_on_paper.py` ({time.strftime('%Y-%m-%d %H:%M')}, "
        f"triton {triton.__version__}). " + " ".join(__doc__.split("\n\n")[1].split()),
        "",
        " ".join(__doc__.split("\n\n")[2].split()),
        "",
        "## Each op at 256^3 (float32)",
        "",
        "| op | launches | GB moved | GFLOP | G exp | floor H100 ms | floor H200 ms | bound by "
        "| registers | shared KiB | warps/block | resident warps/SM (limit) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in kernels():
        r = triton_aot.compile_case(k.case, 90, "all")  # 256^3 tensors: aligned
        if "error" in r:
            print(f"gpu_on_paper: {k.name} does not compile: {r['error']}", file=sys.stderr)
            return 1
        warps = k.case.meta.get("num_warps", 4)
        resident, limit = occupancy(r["registers"], r["shared"], warps)
        floors = [floor_s(k, bw) for bw in GPUS.values()]
        lines.append(
            f"| {k.name} | {k.launches} | {k.bytes / 1e9:.2f} | {k.flops / 1e9:.0f} | "
            f"{k.exps / 1e9:.1f} | {floors[0][0] * 1e3:.2f} | {floors[1][0] * 1e3:.2f} | "
            f"{floors[1][1]} | {r['registers']} | {r['shared'] / 1024:.0f} | {warps} | "
            f"{resident} of 64 ({limit}) |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "## The pipeline at 512^3 (demo model: 19 features, MLP 19-64-64-2, 5 iterations)",
        "",
        "Stages run one after another: the floor is the sum. Features are counted as their "
        "image read and channels written once (their separable filter passes are not counted).",
        "",
        "| stage | floor H100 ms | floor H200 ms | bound by |",
        "|---|---|---|---|",
    ]
    per_gpu = {g: pipeline_rows(bw) for g, bw in GPUS.items()}
    names = [r[0] for r in per_gpu["H100 SXM"]]
    for i, name in enumerate(names):
        a, b = per_gpu["H100 SXM"][i], per_gpu["H200"][i]
        lines.append(f"| {name} | {a[1] * 1e3:.2f} | {b[1] * 1e3:.2f} | {b[2]} |")
    pcie = 512**3 * (2 + 5) / PCIE
    for label, skip in (("IEEE head", "head TF32"), ("TF32 head", "head IEEE")):
        totals = [sum(r[1] for r in rows if not r[0].startswith(skip)) for rows in per_gpu.values()]
        lines.append(
            f"| **total, {label}** (+ {pcie * 1e3:.0f} ms over PCIe from host memory) | "
            f"**{totals[0] * 1e3:.1f}** | **{totals[1] * 1e3:.1f}** | |"
        )
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        common.write_result("gpu-on-paper.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
