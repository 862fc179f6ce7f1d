"""Compile every Triton kernel configuration ahead of time for sm_80 and sm_90a, no GPU needed.

The configurations come from the launchers' own selection code (``launch_meta`` and
``aot_cases`` in ``mlp_triton``, ``pac_triton`` and ``unpool_triton``), so what is compiled
here is what the launchers run. Each is compiled by ``triton.compile`` for a ``GPUTarget``;
registers and stack come from the cubin (``cuobjdump -res-usage``), spill stores and loads from
``ptxas -v`` on the PTX (the CUDA 13 ``ptxas`` in the triton wheel), shared memory from the
kernel's metadata; the PTX is searched for tensor-core instructions (``mma`` / ``wgmma``) where
``tl.dot`` is meant to use them. Writes ``benchmarks/results/triton-aot.md`` and exits 1 when any
configuration fails to compile, spills, needs more shared memory than the target has, or more
than 255 registers. Computed from the compiler, not measured on a device.

Usage: python benchmarks/triton_aot.py [--subset] [--targets 80 90] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common

# Shared memory a block may use (dynamic, opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
MAX_REGISTERS = 255
# "" no alignment known; "all": what Triton's launcher specialises on for aligned tensors.
ALIGNMENTS = {"": "no", "all": "16"}
FLOAT_ARGS = {"compat", "exp_floor", "exp_cut"}


@dataclass
class Case:
    op: str
    kernel: object
    name: str
    meta: dict
    dtypes: dict
    wants_mma: bool = False
    not_launched: dict | None = None  # {arch: why the launcher picks the torch path there}
    call: dict | None = None  # a public call that launches it (benchmarks/gpu_configs.py)


def cases(subset: bool = False) -> list[Case]:
    """Every configuration the launchers can choose (see their ``aot_cases``)."""
    from pacseg_kernels import mlp_triton, pac_triton, unpool_triton
    from pacseg_kernels.mlp import fused_hidden_limit

    out = []
    for name, meta, dtypes, call in mlp_triton.aot_cases():
        wants = meta["PRECISION"] == "tf32"  # IEEE float32 has no tensor-core path
        hidden = max(meta[f"P{i}"] for i in range(1, meta["NUM_LAYERS"] + 1))
        skip = {
            arch: f"not launched: layers over {fused_hidden_limit(meta['PRECISION'], arch)} "
            "units run on the torch path here"
            for arch in (80, 90)
            if hidden > fused_hidden_limit(meta["PRECISION"], arch)
        }
        out.append(
            Case("voxel_mlp", mlp_triton._voxel_mlp_kernel, name, meta, dtypes, wants, skip, call)
        )
    for name, meta, dtypes, call in pac_triton.aot_cases():
        out.append(Case("pac3d / pac_crf3d", pac_triton._pac_kernel, name, meta, dtypes, call=call))
    for kernel, name, meta, dtypes, call in unpool_triton.aot_cases():
        out.append(Case("max_unpool3d", kernel, name, meta, dtypes, call=call))
    if subset:  # each kernel and mode once
        keep = {"C16->64->64->4 relu ieee x fp32", "C16->64->64->4 relu tf32 x fp32",
                "crf step K=2 F=1", "conv C=16->16 F=3", "conv C=4->4 F=3",
                "depthwise normalised C=4 F=3", "gather fp32", "winner (overlapping windows)",
                "winner gather fp32"}  # fmt: skip
        out = [c for c in out if c.name in keep]
    return out


def signature(kernel, meta: dict, dtypes: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in meta:
            sig[name] = "constexpr"
        elif name.endswith("_ptr") or re.fullmatch(r"[wb]\d", name):
            sig[name] = "*" + dtypes.get(name, "fp32")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def alignment_attrs(kernel, signature: dict, ints: bool) -> dict:
    """What Triton's launcher specialises on for aligned tensors: 16-byte-aligned pointers (every
    fresh torch allocation) and, with ``ints``, integers divisible by 16 (sizes and strides of
    volumes whose edges are multiples of 16)."""
    kinds = ("*",) + (("i32",) if ints else ())
    return {
        (kernel.arg_names.index(n),): [["tt.divisibility", 16]]
        for n, v in signature.items()
        if v.startswith(kinds)
    }


def compile_case(case: Case, arch: int, align: str = "") -> dict:
    """Compile ``case`` for ``sm_<arch>`` (``align``: "" none, "pointers", or "all": pointers
    and integers divisible by 16, see ``alignment_attrs``) and read its resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(case.kernel, JITFunction):
        raise RuntimeError(
            "triton_aot: the kernels were imported under TRITON_INTERPRET=1 (interpreted); "
            "run it in a process without TRITON_INTERPRET"
        )
    constexprs = {k: v for k, v in case.meta.items() if k != "num_warps"}
    sig = signature(case.kernel, constexprs, case.dtypes)
    attrs = alignment_attrs(case.kernel, sig, align == "all") if align else None
    src = ASTSource(fn=case.kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            k = triton.compile(
                src, target=GPUTarget("cuda", arch, 32),
                options={"num_warps": case.meta.get("num_warps", 4)},
            )  # fmt: skip
    except Exception as err:  # a configuration that does not compile is a result
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:160]}"}
    seconds = time.perf_counter() - start
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx_file = Path(tmp) / "k.cubin", Path(tmp) / "k.ptx"
        cubin.write_bytes(k.asm["cubin"])
        ptx_file.write_text(ptx)
        usage = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True
        ).stdout
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        ptxas = subprocess.run(
            [_tool("ptxas-blackwell"), "-v", "--gpu-name", gpu, str(ptx_file), "-o",
             str(Path(tmp) / "v.cubin")], capture_output=True, text=True,
        )  # fmt: skip
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas.stderr)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "stack": int(regs.group(2)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "shared": int(k.metadata.shared),
        "mma": "wgmma" if "wgmma" in ptx else "mma" if re.search(r"\bmma\.", ptx) else "",
        "seconds": seconds,
    }


