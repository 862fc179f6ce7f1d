"""What a model is, for a person and for a program: the lines ``pacseg info`` prints and the
widget's model box shows, and the JSON-able summary behind them (``pacseg info --json``).

Headless: no napari, Qt or magicgui.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from napari_pacseg.model.classes import label_values, scribble_values
from napari_pacseg.model.network import PacSegModel


def model_summary(model: PacSegModel, path: str | Path | None = None) -> dict:
    """JSON-able description of ``model``: with ``path`` (its file) the path and the file's
    sha256 first, then ``ndim`` (2: a model of 2D images, 3: of volumes), ``config``,
    ``n_features``, ``grid`` and ``receptive_field`` (voxels ``(z, y, x)``, ``(y, x)`` for a 2D
    model, with and without refinement; a text when the default refinement is not usable)."""
    from napari_pacseg.engine.segment import receptive_field
    from napari_pacseg.io.model_file import config_to_dict
    from napari_pacseg.io.provenance import sha256_file

    try:
        refined = list(receptive_field(model))
    except ValueError as err:  # default refinement over the work limits: say so, still describe
        refined = f"not usable: {err}"
    head = {} if path is None else {"path": str(path), "sha256": sha256_file(path)}
    return {
        **head,
        "ndim": model.config.ndim,
        "config": config_to_dict(model.config),
        "n_features": model.config.n_features,
        "grid": model.grid,
        "receptive_field": {
            "refined": refined,
            "unrefined": list(receptive_field(model, refine=False)),
        },
    }


def model_lines(model: PacSegModel, summary: dict | None = None, source: str = "") -> list[str]:
    """The description of ``model`` as lines: file and checksum (when ``summary`` has them),
    ``source`` (where the model came from, when given), channels, classes with their label
    values, features, head, context net, refinement and instance defaults, training spacing, halo
    (receptive field) and provenance. ``summary`` is ``model_summary(model, ...)`` (made
    without a file when not given). Lines are not escaped: a terminal needs ``checks.printable``."""
    from napari_pacseg.engine.request import objects_refine

    info = model_summary(model) if summary is None else summary
    cfg = model.config
    # a volume model whose objects are cells refines them at its split_fit (objects_refine)
    cells = objects_refine(cfg.refine, cfg.instances, cfg.ndim)
    cells_fit = "" if cells == cfg.refine else f"   (cells, --instances: fit_weight={cells.fit_weight})"
    values = label_values(cfg.n_classes)
    lines = []
    if "path" in info:
        lines += [f"model        {info['path']}", f"sha256       {info['sha256']}"]
    if source:
        lines.append(f"source       {source}")
    axes = "(y, x)" if cfg.ndim == 2 else "(z, y, x)"
    lines += [
        "kind         " + (
            "2D: segments 2D images (H, W); a stack of frames with frame_axis / --frames"
            if cfg.ndim == 2 else "3D: segments volumes (D, H, W)"
        ),
        f"channels     {cfg.in_channels}",
        "classes      " + ", ".join(
            f"{v}={c.name}" for v, c in zip(values, cfg.classes)
        ) + "   (label values)",
        "scribbles    " + ", ".join(
            f"{v}={c.name}" for v, c in zip(scribble_values(cfg.n_classes), cfg.classes)
        ) + "   (values to paint; 0 = unlabelled)",
        f"features     {', '.join(cfg.features.kinds) or '-'} at sigmas {list(cfg.features.sigmas)}"
        f"{' + raw' if cfg.features.include_raw else ''} ({cfg.n_features} per voxel)",
        f"head         MLP hidden {list(cfg.head.hidden)}, {cfg.head.activation}",
        f"context      {'none' if cfg.context is None else dataclasses.asdict(cfg.context)}",
        "refine       " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.refine).items())
        + cells_fit,
        "instances    " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.instances).items())
        + "   (segment --instances)",
        "intensities  " + _normalisation_text(cfg.normalisation),
        f"spacing      {cfg.in_plane_spacing} {axes}: the "
        f"{'pixel' if cfg.ndim == 2 else 'voxel'} size it was trained at",
        f"halo         {_halo_text(info['receptive_field']['refined'], axes)} with refinement, "
        f"{_halo_text(info['receptive_field']['unrefined'], axes)} without",
    ]  # fmt: skip
    lines += ["provenance"] + [f"  {k}: {v}" for k, v in sorted(cfg.provenance.items())]
    return lines


def model_headline(model: PacSegModel, source: str = "") -> str:
    """Two short lines for a small box: the kind, channels and classes with their label
    values, then ``source`` (where it came from) when given."""
    cfg = model.config
    values = label_values(cfg.n_classes)
    classes = ", ".join(f"{v}={c.name}" for v, c in zip(values, cfg.classes))
    kind = "2D images" if cfg.ndim == 2 else "volumes"
    ctx = ", context net" if cfg.context is not None else ""
    head = f"{cfg.ndim}D model ({kind}), {cfg.in_channels} channel(s){ctx}; classes {classes}"
    return head + (f"\n{source}" if source else "")


def describe_model(model: PacSegModel, source: str = "") -> str:
    """``model_lines`` of ``model`` (no file checksum) as one text, for the widget's model box."""
    return "\n".join(model_lines(model, source=source))


def _normalisation_text(norm) -> str:
    """How the model scales each image's intensities, in one line."""
    if norm is None:
        return (
            "each image by its own 1-99.8 percentile range, unclipped (a file from before the "
            "training contrast was stored: retrain it to store one)"
        )
    floor = (
        "" if norm.min_contrast is None else
        ", or at least " + ", ".join(f"{v:.3g}" for v in norm.min_contrast)
        + " noise levels wide (an image without objects stays background)"
    )  # fmt: skip
    return f"each image by its own 1-99.8 percentile range{floor}; clipped to {list(norm.clip)}"


def _halo_text(halo, axes: str) -> str:
    return halo if isinstance(halo, str) else f"{tuple(halo)} voxels {axes}"
