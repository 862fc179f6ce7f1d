"""Plain-torch path of ``voxel_mlp``: blocked matrix products, working set sized for the cache.

Layout: channels first, so one block of voxels is a ``(C, n)`` matrix and a layer is
``h = W @ x + b`` with no transpose. Hidden activations live in two reused buffers of
``max_width * block`` elements, so peak extra memory does not grow with the volume.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .blocks import spatial_blocks

# Elements per hidden buffer (4 MiB in float32). Measured on a 2-core EPYC: blocks of 8k-16k
# voxels at width 64 ran ~1.7x faster than 1k, and whole-volume products ~4x slower.
BUFFER_ELEMENTS = 1 << 20
MIN_BLOCK, MAX_BLOCK = 512, 65536


# oneDNN's fused linear + activation (the op torch's own CPU compiler emits): on this 2-core
# machine, 16->64->64->4 at 128^3 ran at ~85-100% of the large-matmul rate against ~60% for
# addmm + in-place activation. It is a private op, so it is probed once and the addmm path
# stays as the fallback.
_ONEDNN_ATTR = {
    "relu": ("relu", ""),
    "gelu": ("gelu", "none"),
    "silu": ("swish", ""),
    "tanh": ("tanh", ""),
    "sigmoid": ("sigmoid", ""),
    "identity": ("none", ""),
}
# Voxels per oneDNN call: blocks whose widest hidden output is ~1M floats (4 MiB). At width 64
# that is 16,384 voxels: 16->64->64->4 at 128^3 ran in 0.227 s against 0.266 s with 8,192 and
# 0.612 s with 65,536 on an AVX2 EPYC with two threads; at width 256, 16,384 (16 MiB) was 1.6x
# slower than 8,192.
ONEDNN_ELEMENTS = 1 << 20
ONEDNN_BLOCK = 16384  # the most voxels per call


def onednn_block(width: int) -> int:
    """Voxels per oneDNN call for a widest layer of ``width``."""
    return max(MIN_BLOCK, min(ONEDNN_BLOCK, ONEDNN_ELEMENTS // width))


@functools.cache
def _onednn_linear():
    """``torch.ops.mkldnn._linear_pointwise`` if it works here, else None."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        probe = op(torch.ones(2, 3), torch.ones(4, 3), torch.full((4,), -4.0), "relu", [], "")
        if probe.shape == (2, 4) and float(probe.sum()) == 0.0:
            return op
    except Exception:  # private op missing or changed: the addmm path serves
        pass
    return None


@functools.cache
def _onednn_bfloat16() -> bool:
    """Whether ``_onednn_linear`` runs bfloat16 here: oneDNN has no bfloat16 inner product
    on CPUs without AVX-512 (an AVX2-only CPU refuses to create the primitive); the addmm
    path then runs the bfloat16 layers."""
    op = _onednn_linear()
    if op is None:
        return False
    bf16 = torch.bfloat16
    try:
        probe = op(torch.ones(2, 3, dtype=bf16), torch.ones(4, 3, dtype=bf16),
                   torch.full((4,), -2.0, dtype=bf16), "relu", [], "")  # fmt: skip
    except Exception:  # no bfloat16 primitive here (a RuntimeError), or the op changed
        return False
    return probe.shape == (2, 4) and float(probe.float().sum()) == 8.0  # relu(3 - 2) x 8


ONEDNN_ENABLED = True
# Below this widest layer the addmm path was faster (16->8->8->4 at 128^3: 0.025 s vs 0.053 s).
ONEDNN_MIN_WIDTH = 32


def use_onednn(
    x: torch.Tensor, weights: Sequence[torch.Tensor], matmul_dtype: torch.dtype | None = None
) -> bool:
    """Whether ``mlp_forward`` runs oneDNN's fused linear (``matmul_dtype``: bfloat16 layers,
    where oneDNN has them here) rather than addmm."""
    return (
        ONEDNN_ENABLED
        and x.device.type == "cpu"
        and weights[0].dtype == torch.float32
        and max(w.shape[0] for w in weights) >= ONEDNN_MIN_WIDTH
        and _onednn_linear() is not None
        and (matmul_dtype is None or _onednn_bfloat16())
    )


