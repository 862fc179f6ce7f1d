"""Adam without ``torch.optim`` (see :func:`adam_step` for why)."""

from __future__ import annotations

import torch


@torch.no_grad()
def adam_step(params, grads, moments, t: int, lr: float = 1e-2, betas=(0.9, 0.999), eps=1e-8):
    """One Adam update (Kingma & Ba) in place on ``params`` (a list of tensors; ``grads`` alike;
    ``moments`` a list of ``(m, v)`` tensor pairs of the same shapes; ``t`` the 1-based step),
    written out with torch's multi-tensor ``_foreach`` ops (a few calls for all parameters):
    ``torch.optim`` imports ``torch._dynamo``, which imports
    triton, and importing triton's LLVM after Qt's software OpenGL (Mesa llvmpipe) has loaded
    its own LLVM crashes the process, i.e. training inside napari."""
    b1, b2 = betas
    m, v = [mv[0] for mv in moments], [mv[1] for mv in moments]
    torch._foreach_mul_(m, b1)
    torch._foreach_add_(m, grads, alpha=1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
    denom = torch._foreach_div(v, 1 - b2**t)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - b1**t))
