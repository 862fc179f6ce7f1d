"""Run, check and time on a GPU exactly the Triton configurations compiled ahead of time.

The configurations are ``triton_aot.cases()``: the launchers' own ``aot_cases``, each with a
public call that launches it. For every distinct call this script builds random inputs at
``--size``^3, runs the op with ``backend="triton"`` while recording each kernel launch (kernel
and launch constants), and checks

- that the launches are exactly the compiled configurations of that call (a launch the AOT
  enumeration did not compile, or a compiled one never launched, is a failure: the two drifted);
- the result against the op's torch path in float64 on the same device (relative L2 error;
  TF32 calls against a looser bound);

then times the Triton call against the torch path on the same device (best of ``--repeats``).
Writes ``benchmarks/results/configs-<device>.md`` and exits 1 when a check fails. On a CPU it
runs only under ``TRITON_INTERPRET=1`` (the interpreter, to test this script on small sizes).

Usage: python benchmarks/gpu_configs.py [--device cuda] [--size 128] [--repeats 3] [--subset]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import triton_aot

import common

TOLERANCE = {"ieee": 1e-4, "tf32": 2e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Recorder:
    """Stands in for a ``JITFunction``: records ``(kernel, launch constants)`` of each launch."""

    def __init__(self, kernel, log: list):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append((self.kernel, kwargs))
            return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def recording(log: list):
    """Record every launch of the Triton entry kernels while the block runs."""
    from pacseg_kernels import mlp_triton, pac_triton, unpool_triton

    names = [(mlp_triton, "_voxel_mlp_kernel"), (pac_triton, "_pac_kernel")]
    names += [(unpool_triton, n) for n in
              ("_unpool_gather_kernel", "_winner_kernel", "_winner_gather_kernel")]  # fmt: skip
    saved = [(mod, n, getattr(mod, n)) for mod, n in names]
    try:
        for mod, n, kernel in saved:
            setattr(mod, n, _Recorder(kernel, log))
        yield log
    finally:
        for mod, n, kernel in saved:
            setattr(mod, n, kernel)


def _key(call: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in call.items()))


def build(call: dict, size: int, device: str, seed: int = 0):
    """``(fn(backend), precision)`` of one ``call`` from an ``aot_cases`` entry on ``size``^3
    random inputs; ``fn("torch64")`` is the float64 reference on the same device."""
    from pacseg_kernels import max_pool3d_with_indices, max_unpool3d, pac3d, pac_crf3d, voxel_mlp

    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[call["x"]]

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    s = (size,) * 3
    op = call["op"]
    if op == "voxel_mlp":
        widths = [call["channels"], *call["outs"]]
        ws = [r(o, i, scale=i**-0.5) for i, o in itertools.pairwise(widths)]
        bs = [r(o, scale=0.1) for o in widths[1:]]
        x = r(1, call["channels"], *s).to(dtype)

        def fn(backend):
            if backend == "torch64":
                return voxel_mlp(x.double(), [w.double() for w in ws], [b.double() for b in bs],
                                 call["activation"], backend="torch")  # fmt: skip
            return voxel_mlp(x, ws, bs, call["activation"], backend=backend)

        return fn, call["precision"]
    if op == "pac3d":
        x, g = r(1, call["cin"], *s).to(dtype), r(1, call["guide"], *s).to(dtype)
        w = (
            r(call["cout"], call["cin"] // call["groups"], 3, 3, 3, scale=0.1)
            if call["weight"]
            else None
        )
        b = r(call["cout"], scale=0.1) if call["bias"] else None
        kw = dict(padding=1, groups=call["groups"], normalize=call["normalize"])
        kw |= {} if call["weight"] else {"kernel_size": 3}

        def fn(backend):
            if backend == "torch64":
                return pac3d(x.double(), g.double(), None if w is None else w.double(),
                             None if b is None else b.double(), backend="torch", **kw)  # fmt: skip
            return pac3d(x, g, w, b, backend=backend, **kw)

        return fn, "ieee"
    if op == "pac_crf3d":
        u, g = r(1, call["cin"], *s, scale=2.0), r(1, call["guide"], *s)
        kw = dict(iterations=2, kernel_size=5, compat=3.0, spatial_sigma=2.0)

        def fn(backend):
            if backend == "torch64":
                return pac_crf3d(u.double(), g.double(), backend="torch", **kw)
            return pac_crf3d(u, g, backend=backend, **kw)

        return fn, "ieee"
    if op == "max_unpool3d":
        k, st = call["kernel"], call["stride"]
        vals, idx = max_pool3d_with_indices(r(1, 4, *s), k, st)
        vals = vals.to(dtype)

        def fn(backend):
            if backend == "torch64":
                return max_unpool3d(vals.double(), idx, k, st, output_size=s, backend="torch")
            return max_unpool3d(vals, idx, k, st, output_size=s, backend=backend)

        return fn, "ieee"
    raise ValueError(f"gpu_configs: unknown op {op!r} in an aot_cases call")


def _rel(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _tf32(on: bool):
    @contextlib.contextmanager
    def switch():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = on
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    return switch()


def _arch(device: str) -> int:
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90  # the interpreter: every configuration the launchers have


def run(device: str, size: int, repeats: int, subset: bool = False) -> list[dict]:
    """One row per distinct call: what it launched, its error and times."""
    arch = _arch(device)
    groups: dict[tuple, list] = {}
    for case in triton_aot.cases(subset):
        groups.setdefault(_key(case.call), []).append(case)
    rows = []
    for cases in groups.values():
        call = cases[0].call
        launched_here = [c for c in cases if arch not in (c.not_launched or {})]
        fn, precision = build(call, size, device)
        names = [c.name for c in cases]
        if not launched_here:
            names[-1] += f" (torch path on sm_{arch})"
        row = {"call": call, "names": names, "problems": []}
        with _tf32(precision == "tf32"):
            log: list = []
            try:
                with recording(log):
                    out = fn("triton")
                row["error"] = _rel(out, fn("torch64"))
            except Exception as err:  # a call that fails is a result
                row["problems"].append(f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
                rows.append(row)
                continue
            if not row["error"] <= TOLERANCE[precision]:
                row["problems"].append(f"rel. error {row['error']:.3g} > {TOLERANCE[precision]}")
            row["problems"] += _drift(cases, launched_here, log)
            row["launches"] = len(log)
            if repeats:
                row["triton_s"] = common.best_time(functools.partial(fn, "triton"), device, repeats)
                row["torch_s"] = common.best_time(functools.partial(fn, "torch"), device, repeats)
        rows.append(row)
    return rows


def _drift(cases, launched_here, log) -> list[str]:
    """Launches not compiled ahead of time, and compiled configurations never launched."""
    problems = []

    def matches(kernel, kwargs, case) -> bool:
        return case.kernel is kernel and all(
            kwargs.get(k, 4 if k == "num_warps" else None) == v for k, v in case.meta.items()
        )

    for kernel, kwargs in log:
        if not any(matches(kernel, kwargs, c) for c in cases):
            shown = {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}
            problems.append(f"launched {kernel.fn.__name__} {shown}: not compiled ahead of time")
    for c in launched_here:
        if not any(matches(kernel, kwargs, c) for kernel, kwargs in log):
            problems.append(f"{c.name}: compiled ahead of time but never launched")
    if not launched_here and log:
        problems.append("launched Triton where the launcher should take the torch path")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=128, help="volume edge (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (0: check only)")
    parser.add_argument("--subset", action="store_true", help="triton_aot's CI subset only")
    parser.add_argument("--out", default=None, help="results file (default: results/...)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_configs: no CUDA device; run it on a GPU (or --device cpu under TRITON_INTERPRET=1)"
        )
        return 2
    rows = run(args.device, args.size, args.repeats, args.subset)
    failed = sum(bool(r["problems"]) for r in rows)
    name = common.device_name(args.device)
    lines = [
        f"# The AOT-compiled Triton configurations run on {name}",
        "",
        f"Command: `python benchmarks/gpu_configs.py --device {args.device} --size {args.size} "
        f"--repeats {args.repeats}{' --subset' if args.subset else ''}`. Each call launches the "
        "configurations named (benchmarks/results/triton-aot.md); error: relative L2 against "
        "the torch path in float64 on the same device; times: best of the repeats, Triton and "
        f"the op's torch path on the same device, {args.size}^3 voxels.",
        "",
        f"{len(rows) - failed} of {len(rows)} calls pass.",
        "",
        "| configurations | launches | rel. error | Triton ms | torch ms | torch / Triton | problems |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, ref = r.get("triton_s"), r.get("torch_s")
        times = f"{t * 1e3:.3g} | {ref * 1e3:.3g} | {ref / t:.2f}x" if t and ref else "- | - | -"
        err = f"{r['error']:.2g}" if "error" in r else "-"
        lines.append(
            f"| {'; '.join(r['names'])} | {r.get('launches', '-')} | {err} | {times} | "
            f"{'; '.join(r['problems']) or 'ok'} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        common.write_result(f"configs-{name}.md", text)
    print(f"{failed} of {len(rows)} calls failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