def _activate_(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply ``activation`` in place; returns ``h``."""
    if activation == "relu":
        h.relu_()
    elif activation == "gelu":
        torch.ops.aten.gelu_(h)
    elif activation == "silu":
        F.silu(h, inplace=True)
    elif activation == "tanh":
        h.tanh_()
    elif activation == "sigmoid":
        h.sigmoid_()
    return h


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Out-of-place ``activation`` (differentiable)."""
    return {
        "relu": torch.relu,
        "gelu": F.gelu,
        "silu": F.silu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "identity": lambda t: t,
    }[activation](h)


def block_voxels(weights: Sequence[torch.Tensor]) -> int:
    """Voxels per block for a stack of ``(out, in)`` weight matrices."""
    width = max(max(w.shape) for w in weights)
    return int(min(MAX_BLOCK, max(MIN_BLOCK, BUFFER_ELEMENTS // width)))


def _matrix_view(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    try:
        return t.view(rows, cols)
    except RuntimeError:
        return None


def mlp_forward(
    x: torch.Tensor,
    out: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation: str,
    matmul_dtype: torch.dtype | None = None,
) -> None:
    """Write ``MLP(x)`` into ``out``, block by block.

    Parameters
    ----------
    x : Tensor ``(C, *S)``, any strides, any float dtype
        Channels first; ``S`` is any spatial shape (batch included).
    out : Tensor ``(K, *S)``, dtype of the weights
        Written in place; any strides.
    weights, biases : ``(out, in)`` matrices and ``(out,)`` vectors, all of one float dtype.
    matmul_dtype : None, or ``torch.bfloat16`` (float32 parameters): every layer runs on
        bfloat16 copies (products accumulated in float32, each layer's output rounded to
        bfloat16); ``out`` stays float32.
    """
    dtype = weights[0].dtype
    if use_onednn(x, weights, matmul_dtype):
        _forward_onednn(x, out, weights, biases, activation, matmul_dtype)
        return
    if matmul_dtype is not None:  # every layer in bfloat16, as oneDNN's path runs them
        low_w = [w.to(matmul_dtype) for w in weights]
        low_b = [b_[:, None].to(matmul_dtype) for b_ in biases]
        for index, n in spatial_blocks(tuple(x.shape[1:]), block_voxels(weights)):
            h = x[(slice(None), *index)].reshape(x.shape[0], n).to(matmul_dtype)
            for layer, (w, b_) in enumerate(zip(low_w, low_b)):
                h = torch.addmm(b_, w, h)
                if layer < len(low_w) - 1:
                    h = _activate_(h, activation)
            target = out[(slice(None), *index)]
            target.copy_(h.view(target.shape))
        return
    block = block_voxels(weights)
    width = max(w.shape[0] for w in weights)
    spare = [torch.empty(width * block, dtype=dtype, device=x.device) for _ in range(2)]
    cols = [b[:, None] for b in biases]
    last = len(weights) - 1
    for index, n in spatial_blocks(tuple(x.shape[1:]), block):
        h = x[(slice(None), *index)].reshape(x.shape[0], n)
        if h.dtype != dtype:
            h = h.to(dtype)
        for layer, (w, b) in enumerate(zip(weights, cols)):
            if layer == last:
                target = out[(slice(None), *index)]
                direct = _matrix_view(target, w.shape[0], n)
                if direct is not None:
                    torch.addmm(b, w, h, out=direct)
                else:
                    target.copy_(torch.addmm(b, w, h).view(target.shape))
            else:
                nxt = spare[layer % 2][: w.shape[0] * n].view(w.shape[0], n)
                torch.addmm(b, w, h, out=nxt)
                h = _activate_(nxt, activation)


def relu_safe_input_bound(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> float:
    """Largest ``max|x|`` for which no hidden pre-activation of the ReLU MLP can be non-finite.

    oneDNN's fused ReLU returns 0 for a NaN pre-activation, where ``torch.relu`` (and so
    ``nn.Sequential``) returns NaN. A hidden NaN needs a non-finite value before it (a NaN or
    inf input, or a layer that overflowed), so a block whose inputs are finite and below this
    bound cannot meet the difference. With ``R_l = max_i sum_j |W_l[i, j]|`` and ``B_l =
    max |b_l|``, every partial sum of layer ``l`` is at most ``M_l = R_l * M_{l-1} + B_l``
    (``|relu(z)| <= |z|``); the bound keeps ``M_l`` of every hidden layer below half the
    largest float32. It is never above that either, even where the weights are 0 (0 * NaN is
    NaN), so NaN and inf inputs always fail it; NaN (never passes a comparison) when a weight or
    bias is not finite.
    """
    limit = torch.finfo(torch.float32).max / 2
    bound = limit
    scale, offset = 1.0, 0.0  # M_l = scale * M_0 + offset
    for w, b in zip(weights[:-1], biases[:-1]):
        r = float(w.detach().abs().double().sum(1).amax())
        m = float(b.detach().abs().double().amax()) if b.numel() else 0.0
        scale, offset = r * scale, r * offset + m
        if not (math.isfinite(scale) and math.isfinite(offset)) or offset > limit:
            return math.nan
        if scale > 0:
            bound = min(bound, (limit - offset) / scale)
    return bound


def _forward_onednn(x, out, weights, biases, activation, matmul_dtype=None) -> None:
    """``mlp_forward`` with oneDNN's fused linear + activation, on ``(n, C)`` row blocks.

    Its fused ReLU maps NaN to 0; a block whose input could lead to a NaN pre-activation (see
    ``relu_safe_input_bound``: checked with one ``aminmax`` of the block, which also sees NaN and
    inf) runs its ReLUs in torch instead, so NaN propagates as in ``nn.Sequential``. The other
    activations of oneDNN already give what torch gives for NaN and +-inf.
    """
    op = _onednn_linear()
    attr, algorithm = _ONEDNN_ATTR[activation]
    # Only ReLU between layers needs the check (one layer has none).
    check = activation == "relu" and len(weights) > 1
    bound = relu_safe_input_bound(weights, biases) if check else math.inf
    if matmul_dtype is not None:  # bfloat16 copies: oneDNN accumulates in float32
        weights = [w.to(matmul_dtype) for w in weights]
        biases = [b.to(matmul_dtype) for b in biases]
    width = max(w.shape[0] for w in weights)
    block_n = onednn_block(width)
    # The op allocates each layer's (block, width) output afresh. glibc serves allocations above
    # its mmap threshold with fresh, page-faulted mappings (measured: 4x slower overall here) and
    # raises the threshold to the size of a freed mapping: one freed larger-than-any-output
    # allocation keeps the per-block outputs on the reused heap.
    torch.empty(2 * block_n * width + 1024, dtype=torch.float32)  # allocated, freed at once
    last = len(weights) - 1
    for index, n in spatial_blocks(tuple(x.shape[1:]), block_n):
        rows = x[(slice(None), *index)].reshape(x.shape[0], n)  # (C, n)
        if matmul_dtype is not None:  # row-major: oneDNN's bfloat16 kernels are slow on a view
            block = torch.empty((n, rows.shape[0]), dtype=matmul_dtype).copy_(rows.t())
        else:
            block = rows.t() if rows.dtype == torch.float32 else rows.t().float()
        h = block
        for layer, (w, b) in enumerate(zip(weights, biases)):
            h = op(h, w, b, "none", [], "") if layer == last else op(h, w, b, attr, [], algorithm)
        if check:
            # One pass over the block (still in cache), in its contiguous orientation; NaN
            # fails the comparison. A failing block is redone with torch's ReLU.
            lo, hi = torch.aminmax(rows if rows.stride(-1) == 1 else rows.t())
            if not max(-float(lo), float(hi)) <= bound:
                h = block
                for layer, (w, b) in enumerate(zip(weights, biases)):
                    h = op(h, w, b, "none", [], "")
                    if layer < last:
                        h.relu_()
        target = out[(slice(None), *index)]
        target.copy_(h.t().reshape(target.shape))  # (bfloat16 layers: converted by the copy)


def mlp_backward(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation: str,
    grad_x: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of ``sum(grad_out * MLP(x))``, recomputing the forward pass block by block.

    Parameters
    ----------
    x : Tensor ``(C, *S)``; grad_out : Tensor ``(K, *S)``
    grad_x : Tensor ``(C, *S)`` or None
        Written in place when given.

    Returns
    -------
    grad_weights, grad_biases : lists shaped like ``weights`` and ``biases``
    """
    dtype = weights[0].dtype
    block = block_voxels(weights)
    params = [p.detach().requires_grad_(True) for p in (*weights, *biases)]
    ws, bs = params[: len(weights)], params[len(weights) :]
    gw = [torch.zeros_like(w) for w in weights]
    gb = [torch.zeros_like(b) for b in biases]
    for index, n in spatial_blocks(tuple(x.shape[1:]), block):
        sel = (slice(None), *index)
        xb = x[sel].reshape(x.shape[0], n).to(dtype).requires_grad_(grad_x is not None)
        g = grad_out[sel].reshape(grad_out.shape[0], n).to(dtype)
        with torch.enable_grad():
            h = xb
            for layer, (w, b) in enumerate(zip(ws, bs)):
                h = torch.addmm(b[:, None], w, h)
                if layer < len(ws) - 1:
                    h = activate(h, activation)
            inputs = [*ws, *bs] + ([xb] if grad_x is not None else [])
            grads = torch.autograd.grad(h, inputs, g)
        for acc, gr in zip(gw + gb, grads):
            acc += gr
        if grad_x is not None:
            grad_x[sel].copy_(grads[-1].view(grad_x[sel].shape))
    return gw, gb
