"""Triton kernel of ``voxel_mlp``: every layer fused, one program per block of voxels.

Each program loads a ``(BLOCK_V, C)`` tile of the input once, runs all layers with ``tl.dot`` on
register tiles (widths zero-padded to powers of two >= 16), and stores the ``(BLOCK_V, K)`` result
once; hidden activations never reach global memory. Import this module only after deciding on
the Triton backend: ``TRITON_INTERPRET`` takes effect when it is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .mlp_limits import FUSED_MAX_LAYERS as MAX_LAYERS
from .triton_helpers import unravel3

ACTIVATION_CODES = {"relu": 0, "gelu": 1, "silu": 2, "tanh": 3, "sigmoid": 4, "identity": 5}


def padded_width(n: int) -> int:
    """Width a layer occupies in registers: the next power of two, at least 16 (``tl.dot``)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _activation(h, ACT: tl.constexpr):
    if ACT == 0:
        # Not tl.maximum: without propagate_nan its NaN result is unspecified (the GPU's max
        # returns the other operand), and NaN must stay NaN as in torch.relu.
        h = tl.where(h < 0.0, 0.0, h)
    elif ACT == 1:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        h = h * tl.sigmoid(h)
    elif ACT == 3:
        h = 2.0 * tl.sigmoid(2.0 * h) - 1.0
    elif ACT == 4:
        h = tl.sigmoid(h)
    return h


@triton.jit
def _dense(
    h, w_ptr, b_ptr, n_out, IN_P: tl.constexpr, OUT_P: tl.constexpr, PRECISION: tl.constexpr
):
    """``h @ W.T + b`` for a ``(BLOCK_V, IN_P)`` tile; W is stored zero-padded ``(OUT_P, IN_P)``.

    The padded units (columns ``>= n_out``) are set to exactly 0: their zero weights would turn
    an inf among the inputs into NaN (inf * 0), which the next layer would spread to every unit
    of the voxel where torch gives a finite or infinite value.
    """
    rows = tl.arange(0, IN_P)
    cols = tl.arange(0, OUT_P)
    w_t = tl.load(w_ptr + cols[None, :] * IN_P + rows[:, None])
    out = tl.dot(h, w_t, input_precision=PRECISION) + tl.load(b_ptr + cols)[None, :]
    return tl.where(cols[None, :] < n_out, out, 0.0)


