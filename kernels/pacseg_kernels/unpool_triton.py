"""Triton kernels of ``max_unpool3d``.

Gather form: one program per block of output voxels of one ``(N, C)`` plane; each voxel reads
the stored index of the pooling window it lies in and writes that window's value when the index
points at it, else 0: one pass, no zero fill. General form (overlapping windows, stray
indices): an ``atomic_max`` of the input order into a per-output winner buffer, then one gather
pass, so the last value in input order wins, deterministically.

Import this module only after choosing the Triton backend: ``TRITON_INTERPRET`` takes effect
when it is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_helpers import unravel3

BLOCK = 256


@triton.jit
def _unpool_gather_kernel(
    v_ptr, i_ptr, out_ptr,
    n_blocks, channels, in_d, in_h, in_w, out_d, out_h, out_w,
    svn, svc, svd, svh, svw,
    sin, sic, sid, sih, siw,
    k_d, k_h, k_w,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    plane = (pid // n_blocks).to(tl.int64)
    o = (pid % n_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_out = out_d * out_h * out_w
    live = o < n_out
    od, oh, ow = unravel3(o, out_h, out_w)
    wd, wh, ww = od // k_d, oh // k_h, ow // k_w
    covered = live & (wd < in_d) & (wh < in_h) & (ww < in_w)
    n = plane // channels
    c = plane % channels
    idx = tl.load(
        i_ptr + n * sin + c * sic + wd * sid + wh * sih + ww * siw, mask=covered, other=-1
    )
    hit = covered & (idx.to(tl.int64) == o)
    val = tl.load(v_ptr + n * svn + c * svc + wd * svd + wh * svh + ww * svw, mask=hit, other=0.0)
    tl.store(out_ptr + plane * n_out + o, val, mask=live)


@triton.jit
def _winner_kernel(
    i_ptr, win_ptr, n_blocks, channels, in_d, in_h, in_w, n_out,
    sin, sic, sid, sih, siw,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    plane = (pid // n_blocks).to(tl.int64)
    i = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    n_in = in_d * in_h * in_w
    live = i < n_in
    id_, ih, iw = unravel3(i, in_h, in_w)
    n = plane // channels
    c = plane % channels
    idx = tl.load(i_ptr + n * sin + c * sic + id_ * sid + ih * sih + iw * siw, mask=live, other=0)
    tl.atomic_max(win_ptr + plane * n_out + idx.to(tl.int64), i.to(tl.int32), mask=live)


@triton.jit
def _winner_gather_kernel(
    v_ptr, win_ptr, out_ptr, n_blocks, channels, in_h, in_w, n_out,
    svn, svc, svd, svh, svw,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    plane = (pid // n_blocks).to(tl.int64)
    o = (pid % n_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = o < n_out
    w = tl.load(win_ptr + plane * n_out + o, mask=live, other=-1)
    hit = live & (w >= 0)
    w = tl.where(hit, w, 0)
    id_, ih, iw = unravel3(w, in_h, in_w)
    n = plane // channels
    c = plane % channels
    val = tl.load(v_ptr + n * svn + c * svc + id_ * svd + ih * svh + iw * svw, mask=hit, other=0.0)
    tl.store(out_ptr + plane * n_out + o, val, mask=live)


def aot_cases() -> list[tuple[object, str, dict, dict, dict]]:
    """``(kernel, name, constexprs, pointer dtypes, call)`` compiled ahead of time: the one-pass
    gather (float32, float16, bfloat16 values) and the two kernels of the overlapping path.
    ``call``: a ``max_unpool3d`` call that launches it (values dtype, kernel and stride), which
    ``benchmarks/gpu_configs.py`` runs on a GPU."""
    meta = {"BLOCK": BLOCK, "num_warps": 4}
    index, winner = {"i_ptr": "i64"}, {"win_ptr": "i32"}
    cases = [
        (_unpool_gather_kernel, f"gather {t}", meta, {"v_ptr": t, "out_ptr": t, **index},
         {"op": "max_unpool3d", "x": t, "kernel": 2, "stride": 2})
        for t in ("fp32", "fp16", "bf16")
    ]  # fmt: skip
    overlapping = {"op": "max_unpool3d", "x": "fp32", "kernel": 3, "stride": 2}
    cases += [(_winner_kernel, "winner (overlapping windows)", meta, index | winner, overlapping),
              (_winner_gather_kernel, "winner gather fp32", meta, winner, overlapping)]  # fmt: skip
    return cases


def unpool(
    values: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, gather_form: bool, kernel
) -> None:
    """Same contract as ``unpool_torch.unpool`` (``out`` contiguous)."""
    n, c = values.shape[:2]
    planes = n * c
    in_shape, out_shape = values.shape[2:], out.shape[2:]
    n_out = out[0, 0].numel()
    out_blocks = triton.cdiv(n_out, BLOCK)
    if gather_form:
        _unpool_gather_kernel[(planes * out_blocks,)](
            values, indices, out, out_blocks, c, *in_shape, *out_shape,
            *values.stride(), *indices.stride(), *kernel, BLOCK=BLOCK,
        )  # fmt: skip
        return
    if values[0, 0].numel() >= 2**31:
        raise ValueError("max_unpool3d: planes of 2^31 voxels or more need backend='torch'")
    winner = torch.full((planes, n_out), -1, dtype=torch.int32, device=values.device)
    in_blocks = triton.cdiv(values[0, 0].numel(), BLOCK)
    _winner_kernel[(planes * in_blocks,)](
        indices, winner, in_blocks, c, *in_shape, n_out, *indices.stride(), BLOCK=BLOCK
    )
    _winner_gather_kernel[(planes * out_blocks,)](
        values,
        winner,
        out,
        out_blocks,
        c,
        in_shape[1],
        in_shape[2],
        n_out,
        *values.stride(),
        BLOCK=BLOCK,
    )
