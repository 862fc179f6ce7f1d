"""napari-pacseg: interactive volumetric segmentation for napari with PAC refinement.

The public API is loaded on first use (``from napari_pacseg import segment`` works as ever):
importing a submodule, such as the ``pacseg`` command's, then costs no torch import until the
command needs it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from napari_pacseg._version import __version__

_EXPORTS = {  # name -> the module that defines it
    "SegmentRequest": "engine.request",
    **dict.fromkeys(
        ["Segmentation", "SegmentationCancelled", "image_range", "receptive_field", "segment",
         "volume_intensity_range", "volume_noise_level"], "engine.segment",
    ),
    **dict.fromkeys(["instance_labels", "object_table"], "instances.labels"),
    **dict.fromkeys(
        ["ModelFileError", "ModelFileWarning", "import_torch_mlp", "load_model", "save_model"],
        "io.model_file",
    ),
    **dict.fromkeys(["ClassInfo", "labels_from_probabilities"], "model.classes"),
    **dict.fromkeys(["FeatureSpec", "compute_features"], "model.features"),
    **dict.fromkeys(
        ["ContextConfig", "HeadConfig", "InstanceConfig", "ModelConfig", "PacSegModel",
         "RefineConfig"], "model.network",
    ),
    "Normalisation": "model.normalise",
    "train": "training.fit",
}  # fmt: skip


def __getattr__(name: str):
    """A public name, imported from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_pacseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"napari_pacseg.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # the same names, for type checkers and readers
    from napari_pacseg.engine.request import SegmentRequest
    from napari_pacseg.engine.segment import (
        Segmentation,
        SegmentationCancelled,
        image_range,
        receptive_field,
        segment,
        volume_intensity_range,
        volume_noise_level,
    )
    from napari_pacseg.instances.labels import instance_labels, object_table
    from napari_pacseg.io.model_file import (
        ModelFileError,
        ModelFileWarning,
        import_torch_mlp,
        load_model,
        save_model,
    )
    from napari_pacseg.model.classes import ClassInfo, labels_from_probabilities
    from napari_pacseg.model.features import FeatureSpec, compute_features
    from napari_pacseg.model.network import (
        ContextConfig,
        HeadConfig,
        InstanceConfig,
        ModelConfig,
        PacSegModel,
        RefineConfig,
    )
    from napari_pacseg.model.normalise import Normalisation
    from napari_pacseg.training.fit import train

__all__ = [
    "ClassInfo",
    "ContextConfig",
    "FeatureSpec",
    "HeadConfig",
    "InstanceConfig",
    "ModelConfig",
    "ModelFileError",
    "ModelFileWarning",
    "Normalisation",
    "PacSegModel",
    "RefineConfig",
    "SegmentRequest",
    "Segmentation",
    "SegmentationCancelled",
    "__version__",
    "compute_features",
    "image_range",
    "import_torch_mlp",
    "instance_labels",
    "labels_from_probabilities",
    "load_model",
    "object_table",
    "receptive_field",
    "save_model",
    "segment",
    "train",
    "volume_intensity_range",
    "volume_noise_level",
]