@triton.jit
def _voxel_mlp_kernel(
    x_ptr, out_ptr,
    w0, b0, w1, b1, w2, b2, w3, b3, w4, b4, w5, b5,
    n_voxels, blocks_per_item, size_h, size_w, channels, classes,
    n1, n2, n3, n4, n5,
    sxn, sxc, sxd, sxh, sxw,
    son, sok, sod, soh, sow,
    NUM_LAYERS: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
    P4: tl.constexpr, P5: tl.constexpr, P6: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    item = (pid // blocks_per_item).to(tl.int64)
    v = (pid % blocks_per_item).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    live = v < n_voxels
    id_, ih, iw = unravel3(v, size_h, size_w)

    c = tl.arange(0, P0)
    x_off = item * sxn + id_ * sxd + ih * sxh + iw * sxw
    h = tl.load(
        x_ptr + x_off[:, None] + c[None, :] * sxc,
        mask=live[:, None] & (c[None, :] < channels),
        other=0.0,
    ).to(tl.float32)

    h = _dense(h, w0, b0, n1, P0, P1, PRECISION)
    if NUM_LAYERS > 1:
        h = _dense(_activation(h, ACT), w1, b1, n2, P1, P2, PRECISION)
    if NUM_LAYERS > 2:
        h = _dense(_activation(h, ACT), w2, b2, n3, P2, P3, PRECISION)
    if NUM_LAYERS > 3:
        h = _dense(_activation(h, ACT), w3, b3, n4, P3, P4, PRECISION)
    if NUM_LAYERS > 4:
        h = _dense(_activation(h, ACT), w4, b4, n5, P4, P5, PRECISION)
    if NUM_LAYERS > 5:
        h = _dense(_activation(h, ACT), w5, b5, classes, P5, P6, PRECISION)

    if NUM_LAYERS == 1:
        k = tl.arange(0, P1)
    elif NUM_LAYERS == 2:
        k = tl.arange(0, P2)
    elif NUM_LAYERS == 3:
        k = tl.arange(0, P3)
    elif NUM_LAYERS == 4:
        k = tl.arange(0, P4)
    elif NUM_LAYERS == 5:
        k = tl.arange(0, P5)
    else:
        k = tl.arange(0, P6)
    o_off = item * son + id_ * sod + ih * soh + iw * sow
    tl.store(
        out_ptr + o_off[:, None] + k[None, :] * sok,
        h,
        mask=live[:, None] & (k[None, :] < classes),
    )


def launch_meta(channels: int, outs: Sequence[int], activation: str, precision: str) -> dict:
    """The launch choices of ``mlp_forward`` (constexprs and ``num_warps``) for an input of
    ``channels`` and layers of ``outs`` output units: what the launcher runs and what
    ``benchmarks/triton_aot.py`` compiles ahead of time."""
    widths = [padded_width(channels)] + [padded_width(o) for o in outs]
    widths += [16] * (MAX_LAYERS + 1 - len(widths))
    widest = max(widths)
    if precision == "ieee" and widest > 16:
        # float32 IEEE dots have no tensor-core path; Triton's FMA lowering keeps whole tiles
        # in registers and spilled at every larger block (benchmarks/triton_aot.py).
        block_v = 16
        warps = 4 if max(widths[1:]) >= 128 or widest < 64 else 8
    else:
        block_v, warps = (128 if widest <= 64 else 64), 4
    return {
        "NUM_LAYERS": len(outs), **{f"P{i}": widths[i] for i in range(MAX_LAYERS + 1)},
        "ACT": ACTIVATION_CODES[activation], "PRECISION": precision, "BLOCK_V": block_v,
        "num_warps": warps,
    }  # fmt: skip


def aot_cases() -> list[tuple[str, dict, dict, dict]]:
    """``(name, launch_meta, pointer dtypes, call)`` of the configurations compiled ahead of
    time: every layer count, padded width, activation, precision and input dtype the launcher
    can choose, each varied from 16 -> 64 -> 64 -> 4 (ReLU, IEEE, float32). ``call`` holds the
    ``voxel_mlp`` call that launches it (channels, layer outputs, activation, precision, input
    dtype), which ``benchmarks/gpu_configs.py`` runs on a GPU."""
    base = dict(channels=16, outs=[64, 64, 4], activation="relu", precision="ieee", x="fp32")
    variants = [{}]
    variants += [{"outs": [64] * (n - 1) + [4]} for n in range(1, MAX_LAYERS + 1) if n != 3]
    variants += [{"outs": [w, w, 4]} for w in (8, 32, 128)]
    variants += [{"channels": 100}]
    variants += [{"activation": a} for a in ACTIVATION_CODES if a != "relu"]
    variants += [{"precision": "tf32"}, {"precision": "tf32", "outs": [128, 128, 4]}]
    variants += [{"x": "fp16"}, {"x": "bf16"}]
    cases = []
    for v in variants:
        cfg = base | v
        meta = launch_meta(cfg["channels"], cfg["outs"], cfg["activation"], cfg["precision"])
        name = (f"C{cfg['channels']}->" + "->".join(map(str, cfg["outs"]))
                + f" {cfg['activation']} {cfg['precision']} x {cfg['x']}")  # fmt: skip
        cases.append((name, meta, {"x_ptr": cfg["x"]}, {"op": "voxel_mlp", **cfg}))
    return cases


def _padded_layers(weights, biases):
    """Zero-padded float32 copies: padded units get weight 0 and bias 0, so they never leak."""
    padded = []
    for w, b in zip(weights, biases):
        o, i = w.shape
        wp = torch.zeros(padded_width(o), padded_width(i), dtype=torch.float32, device=w.device)
        wp[:o, :i] = w
        bp = torch.zeros(padded_width(o), dtype=torch.float32, device=w.device)
        bp[:o] = b
        padded += [wp, bp]
    return padded


def mlp_forward(
    x: torch.Tensor,
    out: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation: str,
) -> None:
    """Write ``MLP(x)`` into ``out`` with the fused kernel.

    Parameters
    ----------
    x : Tensor ``(N, C, D, H, W)``, any strides; float32, float16 or bfloat16
    out : Tensor ``(N, K, D, H, W)`` float32, any strides
    weights, biases : float32 ``(out, in)`` matrices and ``(out,)`` vectors, at most
        ``FUSED_MAX_LAYERS`` layers of width at most ``FUSED_MAX_WIDTH`` (see ``mlp_limits``).
    """
    n, c, d, h, w = x.shape
    params = _padded_layers(weights, biases)
    params += [params[0], params[1]] * (MAX_LAYERS - len(weights))
    # Real widths of layer outputs 1..5 (the last layer's is ``classes``); unused ones any.
    units = [wt.shape[0] for wt in weights[:-1]] + [out.shape[1]] * (MAX_LAYERS - len(weights))
    # PyTorch's own switch for TF32 in float32 matmuls decides here too (off by default).
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    meta = launch_meta(c, [wt.shape[0] for wt in weights], activation, precision)
    n_voxels = d * h * w
    if n_voxels == 0 or n == 0:
        return
    blocks = triton.cdiv(n_voxels, meta["BLOCK_V"])
    _voxel_mlp_kernel[(n * blocks,)](
        x, out, *params,
        n_voxels, blocks, h, w, c, out.shape[1], *units,
        *x.stride(), *out.stride(),
        **meta,
    )  # fmt: skip
