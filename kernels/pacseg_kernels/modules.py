"""``nn.Module`` faces of the ops: VoxelMLP, PacConv3d, PacCRF3d, MaxUnpool3d."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .checks import is_int, odd_kernel, short_repr, triple
from .crf import check_crf_params, pac_crf3d
from .mlp import ACTIVATIONS, voxel_mlp
from .pac import pac3d
from .unpool import max_unpool3d

_ACTIVATION_MODULES = {
    nn.ReLU: "relu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Identity: "identity",
}


class VoxelMLP(nn.Module):
    """A per-voxel MLP (stacked ``nn.Linear`` layers) applied with the fused ``voxel_mlp`` op.

    Parameters
    ----------
    in_channels : int
        Features per voxel, ``C``.
    hidden : sequence of int
        Widths of the hidden layers (may be empty: one linear layer).
    out_channels : int
        Outputs per voxel, ``K``.
    activation : str
        One of ``pacseg_kernels.mlp.ACTIVATIONS``, applied between layers.
    channels_last : bool
        Inputs are ``(..., C)`` instead of ``(N, C, D, H, W)``.
    backend : {"auto", "triton", "torch"}

    Shape
    -----
    Input ``(N, C, D, H, W)`` (or ``(..., C)``), output ``(N, K, D, H, W)`` (or ``(..., K)``).
    The parameters are ``layers[i].weight`` / ``layers[i].bias`` as in ``nn.Linear``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: Sequence[int],
        out_channels: int,
        activation: str = "relu",
        *,
        channels_last: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"VoxelMLP: unknown activation {activation!r}; choose one of {ACTIVATIONS}"
            )
        if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
            raise ValueError(
                f"VoxelMLP: hidden must be a sequence of ints (widths of the hidden layers), got "
                f"{short_repr(hidden)}"
            )
        widths = [in_channels, *hidden, out_channels]
        if not all(is_int(w) and w >= 1 for w in widths):
            raise ValueError(
                f"VoxelMLP: every width (in_channels, hidden, out_channels) must be an int >= 1, "
                f"got {short_repr(widths)}"
            )
        widths = [int(w) for w in widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.activation = activation
        self.channels_last = channels_last
        self.backend = backend

    def forward(self, x: torch.Tensor, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``voxel_mlp`` of ``x`` with this module's layers (``matmul_dtype`` as there)."""
        return voxel_mlp(
            x,
            [layer.weight for layer in self.layers],
            [layer.bias for layer in self.layers],
            self.activation,
            channels_last=self.channels_last,
            backend=self.backend,
            matmul_dtype=matmul_dtype,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, channels_last={self.channels_last}"

    @classmethod
    def _from_layers(cls, weights, biases, activation, **kwargs) -> VoxelMLP:
        widths = [weights[0].shape[1]] + [w.shape[0] for w in weights]
        for i, (w, b) in enumerate(zip(weights, biases)):
            if w.shape[1] != widths[i]:
                raise ValueError(
                    f"VoxelMLP: layer {i} has weight {tuple(w.shape)} but layer {i - 1} "
                    f"outputs {widths[i]} features; the Linear layers do not chain"
                )
            if b is not None and tuple(b.shape) != (w.shape[0],):
                raise ValueError(
                    f"VoxelMLP: layer {i} has bias {tuple(b.shape)} for weight {tuple(w.shape)}"
                )
        model = cls(widths[0], widths[1:-1], widths[-1], activation, **kwargs)
        with torch.no_grad():
            for layer, w, b in zip(model.layers, weights, biases):
                layer.weight.copy_(w)
                if b is None:
                    layer.bias.zero_()
                else:
                    layer.bias.copy_(b)
        return model

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, **kwargs) -> VoxelMLP:
        """Build from ``nn.Sequential(Linear, act, Linear, act, ..., Linear)``.

        The activation modules must all be of one kind (``ReLU``, ``GELU()`` exact, ``SiLU``,
        ``Tanh``, ``Sigmoid`` or ``Identity``); keyword arguments go to the constructor.
        """
        linears, acts = [], []
        for i, module in enumerate(seq):
            if isinstance(module, nn.Linear):
                if len(linears) != len(acts):
                    raise ValueError(
                        f"VoxelMLP.from_sequential: module {i} is a second Linear in a row"
                    )
                linears.append(module)
            elif type(module) in _ACTIVATION_MODULES:
                if len(linears) != len(acts) + 1:
                    raise ValueError(
                        f"VoxelMLP.from_sequential: module {i} ({type(module).__name__}) "
                        "must follow a Linear"
                    )
                if isinstance(module, nn.GELU) and module.approximate != "none":
                    raise ValueError(
                        "VoxelMLP.from_sequential: GELU(approximate='tanh') is not supported; "
                        "use the exact GELU()"
                    )
                acts.append(_ACTIVATION_MODULES[type(module)])
            else:
                raise ValueError(
                    f"VoxelMLP.from_sequential: module {i} is {type(module).__name__}; only "
                    "Linear layers and activations "
                    f"({', '.join(t.__name__ for t in _ACTIVATION_MODULES)}) are supported"
                )
        if not linears or len(acts) != len(linears) - 1:
            raise ValueError(
                "VoxelMLP.from_sequential: expected Linear, activation, ..., Linear "
                f"(found {len(linears)} Linear and {len(acts)} activation modules)"
            )
        if len(set(acts)) > 1:
            raise ValueError(f"VoxelMLP.from_sequential: mixed activations {acts}; use one kind")
        activation = acts[0] if acts else kwargs.pop("activation", "relu")
        kwargs.pop("activation", None)
        return cls._from_layers(
            [m.weight.detach() for m in linears],
            [None if m.bias is None else m.bias.detach() for m in linears],
            activation,
            **kwargs,
        )

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], activation: str = "relu", **kwargs
    ) -> VoxelMLP:
        """Build from the state dict of stacked ``nn.Linear`` layers, in the dict's order.

        Keys are ``<prefix>.weight`` (2-D) with an optional ``<prefix>.bias`` (1-D), as written
        by ``nn.Sequential(...).state_dict()`` or a module with ``fc1``, ``fc2``, ... attributes.
        The activation between layers is not stored in a state dict: give it here.
        """
        weights, biases = [], []
        prefixes = []
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"VoxelMLP.from_state_dict: {key!r} is not a tensor")
            prefix, _, kind = key.rpartition(".")
            if kind == "weight":
                if value.ndim != 2:
                    raise ValueError(
                        f"VoxelMLP.from_state_dict: {key!r} has shape {tuple(value.shape)}; "
                        "only Linear (2-D) weights are supported"
                    )
                prefixes.append(prefix)
                weights.append(value)
            elif kind != "bias":
                raise ValueError(
                    f"VoxelMLP.from_state_dict: unexpected key {key!r}; only '<layer>.weight' and "
                    "'<layer>.bias' of Linear layers are supported"
                )
        if not weights:
            raise ValueError("VoxelMLP.from_state_dict: no '<layer>.weight' entries found")
        for prefix in prefixes:
            bias = state_dict.get(f"{prefix}.bias" if prefix else "bias")
            biases.append(bias)
        known = {f"{p}.{k}" if p else k for p in prefixes for k in ("weight", "bias")}
        orphans = [k for k in state_dict if k not in known]
        if orphans:
            raise ValueError(f"VoxelMLP.from_state_dict: biases without a weight: {orphans}")
        return cls._from_layers(weights, biases, activation, **kwargs)


