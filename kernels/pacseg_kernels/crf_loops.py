"""The compiled loops of ``crf_numba`` (this module imports numba; ``crf_numba`` imports it
lazily, on the first refinement, so that importing ``pacseg_kernels`` stays cheap).

Every array is 1-D and contiguous, addressed with explicit offsets and strides (x stride 1),
so one compiled loop serves the z and the y wavefront's transposed views. Indices are taken
through row slices: numba then knows them non-negative, where a flat ``base + x`` would get a
negative-index check per element that stops LLVM vectorising the loop.

Weights layout: a slab of ``R = nz * H`` rows of ``W`` voxels keeps its weights as
``(R, T, W)`` (row by row, every tap's row contiguous), so a row's taps are one sequential
stream of ``T * W`` values; ``rden`` and ``has`` are ``(R, W)``.
"""

from __future__ import annotations

import numba
import numpy as np

# Cephes' expf: exp(v) = 2^n exp(r), n = round(v / ln 2), r = v - n ln 2 (ln 2 in two parts),
# exp(r) = 1 + r + r^2 P(r): within 2 ulp of float32's exp on the weights' exponents
# [floor, 0], where n >= -126 and 2^n is a normal float made from its exponent bits.
_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 0.693359375, -2.12194440e-4
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
      5.0000001201e-1)  # fmt: skip

_jit = numba.njit(cache=True, fastmath={"contract"})
_parallel = numba.njit(parallel=True, cache=True, fastmath={"contract"})


@_jit
def _exp32(v, out, poly, bits):
    """``out = exp(v)`` for float32 ``v`` in ``[log(tiny), 0]``; ``poly`` float32 and ``bits``
    int32 scratch rows of the same length."""
    f = np.float32
    two_n = bits.view(np.float32)
    for x in range(v.shape[0]):
        n = np.floor(v[x] * f(_LOG2E) + f(0.5))
        r = v[x] - n * f(_LN2_HI) - n * f(_LN2_LO)
        q = f(_P[0]) * r + f(_P[1])
        q = q * r + f(_P[2])
        q = q * r + f(_P[3])
        q = q * r + f(_P[4])
        q = q * r + f(_P[5])
        poly[x] = q * r * r + r + f(1.0)
        bits[x] = (np.int32(n) + np.int32(127)) << 23
    for x in range(v.shape[0]):
        out[x] = poly[x] * two_n[x]


@_parallel
def weights(
    g, taps, g_cs, g_s0, g_s1, g_inner, n_guide, log_scale, out, rden, has, z0, nz, h, w,
    floor, cut, tiny, exp32,
):  # fmt: skip
    """The kept weights of output planes ``z0 .. z0 + nz``: ``out[(row, t, x)] = exp(max(
    log_scale[t] - |g_i - g_(i + tap t)|^2 / 2, floor))``, 0 where ``<= cut``; ``rden = 1 /
    max(sum_t w, tiny)``, ``has = sum_t w > 0``. ``g``: the padded guide (channel stride
    ``g_cs``, plane ``g_s0``, row ``g_s1``); ``g_inner``: a window's centre from its first
    voxel; ``taps``: each tap's offset from a window's first voxel. ``exp32`` (float32 only)
    takes the vectorised exp above, else numpy's."""
    n_taps = taps.shape[0]
    dt = out.dtype
    floor, cut = dt.type(floor), dt.type(cut)
    half = dt.type(0.5)
    for row in numba.prange(nz * h):
        z = z0 + row // h
        y = row % h
        corner = z * g_s0 + y * g_s1
        den = np.zeros(w, dtype=dt)
        e = np.empty(w, dtype=dt)
        poly = np.empty(w, dtype=np.float32)
        bits = np.empty(w, dtype=np.int32)
        for t in range(n_taps):
            e[:] = 0.0
            for f in range(n_guide):
                c0 = f * g_cs + corner + g_inner
                t0 = f * g_cs + corner + taps[t]
                gc = g[c0 : c0 + w]
                gt = g[t0 : t0 + w]
                for x in range(w):
                    d = gt[x] - gc[x]
                    e[x] += d * d
            ls = log_scale[t]
            for x in range(w):
                v = ls - half * e[x]
                if not v >= floor:  # NaN (a non-finite guide) too: weight 0
                    v = floor
                e[x] = v
            first = (row * n_taps + t) * w
            wt = out[first : first + w]
            if exp32:
                _exp32(e, wt, poly, bits)
            else:
                for x in range(w):
                    wt[x] = np.exp(e[x])
            for x in range(w):
                if wt[x] <= cut:
                    wt[x] = 0.0
                den[x] += wt[x]
        r = rden[row * w : row * w + w]
        hs = has[row * w : row * w + w]
        for x in range(w):
            hs[x] = 1.0 if den[x] > 0 else 0.0
            # The weights are 0 or >= cut > tiny: a voxel with no weight gets a finite
            # 1 / sum that multiplies messages of exactly 0.
            r[x] = 1.0 / max(den[x], tiny)


@_parallel
def step(
    weights, rden, has, q_src, q_dst, taps, q_cs, q_s0, q_s1, q_inner,
    unary, out, u_cs, u_s0, u_s1, z0, nz, h, w, k, compat, next_probs,
):  # fmt: skip
    """One mean-field step on output planes ``z0 .. z0 + nz``: per row, the message of the
    first ``K - 1`` classes summed over the taps in a row buffer, normalised by ``rden``,
    the last class's ``has - sum``, the logits ``unary + compat * (M - 1)`` into ``out``, and
    (``next_probs``) the first ``K - 1`` softmax probabilities into ``q_dst``'s interior
    (``q_inner`` from a window's first voxel)."""
    n_taps = taps.shape[0]
    dt = weights.dtype
    for row in numba.prange(nz * h):
        z = z0 + row // h
        y = row % h
        acc = np.empty((k, w), dtype=dt)
        for c in range(k - 1):
            a = acc[c]
            a[:] = 0.0
            base = c * q_cs + z * q_s0 + y * q_s1
            for t in range(n_taps):
                first = (row * n_taps + t) * w
                wt = weights[first : first + w]
                qt = q_src[base + taps[t] : base + taps[t] + w]
                for x in range(w):
                    a[x] += wt[x] * qt[x]
        r = rden[row * w : row * w + w]
        hs = has[row * w : row * w + w]
        for x in range(w):
            rest = 0.0
            for c in range(k - 1):
                m = acc[c, x] * r[x]
                acc[c, x] = m
                rest += m
            acc[k - 1, x] = hs[x] - rest  # sum_c M_c = 1 where a voxel has any weight, else 0
        u_row = z * u_s0 + y * u_s1
        top = np.full(w, -np.inf, dtype=dt)
        for c in range(k):
            u = unary[c * u_cs + u_row : c * u_cs + u_row + w]
            o = out[c * u_cs + u_row : c * u_cs + u_row + w]
            a = acc[c]
            for x in range(w):
                logit = u[x] + compat * (a[x] - 1.0)
                o[x] = logit
                a[x] = logit
                if not logit <= top[x]:  # NaN wins, as in torch.amax
                    top[x] = logit
        if next_probs:
            total = np.zeros(w, dtype=dt)
            for c in range(k):
                a = acc[c]
                for x in range(w):
                    a[x] = np.exp(a[x] - top[x])
                    total[x] += a[x]
            d_row = q_inner + z * q_s0 + y * q_s1
            for c in range(k - 1):
                d = q_dst[c * q_cs + d_row : c * q_cs + d_row + w]
                a = acc[c]
                for x in range(w):
                    d[x] = a[x] / total[x]
