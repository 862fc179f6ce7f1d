"""Importing a plain PyTorch MLP: a state dict of stacked ``nn.Linear`` layers (a ``.pt`` file
or the mapping itself) as the head of a ``PacSegModel``.

A file is read with ``torch.load(..., weights_only=True)`` only, so a pickle that would run code
is refused, never executed. The weights are checked (string keys, dense float tensors of 1 to
``MAX_WIDTH`` features, at most ``MAX_LAYERS`` layers, finite in float32) before
``VoxelMLP.from_state_dict`` sees them; every refusal is a one-line ``ValueError``.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from napari_pacseg.checks import one_line, printable, short_repr
from napari_pacseg.model.classes import class_infos
from napari_pacseg.model.features import FeatureSpec
from napari_pacseg.model.network import (
    MAX_LAYERS,
    MAX_WIDTH,
    HeadConfig,
    ModelConfig,
    PacSegModel,
    RefineConfig,
)
from pacseg_kernels import VoxelMLP


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return one_line(lines[0], 200) if lines else type(err).__name__


def _checked_state(state, source: str) -> dict[str, torch.Tensor]:
    """``state`` as float32 CPU tensors, refusing what ``VoxelMLP.from_state_dict`` cannot
    take or should not: non-string keys, non-tensors, non-float or sparse tensors, empty or
    over-wide dimensions, too many layers, NaN/inf (after the float32 conversion)."""
    if not isinstance(state, Mapping):
        raise ValueError(
            f"import_torch_mlp: expected a state dict (name -> tensor), got {type(state).__name__}"
        )
    if not state:
        raise ValueError(
            f"import_torch_mlp: {source} holds an empty state dict (no Linear layers); save the "
            "model with torch.save(model.state_dict(), path)"
        )
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(
                f"import_torch_mlp: {source} has the key {short_repr(key)}, not a string; expected "
                "the state dict of stacked nn.Linear layers"
            )
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"import_torch_mlp: {short_repr(key)} in {source} is a {type(value).__name__}, not a "
                "tensor (a checkpoint? pass its model state dict, e.g. checkpoint['state_dict'])"
            )
        if value.layout != torch.strided or value.is_complex() or not value.is_floating_point():
            raise ValueError(
                f"import_torch_mlp: {short_repr(key)} is a {value.dtype} {value.layout} tensor; "
                "dense floating-point weights expected"
            )
        if value.device.type == "meta":
            raise ValueError(f"import_torch_mlp: {short_repr(key)} is a meta tensor (no data)")
        if value.ndim not in (1, 2) or not all(1 <= s <= MAX_WIDTH for s in value.shape):
            raise ValueError(
                f"import_torch_mlp: {short_repr(key)} has shape {tuple(value.shape)}; Linear weights "
                f"(2-D) and biases (1-D) of 1 to {MAX_WIDTH} features expected"
            )
        t = value.detach().to("cpu", torch.float32).clone()
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"import_torch_mlp: {short_repr(key)} holds NaN or infinite values (in float32)"
            )
        out[key] = t
    layers = sum(t.ndim == 2 for t in out.values())
    if layers > MAX_LAYERS:
        raise ValueError(
            f"import_torch_mlp: {layers} Linear layers; at most {MAX_LAYERS} are supported"
        )
    return out


def import_torch_mlp(
    path_or_state_dict,
    *,
    features: FeatureSpec,
    classes,
    activation: str = "relu",
    in_channels: int = 1,
    spacing=(1.0, 1.0, 1.0),
    refine: RefineConfig | None = None,
) -> PacSegModel:
    """Turn a state dict of stacked ``nn.Linear`` layers into a ``PacSegModel``.

    Parameters
    ----------
    path_or_state_dict : str, Path or mapping
        A ``.pt``/``.pth`` file, read with ``torch.load(..., weights_only=True)`` only (a pickle
        that would run code is refused, never executed), or the state dict itself.
    features : FeatureSpec
        The features the MLP was trained on, in ``FeatureSpec.names()`` order per channel.
    classes : names or ``ClassInfo`` of the MLP's outputs, background first.

    Raises ``ValueError`` with a one-line reason for anything else: an empty or unreadable
    file, an empty state dict, entries that are not Linear weights, NaN/inf weights.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        source = printable(path.name or str(path))  # the name, escaped when unprintable
        if path.suffix not in (".pt", ".pth"):
            raise ValueError(f"import_torch_mlp: expected a .pt or .pth file, got {source}")
        if path.is_dir():
            raise ValueError(f"import_torch_mlp: {source} is a folder, not a .pt file")
        if not path.is_file():
            raise ValueError(f"import_torch_mlp: {path}: no such file")
        if path.stat().st_size == 0:
            raise ValueError(f"import_torch_mlp: {source} is empty (0 bytes)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"import_torch_mlp: {source} could not be loaded as plain tensors "
                f"(torch.load with weights_only=True refused it: {_first_line(err)}); "
                "save the model with torch.save(model.state_dict(), path)"
            ) from err
    else:
        state, source = path_or_state_dict, "the state dict"
    state = _checked_state(state, source)
    try:
        mlp = VoxelMLP.from_state_dict(state, activation=activation)
    except (ValueError, TypeError, RuntimeError, IndexError, KeyError) as err:
        reason = re.sub(r"^VoxelMLP(\.from_state_dict)?: ", "", _first_line(err))
        raise ValueError(f"import_torch_mlp: {reason}") from None
    infos = class_infos(classes, "import_torch_mlp")
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, Iterable):
        raise ValueError(
            f"import_torch_mlp: spacing must be 3 numbers (z, y, x), got {short_repr(spacing)}"
        )
    spacing = tuple(spacing)
    if not all(
        isinstance(s, numbers.Real) and not isinstance(s, (bool, np.bool_)) for s in spacing
    ):
        raise ValueError(
            f"import_torch_mlp: spacing must be 3 numbers (z, y, x), got {short_repr(spacing)}"
        )
    widths = [mlp.layers[0].in_features] + [layer.out_features for layer in mlp.layers]
    config = ModelConfig(
        in_channels=in_channels,
        classes=infos,
        features=features,
        head=HeadConfig(tuple(widths[1:-1]), activation),
        refine=refine or RefineConfig(),
        spacing=tuple(float(s) for s in spacing),
        provenance={"source": "import_torch_mlp"},
    )
    if widths[0] != config.n_features:
        raise ValueError(
            f"import_torch_mlp: the MLP takes {widths[0]} inputs but the feature spec gives {config.n_features} "
            f"features per voxel ({in_channels} channel(s) x {features.names()})"
        )
    if widths[-1] != len(infos):
        raise ValueError(
            f"import_torch_mlp: the MLP has {widths[-1]} outputs but {len(infos)} classes were given"
        )
    model = PacSegModel(config)
    model.head.load_state_dict(mlp.state_dict())
    return model.eval()
