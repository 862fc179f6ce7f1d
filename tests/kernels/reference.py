"""Independent float64 references for the kernel tests: obvious code, no blocking, no fusion."""

import math

import torch


def mlp_reference(x, weights, biases, activation, channels_last=False):
    """MLP of every voxel in float64 by explicit per-layer matrix products.

    x : (N, C, D, H, W) or (..., C); returns (N, K, D, H, W) or (..., K), float64.
    """
    h = x.detach().double()
    if not channels_last:
        h = h.movedim(1, -1)
    acts = {
        "relu": lambda t: torch.where(t > 0, t, torch.zeros_like(t)),
        "gelu": lambda t: t * 0.5 * (1 + torch.special.erf(t / math.sqrt(2))),
        "silu": lambda t: t / (1 + torch.exp(-t)),
        "tanh": lambda t: (torch.exp(t) - torch.exp(-t)) / (torch.exp(t) + torch.exp(-t)),
        "sigmoid": lambda t: 1 / (1 + torch.exp(-t)),
        "identity": lambda t: t,
    }
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = h @ w.detach().double().T + b.detach().double()
        if i < len(weights) - 1:
            h = acts[activation](h)
    return h if channels_last else h.movedim(-1, 1)


def _triple(v):
    return (v, v, v) if isinstance(v, int) else tuple(v)


def _unfold(t, kernel, stride, padding, dilation):
    """im2col of a (N, C, D, H, W) tensor, zero-padded: (N, C, T, Do, Ho, Wo), taps row-major."""
    p = padding
    t = torch.nn.functional.pad(t, (p[2], p[2], p[1], p[1], p[0], p[0]))
    out = [(t.shape[2 + a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1 for a in range(3)]
    cols = []
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            for c in range(kernel[2]):
                o = (a * dilation[0], b * dilation[1], c * dilation[2])
                cols.append(
                    t[
                        :,
                        :,
                        o[0] : o[0] + stride[0] * (out[0] - 1) + 1 : stride[0],
                        o[1] : o[1] + stride[1] * (out[1] - 1) + 1 : stride[1],
                        o[2] : o[2] + stride[2] * (out[2] - 1) + 1 : stride[2],
                    ]
                )
    return torch.stack(cols, dim=2)


def pac_reference(
    x,
    guide,
    weight=None,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    kernel_size=None,
    normalize=False,
):
    """Pixel-adaptive convolution in float64 by the definition, through a full unfold."""
    x, guide = x.detach().double(), guide.detach().double()
    kernel = tuple(weight.shape[2:]) if weight is not None else _triple(kernel_size)
    s, p, d = _triple(stride), _triple(padding), _triple(dilation)
    xc = _unfold(x, kernel, s, p, d)  # (N, C, T, O...)
    gc = _unfold(guide, kernel, s, p, d)
    valid = _unfold(torch.ones_like(x[:, :1]), kernel, s, p, d)[:, 0]  # (N, T, O...)
    centre = ((kernel[0] // 2) * kernel[1] + kernel[1] // 2) * kernel[2] + kernel[2] // 2
    k = torch.exp(-0.5 * ((gc - gc[:, :, centre : centre + 1]) ** 2).sum(1))  # (N, T, O...)
    if normalize:
        total = (k * valid).sum(1, keepdim=True)
        k = torch.where(total > 0, k / torch.where(total > 0, total, 1.0), 0.0)
    y = xc * k[:, None]  # (N, C, T, O...)
    if weight is None:
        out = y.sum(2)
    else:
        w = weight.detach().double().flatten(2)  # (C_out, C_in/g, T)
        c_in, c_out = x.shape[1], w.shape[0]
        parts = []
        for g in range(groups):
            yg = y[:, g * c_in // groups : (g + 1) * c_in // groups]
            wg = w[g * c_out // groups : (g + 1) * c_out // groups]
            parts.append(torch.einsum("oct,nct...->no...", wg, yg))
        out = torch.cat(parts, 1)
    if bias is not None:
        out = out + bias.detach().double().view(1, -1, 1, 1, 1)
    return out


def crf_reference(
    unary, guide, iterations=5, kernel_size=5, dilation=1, compat=1.0, spatial_sigma=None
):
    """Mean-field refinement in float64 by the definition, with a full unfold of Q each step."""
    unary, guide = unary.detach().double(), guide.detach().double()
    k, d = _triple(kernel_size), _triple(dilation)
    pad = tuple((k[a] - 1) // 2 * d[a] for a in range(3))
    one = (1, 1, 1)
    gc = _unfold(guide, k, one, pad, d)
    valid = _unfold(torch.ones_like(unary[:, :1]), k, one, pad, d)[:, 0]
    offsets = [
        ((a - k[0] // 2) * d[0], (b - k[1] // 2) * d[1], (c - k[2] // 2) * d[2])
        for a in range(k[0])
        for b in range(k[1])
        for c in range(k[2])
    ]
    centre = offsets.index((0, 0, 0))
    if spatial_sigma is None:
        ws = torch.ones(len(offsets), dtype=torch.float64)
    else:
        sig = spatial_sigma if isinstance(spatial_sigma, (tuple, list)) else (spatial_sigma,) * 3
        ws = torch.tensor(
            [math.exp(-0.5 * sum((o / s) ** 2 for o, s in zip(off, sig))) for off in offsets],
            dtype=torch.float64,
        )
    ws[centre] = 0.0
    w = (
        ws.view(1, -1, 1, 1, 1)
        * torch.exp(-0.5 * ((gc - gc[:, :, centre : centre + 1]) ** 2).sum(1))
        * valid
    )
    total = w.sum(1)  # (N, O...)
    logits = unary
    q = torch.softmax(unary, 1)
    for _ in range(iterations):
        qc = _unfold(q, k, one, pad, d)  # (N, K, T, O...)
        num = (qc * w[:, None]).sum(2)
        message = torch.where(
            total[:, None] > 0, num / torch.where(total > 0, total, 1.0)[:, None], 0.0
        )
        logits = unary - compat * (1 - message)
        q = torch.softmax(logits, 1)
    return logits