class PacConv3d(nn.Module):
    """Pixel-adaptive 3D convolution with a learned filter; ``nn.Conv3d``-like constructor.

    ``forward(input, guide)``: input ``(N, C_in, D, H, W)``, guide ``(N, F, D, H, W)`` ->
    ``(N, C_out, D_out, H_out, W_out)`` (see ``pacseg_kernels.pac3d``). The weight
    ``(C_out, C_in // groups, kd, kh, kw)`` and bias are initialised as in ``nn.Conv3d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        normalize: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        op = "PacConv3d"
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
        ):
            if not is_int(value) or value < 1:
                raise ValueError(f"{op}: {name} must be an int >= 1, got {short_repr(value)}")
        kernel = odd_kernel(kernel_size, op)
        for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
            triple(value, name, op)
        if bias not in (True, False) or normalize not in (True, False):
            raise ValueError(
                f"{op}: bias and normalize must be True or False, got {short_repr(bias)}, "
                f"{short_repr(normalize)}"
            )
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"PacConv3d: groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        # Borrow nn.Conv3d's initialisation so a PacConv3d starts like the conv it generalises.
        ref = nn.Conv3d(in_channels, out_channels, kernel, groups=groups, bias=bias)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.normalize, self.backend = groups, normalize, backend

    def forward(self, input: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return pac3d(
            input,
            guide,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            normalize=self.normalize,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        c_out, c_in_g, *k = self.weight.shape
        return (
            f"{c_in_g * self.groups}, {c_out}, kernel_size={tuple(k)}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, normalize={self.normalize}"
        )


class PacCRF3d(nn.Module):
    """Mean-field refinement layer: ``forward(unary, guide)`` -> refined logits (``pac_crf3d``)."""

    def __init__(
        self,
        iterations: int = 5,
        kernel_size=5,
        dilation=1,
        compat: float = 1.0,
        spatial_sigma=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_crf_params(iterations, kernel_size, dilation, compat, spatial_sigma, "PacCRF3d")
        self.iterations, self.kernel_size, self.dilation = iterations, kernel_size, dilation
        self.compat, self.spatial_sigma, self.backend = compat, spatial_sigma, backend

    def forward(self, unary: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return pac_crf3d(
            unary,
            guide,
            iterations=self.iterations,
            kernel_size=self.kernel_size,
            dilation=self.dilation,
            compat=self.compat,
            spatial_sigma=self.spatial_sigma,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"iterations={self.iterations}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"compat={self.compat}, spatial_sigma={self.spatial_sigma}"
        )


class MaxUnpool3d(nn.Module):
    """``nn.MaxUnpool3d`` with the deterministic ``pacseg_kernels.max_unpool3d``.

    ``forward(values, indices, output_size=None)``: ``(N, C, D, H, W)`` values and their int64
    indices (from ``max_pool3d_with_indices``) -> ``(N, C, D_out, H_out, W_out)``.
    """

    def __init__(self, kernel_size, stride=None, padding=0, *, backend: str = "auto") -> None:
        super().__init__()
        for name, value in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding)):
            if value is not None or name != "stride":
                triple(value, name, "MaxUnpool3d")
        self.kernel_size, self.stride, self.padding, self.backend = (
            kernel_size,
            stride,
            padding,
            backend,
        )

    def forward(
        self, values: torch.Tensor, indices: torch.Tensor, output_size=None
    ) -> torch.Tensor:
        return max_unpool3d(
            values,
            indices,
            self.kernel_size,
            self.stride,
            self.padding,
            output_size,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
