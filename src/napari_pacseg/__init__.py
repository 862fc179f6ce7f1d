"""napari-pacseg: interactive volumetric segmentation for napari with PAC refinement."""

from ._version import __version__
from .classes import ClassInfo, labels_from_probabilities
from .features import FeatureSpec, compute_features
from .instances import instance_labels, object_table
from .model import (
    ContextConfig,
    HeadConfig,
    InstanceConfig,
    ModelConfig,
    PacSegModel,
    RefineConfig,
)
from .model_io import (
    ModelFileError,
    ModelFileWarning,
    import_torch_mlp,
    load_model,
    save_model,
)
from .normalise import Normalisation
from .pipeline import (
    Segmentation,
    SegmentationCancelled,
    image_range,
    receptive_field,
    segment,
    volume_intensity_range,
    volume_noise_level,
)
from .training import train

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
