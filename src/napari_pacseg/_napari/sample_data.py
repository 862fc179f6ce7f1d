"""napari sample data: the bundled nuclei volume, its ground truth (classes and instances)
and its scribbles."""

from __future__ import annotations

from napari_pacseg._napari.layers import class_colormap, class_features, scribble_styling
from napari_pacseg.sample import load_sample, load_sample_2d

SAMPLE_CLASSES = ("background", "nucleus")


def make_sample_data() -> list[tuple]:
    """Layer data tuples: the image (``scale`` = voxel spacing in um), the ground truth as a
    Labels layer (1 = nucleus; hidden at first), the instance truth (one id per nucleus;
    hidden) and the scribbles as a Labels layer
    (1 background, 2 nucleus) that the widget's Train button takes as is."""
    return _layers_of(load_sample(), "nuclei")


def make_sample_data_2d() -> list[tuple]:
    """The same layers for the 2D sample (``sample.load_sample_2d``: a plane of the volume),
    named "nuclei 2D ..."."""
    return _layers_of(load_sample_2d(), "nuclei 2D")


def _layers_of(sample, name: str) -> list[tuple]:
    scale = sample.spacing
    return [
        (sample.image, {"name": name, "scale": scale}, "image"),
        (
            sample.truth.astype("uint8"),
            {
                "name": f"{name} ground truth",
                "scale": scale,
                "opacity": 0.4,
                "visible": False,
                "features": class_features(["nucleus"], [1], zero="background"),
                "colormap": class_colormap([(0.2, 0.9, 0.9, 1.0)], [1]),
            },
            "labels",
        ),
        (
            sample.instances,
            {"name": f"{name} instance truth", "scale": scale, "opacity": 0.5, "visible": False},
            "labels",
        ),
        (
            sample.scribbles,
            {"name": f"{name} scribbles", "scale": scale, **scribble_styling(SAMPLE_CLASSES)},
            "labels",
        ),
    ]
