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
