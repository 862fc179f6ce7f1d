"""``voxel_mlp``: a small MLP applied to the feature vector of every voxel, fused."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from . import mlp_torch
from .backend import resolve_backend
from .checks import FLOAT64_UNFUSED, VOLUME_AXES, check_float, check_not_empty, short_repr
from .mlp_limits import FUSED_MAX_LAYERS, FUSED_MAX_WIDTH, fused_hidden_limit

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "identity")
_OP = "voxel_mlp"


def _validate(x, weights, biases, activation, channels_last) -> None:
    check_float(x, "x", _OP)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"voxel_mlp: unknown activation {short_repr(activation)}; choose one of {ACTIVATIONS}"
        )
    if channels_last not in (True, False):
        raise ValueError(
            f"voxel_mlp: channels_last must be True or False, got {short_repr(channels_last)}"
        )
    if channels_last:
        if x.ndim < 1:
            raise ValueError("voxel_mlp: x must have a channel axis last, got a 0-d tensor")
        axes = (*(f"axis {i}" for i in range(x.ndim - 1)), "C (channels, last)")
    elif x.ndim != 5:
        raise ValueError(
            f"voxel_mlp: x must be (N, C, D, H, W), got shape {tuple(x.shape)}; "
            "for (..., C) arrays such as (X, Y, Z, n) pass channels_last=True"
        )
    else:
        axes = VOLUME_AXES
    check_not_empty(x, "x", _OP, axes, what="feature per voxel")
    if isinstance(weights, (torch.Tensor, str, bytes)) or isinstance(
        biases, (torch.Tensor, str, bytes)
    ):
        raise ValueError("voxel_mlp: weights and biases must be lists of tensors, one per layer")
    try:  # any iterable of tensors: a list, a tuple, an nn.ParameterList, a generator...
        weights, biases = list(weights), list(biases)
    except TypeError:
        raise ValueError(
            "voxel_mlp: weights and biases must be lists of tensors, one per layer"
        ) from None
    if len(weights) == 0:
        raise ValueError("voxel_mlp: weights is empty; give at least one (out, in) matrix")
    if len(weights) != len(biases):
        raise ValueError(
            f"voxel_mlp: {len(weights)} weight matrices but {len(biases)} bias vectors"
        )
    channels = x.shape[-1] if channels_last else x.shape[1]
    expected_in = channels
    for i, (w, b) in enumerate(zip(weights, biases)):
        check_float(w, f"weights[{i}]", _OP)
        check_float(b, f"biases[{i}]", _OP)
        if w.ndim != 2:
            raise ValueError(
                f"voxel_mlp: weights[{i}] must be (out, in), got shape {tuple(w.shape)}"
            )
        if w.shape[0] == 0:
            raise ValueError(
                f"voxel_mlp: weights[{i}] has shape {tuple(w.shape)}: a layer of 0 units; every "
                "layer needs at least one output"
            )
        if w.shape[1] != expected_in:
            source = (
                f"x has {channels} channels"
                if i == 0
                else (f"weights[{i - 1}] has shape {tuple(weights[i - 1].shape)}")
            )
            raise ValueError(
                f"voxel_mlp: weights[{i}] has shape {tuple(w.shape)} but {source}; "
                f"weights[{i}] needs {expected_in} input columns"
            )
        if b.shape != (w.shape[0],):
            raise ValueError(
                f"voxel_mlp: biases[{i}] has shape {tuple(b.shape)}, expected ({w.shape[0]},) "
                f"to match weights[{i}] of shape {tuple(w.shape)}"
            )
        if w.device != x.device or b.device != x.device:
            raise ValueError(
                f"voxel_mlp: layer {i} lives on {w.device}/{b.device} but x on {x.device}; "
                "move the weights with .to(x.device)"
            )
        expected_in = w.shape[0]


def _fused_unsupported(
    weights: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device
) -> str:
    """Why the fused Triton kernel cannot run this call ('' when it can)."""
    if dtype == torch.float64:
        return FLOAT64_UNFUSED
    if len(weights) > FUSED_MAX_LAYERS:
        return f"{len(weights)} layers; the fused kernel takes at most {FUSED_MAX_LAYERS}"
    widest = max(max(w.shape) for w in weights)
    if widest > FUSED_MAX_WIDTH:
        return f"a layer of width {widest}; the fused kernel takes widths up to {FUSED_MAX_WIDTH}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        limit = fused_hidden_limit(precision, 10 * major + minor)
        hidden = max(w.shape[0] for w in weights)
        if hidden > limit:
            return (
                f"a layer of {hidden} units in IEEE float32 on sm_{major}{minor}; the fused kernel "
                f"takes up to {limit} there (wider tiles spill registers); allow TF32 "
                "(torch.backends.cuda.matmul.allow_tf32 = True) to fuse it"
            )
    return ""


def _channels_first(t: torch.Tensor | None, channels_last: bool) -> torch.Tensor | None:
    """View ``(N, C, *S)`` or ``(*S, C)`` as ``(C, N, *S)`` / ``(C, *S)``."""
    if t is None:
        return None
    return t.movedim(-1, 0) if channels_last else t.movedim(1, 0)


def _as_ncdhw(t: torch.Tensor) -> torch.Tensor:
    """View a channels-last ``(*S, C)`` tensor as ``(1, C, a, b, c)`` for the Triton kernel."""
    if t.ndim > 4:
        t = t.reshape(-1, t.shape[-1])  # a view when the leading dims flatten, else a copy
    t = t.reshape((1,) * (4 - t.ndim) + tuple(t.shape))
    return t.movedim(-1, 0).unsqueeze(0)


class _VoxelMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation, channels_last, backend, n_layers, matmul_dtype, *params):
        weights, biases = params[:n_layers], params[n_layers:]
        k = weights[-1].shape[0]
        dtype = weights[0].dtype
        if channels_last:
            out = torch.empty((*x.shape[:-1], k), dtype=dtype, device=x.device)
        else:
            out = torch.empty((x.shape[0], k, *x.shape[2:]), dtype=dtype, device=x.device)
        if out.numel() and backend == "triton":
            from . import mlp_triton

            if channels_last:
                mlp_triton.mlp_forward(_as_ncdhw(x), _as_ncdhw(out), weights, biases, activation)
            else:
                mlp_triton.mlp_forward(x, out, weights, biases, activation)
        elif out.numel():
            mlp_torch.mlp_forward(
                _channels_first(x, channels_last),
                _channels_first(out, channels_last),
                weights,
                biases,
                activation,
                matmul_dtype,
            )
        ctx.save_for_backward(x, *params)
        ctx.meta = (activation, channels_last, n_layers)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        activation, channels_last, n_layers = ctx.meta
        x, *params = ctx.saved_tensors
        weights, biases = params[:n_layers], params[n_layers:]
        grad_x = (
            torch.empty(x.shape, dtype=x.dtype, device=x.device)
            if ctx.needs_input_grad[0]
            else None
        )
        gw, gb = mlp_torch.mlp_backward(
            _channels_first(x, channels_last),
            _channels_first(grad_out, channels_last),
            weights,
            biases,
            activation,
            _channels_first(grad_x, channels_last),
        )
        return (grad_x, None, None, None, None, None, *gw, *gb)


def voxel_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation: str = "relu",
    *,
    channels_last: bool = False,
    backend: str = "auto",
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Apply an MLP to the channel vector of every voxel, all layers fused.

    Parameters
    ----------
    x : Tensor ``(N, C, D, H, W)``, or ``(..., C)`` with ``channels_last=True``
        Any strides. float32 or float64; float16/bfloat16 are accepted and computed in float32.
    weights : list of Tensor ``(out_l, in_l)``
        ``in_0 == C`` and ``in_l == out_{l-1}``; the last ``out`` is ``K``.
    biases : list of Tensor ``(out_l,)``
    activation : {"relu", "gelu", "silu", "tanh", "sigmoid", "identity"}
        Applied between layers, not after the last one. ``gelu`` is the exact (erf) form.
    channels_last : bool
        Read ``x`` as ``(..., C)`` (for example ``(X, Y, Z, n)``) and return ``(..., K)``.
    backend : {"auto", "triton", "torch"}
        ``auto``: the fused Triton kernel for CUDA tensors when triton imports, else the blocked
        torch path (cache-sized blocks; peak extra memory independent of the volume size).
    matmul_dtype : None or ``torch.bfloat16``
        ``torch.bfloat16``: every layer runs on bfloat16 copies of its input, weights and
        bias (products accumulated in float32, each layer's output rounded to bfloat16); the
        result is float32. oneDNN runs these about 1.6x faster than float32 on CPUs with
        matrix units (AMX: ``benchmarks/results/mlp-cpu.md``); outputs differ from float32's
        by bfloat16's rounding (relative ~4e-3). For inference only: the torch path, float32
        inputs and parameters, no gradient wanted; else ``ValueError``. None (default): the
        parameters' dtype throughout.

    Returns
    -------
    Tensor ``(N, K, D, H, W)`` or ``(..., K)``, contiguous; float32 (float64 when ``x`` or a
    parameter is float64). Differentiable in ``x``, ``weights`` and ``biases``.

    Non-finite values
    -----------------
    Voxels are independent. A voxel with NaN among its input features gets NaN in every
    output, on every path (oneDNN's fused layers, the blocked ``addmm`` path and the Triton
    kernel), as ``nn.Sequential`` gives. +-inf inputs and layers that overflow follow IEEE
    arithmetic as the same layers do in torch: an output is non-finite wherever
    ``nn.Sequential``'s is (the Triton kernel may give inf where torch gives NaN, e.g. exact
    GELU of +inf), and only what makes it finite in torch, a saturating activation (tanh,
    sigmoid, ReLU of -inf), makes it finite here. Nothing is checked or raised for them.
    (Finite inputs near the float32 limit may overflow in torch's ops and not in the Triton
    kernel's: torch's GELU gives inf above ~1.7e38.)

    Raises
    ------
    ValueError
        Wrong number of dimensions, a dimension of size 0 (no voxels or no channels), channel
        count not matching ``weights[0]``, a layer of 0 units, mismatched layer shapes,
        non-float dtypes, unknown activation or backend, tensors on different devices.
    """
    _validate(x, weights, biases, activation, channels_last)
    params = [*weights, *biases]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in [x, *params]) else torch.float32
    params = [p.to(dtype) for p in params]
    if matmul_dtype is not None:
        _check_matmul_dtype(matmul_dtype, dtype, backend, [x, *params])
        backend = "torch"
    chosen = resolve_backend(
        backend,
        x.device,
        op="voxel_mlp",
        triton_unsupported=_fused_unsupported(params[: len(weights)], dtype, x.device),
    )
    return _VoxelMLPFunction.apply(
        x, activation, channels_last, chosen, len(weights), matmul_dtype, *params
    )


def _check_matmul_dtype(matmul_dtype, dtype, backend: str, tensors) -> None:
    """``ValueError`` unless ``voxel_mlp``'s ``matmul_dtype`` can be honoured: bfloat16, float32
    parameters, the torch path, no gradient wanted."""
    if matmul_dtype != torch.bfloat16:
        raise ValueError(
            f"voxel_mlp: matmul_dtype must be None or torch.bfloat16, got {matmul_dtype!r}"
        )
    if dtype != torch.float32:
        raise ValueError("voxel_mlp: matmul_dtype=torch.bfloat16 needs float32 inputs and parameters")
    if backend == "triton":
        raise ValueError(
            "voxel_mlp: matmul_dtype=torch.bfloat16 runs on the torch path only; pass "
            'backend="torch" or "auto"'
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(
            "voxel_mlp: matmul_dtype=torch.bfloat16 is for inference; run it under "
            "torch.no_grad() or leave matmul_dtype None to train"
        )
