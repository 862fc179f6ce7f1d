"""napari-pacseg: interactive volumetric segmentation for napari with PAC refinement."""

from napari_pacseg._version import __version__
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
