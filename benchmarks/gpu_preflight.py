"""GPU check, first step: a CUDA device, Triton importable, the kernels compiled (not interpreted).

Prints the device, torch, CUDA and Triton versions and where the packages were imported from;
checks that ``TRITON_INTERPRET`` is unset (or 0), that the kernel objects are Triton's compiled
``JITFunction`` and not its interpreter's ``InterpretedFunction``, and runs each op once on small
CUDA tensors through ``backend="triton"`` against ``backend="torch"`` on the CPU (relative L2
error; the kernel tests do this thoroughly). Writes the facts as JSON to ``--json`` for the
summary (``gpu_summary.py``). Exit status 0 when all holds, 1 otherwise, 2 without CUDA.

Usage: python benchmarks/gpu_preflight.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

TOLERANCE = 1e-4  # IEEE float32 dots on both sides (TF32 off): far under this


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def smoke(device: str = "cuda") -> dict[str, float]:
    """Relative L2 error of each op's Triton kernel on ``device`` against its torch path on the
    CPU (``device="cpu"`` only under ``TRITON_INTERPRET=1``, to try this function without a GPU).
    Small shapes: this shows the compiled kernels run; the kernel tests check them."""
    from pacseg_kernels import max_pool3d_with_indices, max_unpool3d, pac3d, pac_crf3d, voxel_mlp

    gen = torch.Generator().manual_seed(17)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    def both(fn, *tensors):
        cpu = fn(*tensors, backend="torch")
        out = fn(*(t.to(device) for t in tensors), backend="triton")
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.device.type == device, f"the Triton result is on {out.device}, not {device}"
        return _rel(out, cpu)

    ws, bs = [r(64, 16) / 4, r(64, 64) / 8, r(4, 64) / 8], [r(64) / 10, r(64) / 10, r(4) / 10]

    def mlp(x, *p, backend):
        return voxel_mlp(x, list(p[:3]), list(p[3:]), backend=backend)

    def pac(x, g, w, backend):
        return pac3d(x, g, w, padding=1, backend=backend)

    def crf(u, g, backend):
        return pac_crf3d(u, g, iterations=2, kernel_size=3, spatial_sigma=2.0, backend=backend)

    def unpool(v, i, backend):
        return max_unpool3d(v, i, 2, backend=backend)

    vals, idx = max_pool3d_with_indices(r(2, 3, 6, 8, 10), 2)
    return {
        "voxel_mlp": both(mlp, r(2, 16, 5, 6, 7), *ws, *bs),
        "pac3d": both(pac, r(1, 16, 4, 5, 6), r(1, 3, 4, 5, 6), r(16, 16, 3, 3, 3) / 20),
        "pac_crf3d": both(crf, r(1, 2, 5, 6, 7), r(1, 1, 5, 6, 7)),
        "max_unpool3d": both(unpool, vals, idx),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the facts here")
    args = parser.parse_args()
    info: dict = {"python": sys.version.split()[0], "torch": torch.__version__}
    info["torch_cuda"] = torch.version.cuda
    problems: list[str] = []
    if not torch.cuda.is_available():
        print("gpu_preflight: no CUDA device (torch.cuda.is_available() is False)")
        return 2
    props = torch.cuda.get_device_properties(0)
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = f"{props.major}.{props.minor}"
    info["memory_gib"] = round(props.total_memory / 2**30, 1)
    info["multiprocessors"] = props.multi_processor_count
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    if info["TRITON_INTERPRET"] not in ("", "0"):
        problems.append(
            f"TRITON_INTERPRET={info['TRITON_INTERPRET']}: the kernels would be interpreted"
        )
    info["tf32"] = torch.backends.cuda.matmul.allow_tf32
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as err:
        problems.append(f"triton does not import ({err}); pip install -e '.[triton]'")
    import napari_pacseg
    import pacseg_kernels

    info["napari_pacseg_from"] = str(Path(napari_pacseg.__file__).parent)
    info["pacseg_kernels_from"] = str(Path(pacseg_kernels.__file__).parent)
    if "triton" in info:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        from pacseg_kernels import mlp_triton, pac_triton, unpool_triton

        kinds = {}
        for mod, name in (
            (mlp_triton, "_voxel_mlp_kernel"),
            (pac_triton, "_pac_kernel"),
            (unpool_triton, "_unpool_gather_kernel"),
        ):
            kernel = getattr(mod, name)
            kinds[name] = type(kernel).__name__
            if isinstance(kernel, InterpretedFunction) or not isinstance(kernel, JITFunction):
                problems.append(f"{mod.__name__}.{name} is a {type(kernel).__name__}, not compiled")
        info["kernel_types"] = kinds
        try:
            info["smoke_rel_errors"] = errors = smoke()
            for op, err in errors.items():
                if not err <= TOLERANCE:
                    problems.append(f"{op}: Triton on CUDA vs torch on CPU, rel. error {err:.3g}")
        except Exception:
            problems.append("the smoke run failed:\n" + traceback.format_exc(limit=4))
    info["problems"] = problems
    for key, value in info.items():
        if key != "problems":
            print(f"{key}: {value}")
    for p in problems:
        print(f"PROBLEM: {p}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    print("preflight: " + ("FAIL" if problems else "ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
