"""Triton kernel of the pixel-adaptive convolution and of one fused mean-field step.

One program computes ``BLOCK_V`` output voxels of one batch item and one channel group. It loops
over the taps; each tap loads the guide at the tap position, forms the adapting weight
``K = s_t * exp(-1/2 ||g_centre - g_tap||^2)`` in registers, loads the input at the tap and
accumulates (a ``tl.dot`` with the tap's weight matrix, or a depthwise product). ``K`` is never
stored and nothing is unfolded. With ``CRF_STEP`` the program also finishes a mean-field step:
``logits = unary - compat * (1 - M)`` and ``Q = softmax(logits)``, written side by side.

Import this module only after choosing the Triton backend: ``TRITON_INTERPRET`` takes effect
when it is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pac_torch import PacGeometry, exp_limits
from .triton_helpers import unravel3


def _p2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(n))


@triton.jit
def _pac_kernel(
    x_ptr, g_ptr, w_ptr, b_ptr, scale_ptr, out_ptr, unary_ptr, q_ptr,
    n_vblocks, n_taps,
    in_d, in_h, in_w, out_d, out_h, out_w,
    cin_g, cout_g, n_guide,
    sxn, sxc, sxd, sxh, sxw,
    sgn, sgc, sgd, sgh, sgw,
    swo, swc, swd, swh, sww,
    sun, suc, sud, suh, suw,
    st_d, st_h, st_w, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    k_h, k_w,
    compat, exp_floor, exp_cut,
    CI_P: tl.constexpr, CO_P: tl.constexpr, F_P: tl.constexpr,
    DEPTHWISE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, CRF_STEP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    group = tl.program_id(1)
    n = (pid // n_vblocks).to(tl.int64)
    v = (pid % n_vblocks).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    n_out = out_d * out_h * out_w
    live = v < n_out
    od, oh, ow = unravel3(v, out_h, out_w)

    f = tl.arange(0, F_P)
    ci = tl.arange(0, CI_P)
    co = tl.arange(0, CO_P)
    f_ok = f < n_guide
    ci_ok = ci < cin_g
    co_ok = co < cout_g

    # Window centre; it lies in the zero padding only when padding exceeds 'same'.
    cd = od * st_d - pad_d
    ch = oh * st_h - pad_h
    cw = ow * st_w - pad_w
    k_d = n_taps // (k_h * k_w)
    cd += (k_d - 1) // 2 * dil_d
    ch += (k_h - 1) // 2 * dil_h
    cw += (k_w - 1) // 2 * dil_w
    c_in = live & (cd >= 0) & (cd < in_d) & (ch >= 0) & (ch < in_h) & (cw >= 0) & (cw < in_w)
    g_base = g_ptr + n * sgn + f[None, :] * sgc
    g_c = tl.load(
        g_base + (cd * sgd + ch * sgh + cw * sgw)[:, None],
        mask=c_in[:, None] & f_ok[None, :],
        other=0.0,
    ).to(tl.float32)

    acc = tl.zeros((BLOCK_V, CO_P), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    x_base = x_ptr + n * sxn + (group * cin_g + ci)[None, :].to(tl.int64) * sxc
    for t in range(n_taps):
        td = t // (k_h * k_w)
        th = (t // k_w) % k_h
        tw = t % k_w
        pd = od * st_d - pad_d + td * dil_d
        ph = oh * st_h - pad_h + th * dil_h
        pw = ow * st_w - pad_w + tw * dil_w
        inb = live & (pd >= 0) & (pd < in_d) & (ph >= 0) & (ph < in_h) & (pw >= 0) & (pw < in_w)
        g_t = tl.load(
            g_base + (pd * sgd + ph * sgh + pw * sgw)[:, None],
            mask=inb[:, None] & f_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        diff = g_t - g_c
        arg = -0.5 * tl.sum(diff * diff, axis=1)
        k = tl.exp(tl.maximum(arg, exp_floor)) * tl.load(scale_ptr + t)
        k = tl.where(inb & (k > exp_cut), k, 0.0)
        if NORMALIZE:
            ksum += k
        x_t = tl.load(
            x_base + (pd * sxd + ph * sxh + pw * sxw)[:, None],
            mask=inb[:, None] & ci_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        y = x_t * k[:, None]
        if DEPTHWISE:
            acc += y
        else:
            w_t = tl.load(
                w_ptr
                + (group * cout_g + co)[None, :] * swo
                + ci[:, None] * swc
                + td * swd
                + th * swh
                + tw * sww,
                mask=ci_ok[:, None] & co_ok[None, :],
                other=0.0,
            )  # (CI_P, CO_P)
            if USE_DOT:
                acc += tl.dot(y, w_t, input_precision="ieee")
            else:
                acc += tl.sum(y[:, :, None] * w_t[None, :, :], axis=1)

    if NORMALIZE:
        acc = acc / tl.where(ksum == 0.0, 1.0, ksum)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + group * cout_g + co, mask=co_ok, other=0.0)[None, :]

    o_chan = (group * cout_g + co)[None, :].to(tl.int64)
    o_off = (n * (cout_g * tl.num_programs(1)) + o_chan) * n_out + v[:, None]
    o_mask = live[:, None] & co_ok[None, :]
    if CRF_STEP:
        u = tl.load(
            unary_ptr + n * sun + o_chan * suc + (od * sud + oh * suh + ow * suw)[:, None],
            mask=o_mask,
            other=0.0,
        ).to(tl.float32)
        logits = u - compat * (1.0 - acc)
        tl.store(out_ptr + o_off, logits, mask=o_mask)
        shifted = tl.where(co_ok[None, :], logits, float("-inf"))
        e = tl.exp(shifted - tl.max(shifted, axis=1)[:, None])
        tl.store(q_ptr + o_off, e / tl.sum(e, axis=1)[:, None], mask=o_mask)
    else:
        tl.store(out_ptr + o_off, acc, mask=o_mask)


def launch_meta(cin_g, cout_g, n_guide, depthwise, normalize, has_bias, crf_step) -> dict:
    """The launch choices of ``_launch`` (constexprs and ``num_warps``) for ``cin_g`` input and
    ``cout_g`` output channels per group and ``n_guide`` guide channels: what the launcher runs
    and what ``benchmarks/triton_aot.py`` compiles ahead of time."""
    ci_p, co_p = _p2(cin_g), _p2(cout_g)
    use_dot = not depthwise and ci_p >= 16 and co_p >= 16
    return {
        "CI_P": ci_p, "CO_P": co_p, "F_P": _p2(n_guide), "DEPTHWISE": bool(depthwise),
        "NORMALIZE": bool(normalize), "HAS_BIAS": bool(has_bias), "USE_DOT": use_dot,
        "CRF_STEP": bool(crf_step), **_tile(ci_p, co_p, bool(depthwise), use_dot),
    }  # fmt: skip


def _tile(ci_p: int, co_p: int, depthwise: bool, use_dot: bool) -> dict:
    """``BLOCK_V`` and ``num_warps`` for ``ci_p`` -> ``co_p`` channels (padded, per group):
    the blocks that compiled without spills for sm_80 and sm_90a (``benchmarks/triton_aot.py``);
    the IEEE float32 products run on FMA units and keep their tiles in registers."""
    channels = max(ci_p, co_p)
    if depthwise:  # no weight tile: the block holds channels x BLOCK_V products
        return {"BLOCK_V": max(16, min(128, 1024 // channels)), "num_warps": 4}
    if not use_dot:
        return {"BLOCK_V": 128 if channels <= 4 else 32, "num_warps": 4}
    if channels <= 16:
        return {"BLOCK_V": 32, "num_warps": 4}
    return {"BLOCK_V": 16, "num_warps": 8 if min(ci_p, co_p) >= 64 else 4}


def aot_cases() -> list[tuple[str, dict, dict, dict]]:
    """``(name, launch_meta, pointer dtypes, call)`` of the configurations compiled ahead of
    time: the CRF step (2 and 4 classes, 1 and 3 guide channels), the normalised depthwise PAC,
    and the weighted PAC with and without ``tl.dot`` (channels per group 2 to 64), with a bias,
    grouped, and on float16 / bfloat16 inputs. ``call`` is a public call that launches it
    (``op``: "pac3d" or "pac_crf3d"; channels, guide channels, groups, weight, bias, normalize,
    input dtype), which ``benchmarks/gpu_configs.py`` runs on a GPU."""
    cases = []

    def add(name, cin, cout, f, depthwise, normalize, bias, crf, x="fp32", groups=1):
        meta = launch_meta(cin, cout, f, depthwise, normalize, bias, crf)
        call = {"op": "pac_crf3d" if crf else "pac3d", "cin": cin * groups,
                "cout": cout * groups, "guide": f, "groups": groups, "weight": not depthwise,
                "bias": bias, "normalize": normalize, "x": x}  # fmt: skip
        cases.append((name, meta, {"x_ptr": x, "g_ptr": x}, call))

    for k in (2, 4):
        for f in (1, 3):
            add(f"crf step K={k} F={f}", k, k, f, True, True, False, True)
    add("depthwise normalised C=4 F=3", 4, 4, 3, True, True, False, False)
    add("depthwise normalised C=32 F=3", 32, 32, 3, True, True, False, False)
    for c in (2, 4, 8, 16, 32, 64):
        add(f"conv C={c}->{c} F=3", c, c, 3, False, False, False, False)
    add("conv C=16->16 F=3 bias", 16, 16, 3, False, False, True, False)
    add("conv C=16->64 F=3 (groups: per-group channels)", 16, 64, 3, False, False, False, False,
        groups=2)  # fmt: skip
    add("conv C=16->16 F=8 normalised", 16, 16, 8, False, True, False, False)
    for x in ("fp16", "bf16"):
        add(f"conv C=16->16 F=3 x {x}", 16, 16, 3, False, False, False, False, x)
    return cases


def _launch(x, guide, weight, bias, geo: PacGeometry, groups, normalize, tap_scale, out, crf=None):
    n, c_in = x.shape[:2]
    c_out = out.shape[1]
    depthwise = weight is None
    n_groups = 1 if depthwise else groups
    cin_g = c_in if depthwise else c_in // groups
    cout_g = c_out // n_groups
    n_taps = len(geo.taps())
    scale = torch.tensor(tap_scale or [1.0] * n_taps, dtype=torch.float32, device=x.device)
    w = weight if weight is not None else scale  # any tensor: unused when DEPTHWISE
    meta = launch_meta(cin_g, cout_g, guide.shape[1], depthwise, normalize, bias is not None,
                       crf is not None)  # fmt: skip
    n_vblocks = triton.cdiv(out[0, 0].numel(), meta["BLOCK_V"])
    floor, cut = exp_limits(torch.float32)
    unary, q, compat = crf if crf is not None else (out, out, 0.0)
    _pac_kernel[(n * n_vblocks, n_groups)](
        x, guide, w, bias if bias is not None else scale, scale, out, unary, q,
        n_vblocks, n_taps,
        *geo.in_shape, *geo.out_shape,
        cin_g, cout_g, guide.shape[1],
        *x.stride(), *guide.stride(),
        *(weight.stride() if weight is not None else (0,) * 5),
        *unary.stride(),
        *geo.stride, *geo.padding, *geo.dilation,
        geo.kernel[1], geo.kernel[2],
        float(compat), floor, cut,
        **meta,
    )  # fmt: skip


def pac_forward(
    x, guide, weight, bias, geo: PacGeometry, groups, normalize, tap_scale, out
) -> None:
    """Same contract as ``pac_torch.pac_forward`` (float32 weight/bias, contiguous ``out``)."""
    _launch(x, guide, weight, bias, geo, groups, normalize, tap_scale, out)


def crf_step(
    q, guide, unary, geo: PacGeometry, tap_scale, compat: float, logits_out, q_out
) -> None:
    """One fused mean-field step: ``logits_out = unary - compat * (1 - M(q))``, ``q_out =
    softmax(logits_out)``; all ``(N, K, D, H, W)``, outputs contiguous float32."""
    _launch(q, guide, None, None, geo, 1, True, tap_scale, logits_out, crf=(unary, q_out, compat))
