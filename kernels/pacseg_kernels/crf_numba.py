"""The CPU wavefront's (``crf_torch``) slab weights and mean-field steps as compiled loops.

The plain-torch step sums the message tap by tap: every tap reads and writes the whole slab's
message again (or fills a products buffer of all taps and sums it), so the message makes one
round trip through memory per tap, and the weights take six passes (differences, exponent,
clamp, exp, cut, sum). Here (``crf_loops``, numba) each row of a slab keeps its message in a
row buffer while the taps are summed, then the same loop normalises it, adds the
compatibility term to the unary and writes the next step's probabilities; the weights are
written in one pass with a vectorised float32 exp. The kept weights are then read once per
step and nothing else of the slab's size is written more than once (``pac_crf3d`` at
60 x 256 x 256, 5 steps: ``benchmarks/results/crf-cpu.md``).

numba is optional: ``available()`` is False where it does not import, and ``crf_torch`` then
runs its torch step. The loops compile on first use (cached on disk by numba when it can write
its cache), for float32 and float64. Calls run under ``threads.numba_threads``: one caller at a
time, on torch's current thread count.
"""

from __future__ import annotations

import functools

import torch

from .threads import numba_threads, numba_threadsafe


@functools.cache
def available() -> bool:
    """True when numba imports with a thread-safe threading layer (``threads.numba_threadsafe``)
    and the loops load."""
    if not numba_threadsafe():  # also False without numba
        return False
    try:
        _kernels()
    except Exception:  # a broken numba install must not break the torch path
        return False
    return True


@functools.cache
def _kernels():
    """numba and the compiled loops (imported on first use: numba takes ~0.3 s to import)."""
    import numba

    from . import crf_loops

    return numba, crf_loops


def _flat(t: torch.Tensor):
    """The numpy view of ``t``'s whole storage (1-D) and ``t``'s offset and strides in it."""
    storage = t.untyped_storage()
    whole = torch.empty(0, dtype=t.dtype).set_(storage, 0, (storage.nbytes() // t.element_size(),))
    return whole.numpy(), t.storage_offset(), t.stride()


def step(
    weights: torch.Tensor,
    rden: torch.Tensor,
    has: torch.Tensor,
    q_src: torch.Tensor,
    q_dst: torch.Tensor,
    taps: torch.Tensor,
    reach: tuple[int, int, int],
    unary: torch.Tensor,
    out: torch.Tensor,
    z0: int,
    nz: int,
    compat: float,
    next_probs: bool,
) -> None:
    """Mean-field step on planes ``z0 .. z0 + nz`` (of the first spatial axis) of one image.

    weights : ``T * nz * H * W`` contiguous, the slab's kept weights from ``guide_weights``;
    rden, has : ``(nz * H * W,)`` contiguous, ``1 / sum_t w`` and ``sum_t w > 0``; q_src, q_dst :
    ``(K - 1, Dp, Hp, Wp)`` contiguous padded probabilities (``reach`` voxels of padding per
    side), read from ``q_src`` and, when ``next_probs``, written into ``q_dst``'s interior;
    taps : ``(T,)`` int64, each tap's offset in ``q_src`` from a window's first voxel; unary,
    out : ``(K, D, H, W)`` views with unit x stride (``out`` receives the step's logits). All
    float tensors of one dtype (float32 or float64), on the CPU.
    """
    _, loops = _kernels()
    k = unary.shape[0]
    h, w = unary.shape[2], unary.shape[3]
    w_np, w_off, _ = _flat(weights)
    q_np, q_off, (q_cs, q_s0, q_s1, _) = _flat(q_src)
    d_np, d_off, _ = _flat(q_dst)
    u_np, u_off, (u_cs, u_s0, u_s1, _) = _flat(unary)
    o_np, o_off, o_strides = _flat(out)
    if o_strides != (u_cs, u_s0, u_s1, 1) or unary.stride(3) != 1:
        raise ValueError("crf_numba.step: unary and out need the same strides, x stride 1")
    inner = reach[0] * q_s0 + reach[1] * q_s1 + reach[2]
    with numba_threads():
        loops.step(
            w_np[w_off : w_off + weights.numel()], rden.numpy(), has.numpy(),
            q_np[q_off:], d_np[d_off:], taps.numpy(), q_cs, q_s0, q_s1, inner,
            u_np[u_off:], o_np[o_off:], u_cs, u_s0, u_s1, z0, nz, h, w, k, float(compat),
            bool(next_probs),
        )  # fmt: skip


def guide_weights(
    g_pad: torch.Tensor,
    taps: torch.Tensor,
    reach: tuple[int, int, int],
    log_scale: torch.Tensor,
    weights: torch.Tensor,
    rden: torch.Tensor,
    has: torch.Tensor,
    z0: int,
    nz: int,
    shape: tuple[int, int],
    floor: float,
    cut: float,
) -> None:
    """The kept weights of planes ``z0 .. z0 + nz`` of one image, for ``step``.

    g_pad : ``(F, Dp, Hp, Wp)`` contiguous padded guide; taps : ``(T,)`` int64 tap offsets in
    it (as for ``step``); log_scale : ``(T,)``, ``log w_s(t)`` (-inf: weight 0); weights :
    ``T * nz * H * W`` contiguous values, written in ``crf_loops``' ``(rows, T, W)`` layout;
    rden, has : ``(nz * H * W,)`` contiguous outputs (all of the guide's float dtype):
    ``w = exp(max(log_scale - |g_i - g_j|^2 / 2, floor))``, 0 where ``<= cut``, then
    ``1 / max(sum_t w, tiny)`` and ``sum_t w > 0``. ``shape``: ``(H, W)``.
    """
    _, loops = _kernels()
    g_np, g_off, (g_cs, g_s0, g_s1, _) = _flat(g_pad)
    inner = reach[0] * g_s0 + reach[1] * g_s1 + reach[2]
    tiny = torch.finfo(weights.dtype).tiny
    with numba_threads():
        loops.weights(
            g_np[g_off:], taps.numpy(), g_cs, g_s0, g_s1, inner, g_pad.shape[0],
            log_scale.numpy(), weights.reshape(-1).numpy(), rden.numpy(), has.numpy(), z0, nz,
            *shape, floor, cut, tiny, weights.dtype == torch.float32,
        )  # fmt: skip