def problems(case: Case, arch: int, r: dict) -> list[str]:
    if "error" in r:
        return [r["error"]]
    found = []
    if r["spill_stores"] is None:
        found.append("ptxas -v gave no spill report")
    elif r["spill_stores"] or r["spill_loads"]:
        found.append(f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
    if r["registers"] is None or r["registers"] > MAX_REGISTERS:
        found.append(f"registers {r['registers']}")
    if r["shared"] > SHARED_LIMIT[arch]:
        found.append(f"shared {r['shared']} B > {SHARED_LIMIT[arch]} B")
    if case.wants_mma and not r["mma"]:
        found.append("tl.dot did not use tensor cores")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", action="store_true", help="each kernel and mode once")
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--out", default=None, help="results file (default: results/...)")
    args = parser.parse_args(argv)
    # The real compiler, not the interpreter (which the kernels' modules pick at import).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        import triton
    except ImportError:
        print("triton_aot: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    rows, failed, skipped = [], 0, 0
    for case in cases(args.subset):
        for arch in args.targets:
            for align in ALIGNMENTS:
                if case.not_launched and arch in case.not_launched:
                    skipped += 1
                    rows.append((case, arch, align, {"skipped": case.not_launched[arch]}, []))
                    continue
                r = compile_case(case, arch, align)
                bad = problems(case, arch, r)
                failed += bool(bad)
                rows.append((case, arch, align, r, bad))
                print(f"sm_{arch} {align or '-':3s} {case.op:18s} {case.name:45s} {r} "
                      f"{bad or 'ok'}", flush=True)  # fmt: skip
    lines = [
        "# Triton kernels compiled ahead of time (no GPU)",
        "",
        f"Command: `python benchmarks/triton_aot.py{' --subset' if args.subset else ''}` "
        f"({time.strftime('%Y-%m-%d %H:%M')}), triton {triton.__version__}  ",
        "Computed by the compiler, not measured: registers and stack from the cubin "
        "(`cuobjdump -res-usage`), spills from `ptxas -v` (CUDA 13 ptxas in the triton wheel), "
        "shared memory from the kernel's metadata (limit: sm_80 163 KiB, sm_90 227 KiB), "
        "`mma` / `wgmma` found in the PTX. Unchecked cells: IEEE float32 `tl.dot` has no "
        "tensor-core path (FMA by design). Each configuration is compiled twice: with no "
        "alignment known, and as the launcher specialises it for aligned tensors (pointers "
        "16-byte aligned, integer sizes and strides divisible by 16).",
        "",
        f"{len(rows) - skipped - failed} of {len(rows) - skipped} configurations pass"
        + (f"; {skipped} the launcher never runs on that target (listed)." if skipped else "."),
        "",
        "| op | config | target | aligned | registers | stack B | spills (st/ld B) | shared B "
        "| tensor cores | compile s | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, arch, align, r, bad in rows:
        tgt = "sm_90a" if arch == 90 else f"sm_{arch}"
        head = f"| {case.op} | {case.name} | {tgt} | {ALIGNMENTS[align]} |"
        if "skipped" in r:
            lines.append(f"{head} - | - | - | - | - | - | {r['skipped']} |")
            continue
        if "error" in r:
            lines.append(f"{head} - | - | - | - | - | - | {bad[0]} |")
            continue
        lines.append(
            f"{head} {r['registers']} | {r['stack']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r['mma'] or '-'} | "
            f"{r['seconds']:.1f} | {'; '.join(bad) or 'ok'} |"
        )
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    else:
        common.write_result("triton-aot.md", "\n".join(lines) + "\n")
    print(f"{failed} of {len(rows) - skipped} configurations failed ({skipped} not launched)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
