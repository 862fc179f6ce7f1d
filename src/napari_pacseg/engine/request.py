"""``SegmentRequest``: what a segmentation is asked to do, resolved and checked once.

``segment``, the file and zarr runs, every chunk job and the napari session take one; public
functions build it from their keywords (``SegmentRequest.build``) or accept it as it is. What
depends on the image (its intensity range, noise level, shape) is not in it: ``engine.plan``
adds that per image.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from dataclasses import dataclass
from functools import cached_property

import torch

from napari_pacseg.checks import check_ints, resolve_device
from napari_pacseg.instances.cells import boundary_label
from napari_pacseg.instances.labels import instance_config
from napari_pacseg.io.model_file import ModelPayload, load_model, model_from_bytes
from napari_pacseg.model.classes import DEFAULT_THRESHOLD, check_output_rule
from napari_pacseg.model.network import InstanceConfig, PacSegModel, RefineConfig, with_overrides

CPU = torch.device("cpu")
PRECISIONS = ("auto", "float32")


def objects_refine(
    refine: RefineConfig | None, objects: InstanceConfig | None, ndim: int = 3
) -> RefineConfig | None:
    """The refinement a request of a model of ``ndim`` for ``objects`` runs: ``refine``,
    except for a volume model (``ndim`` 3) in cells mode (``objects.boundary``) with a
    ``split_fit`` and a refinement with a local fit, whose fit then weighs ``split_fit``.
    Cells mode draws its labels on the cells (``cells.boundary_on_cells``), so one refinement
    serves both: the stronger fit judges each voxel against its surroundings and keeps the dim
    membranes between cells that a moderate fit lets the interiors cross
    (``benchmarks/results/realdata-cpu.md``), where blobs mode runs a second one to seed its
    objects (``engine.plan.seeding_fit``). 2D models keep their fit: no 2D membrane image
    measured it, and in a plane a strong fit grows dim out-of-focus blobs."""
    if refine is None or objects is None or objects.boundary is None or ndim != 3:
        return refine
    if not objects.split_fit or not refine.fit_weight:
        return refine
    return dataclasses.replace(refine, fit_weight=objects.split_fit)


@functools.cache
def cpu_has_amx() -> bool:
    """True where this CPU has AMX tiles and this torch's oneDNN runs bfloat16 on them."""
    try:
        return bool(torch.cpu._is_amx_tile_supported()) and bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):  # private probes missing in another torch
        return False


@dataclass(frozen=True)
class SegmentRequest:
    """Every choice of a segmentation that does not depend on the image.

    model : the model (``build`` also takes the path of a model file).
    refine : the ``RefineConfig`` to run, None for no refinement.
    instances : the ``InstanceConfig`` of the objects to separate, None for none.
    threshold, background : the label rule (``classes.labels_from_probabilities``).
    device : where the stages run.
    tile_shape : core tile ``(D, H, W)`` of both passes (a 2D model's ``(h, w)`` as ``(1, h,
        w)``), None for the engine's own.
    spacing : the voxel size given, ``(z, y, x)`` (a 2D model's ``(y, x)``; checked by
        ``ModelConfig.volume_spacing``), None for the image's own (a file's metadata) or else
        the model's training spacing.
    channel_axis, frame_axis : the image's channel and frame axes as given, None for none.
    precision : "auto" (the head's products in bfloat16 where the CPU has AMX matrix units:
        ``head_dtype``) or "float32".

    A request pickles with its model as the bytes of its model file (``ModelPayload``), so a
    dask worker rebuilds it with every check of ``load_model`` and no code is unpickled.
    """

    model: PacSegModel
    refine: RefineConfig | None = None
    instances: InstanceConfig | None = None
    threshold: float = DEFAULT_THRESHOLD
    background: int = 0
    device: torch.device = CPU
    tile_shape: tuple[int, int, int] | None = None
    spacing: tuple[float, ...] | None = None
    channel_axis: int | None = None
    frame_axis: int | None = None
    precision: str = "auto"

    @classmethod
    def build(
        cls,
        model,
        *,
        refine=True,
        instances=False,
        threshold: float = DEFAULT_THRESHOLD,
        background: int = 0,
        device="auto",
        tile_shape=None,
        spacing=None,
        channel_axis: int | None = None,
        frame_axis: int | None = None,
        precision: str = "auto",
    ) -> SegmentRequest:
        """The request of ``segment``'s keywords, each resolved and checked: ``refine`` True
        (the model's defaults), False, a ``RefineConfig`` or a dict of overrides (0 iterations:
        none); ``instances`` likewise for ``InstanceConfig`` (default False); ``device``
        "auto", "cpu", "cuda:1", ...; ``tile_shape`` 3 numbers (a 2D model: 2); ``spacing``
        ``(z, y, x)`` (a 2D model: ``(y, x)``); ``precision`` "auto" or "float32".
        ``ValueError``/``TypeError`` naming the argument at the first that is wrong."""
        model = as_model(model)
        config = model.config
        params = None if refine is False else with_overrides(config.refine, refine, "refine")
        if params is not None and not params.iterations:
            params = None
        threshold, background = check_output_rule(threshold, background, config.n_classes)
        if tile_shape is not None:
            if config.ndim == 2:
                tile_shape = (1, *check_ints(tile_shape, 2, "tile_shape (h, w)", 1, 1 << 20))
            tile_shape = check_ints(tile_shape, 3, "tile_shape", 1, 1 << 20)
        if spacing is not None:
            config.volume_spacing(spacing)  # checked here; kept as given (2D images: (y, x))
            spacing = tuple(float(s) for s in spacing)
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got "
                f"{precision!r}"
            )
        objects = instance_config(config.instances, instances)
        boundary_label(objects, config.classes, background)  # a boundary class: checked here
        params = objects_refine(params, objects, config.ndim)
        return cls(
            model, params, objects, threshold, background,
            resolve_device(device), tile_shape, spacing, channel_axis, frame_axis, precision,
        )  # fmt: skip

    def replace(self, **changes) -> SegmentRequest:
        """The same request with some fields changed (already resolved values)."""
        return dataclasses.replace(self, **changes)

    @property
    def head_dtype(self) -> torch.dtype | None:
        """The head's matmul dtype (``voxel_mlp``'s ``matmul_dtype``): bfloat16 for "auto" on
        a CPU with AMX matrix units (where it pays: ``benchmarks/results/mlp-cpu.md``), else
        None (float32)."""
        if self.precision == "auto" and self.device.type == "cpu" and cpu_has_amx():
            return torch.bfloat16
        return None

    @cached_property
    def classes(self) -> list[str]:
        """The model's class names, background first."""
        return [c.name for c in self.model.config.classes]

    @cached_property
    def payload(self) -> ModelPayload:
        """The model as the bytes of its model file, made once per request (every chunk job
        that pickles the request shares them)."""
        return ModelPayload.of(self.model)

    def __reduce__(self):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["model"] = self.payload
        fields["device"] = str(self.device)
        return (_rebuilt, (fields,))


def _rebuilt(fields: dict) -> SegmentRequest:
    """A pickled request back: its model rebuilt from the payload (once per process)."""
    fields = dict(fields)
    fields["model"] = model_from_payload(fields["model"])
    fields["device"] = torch.device(fields["device"])
    return SegmentRequest(**fields)


def as_model(model) -> PacSegModel:
    """``model`` itself, or the model file at that path (``load_model``)."""
    if isinstance(model, PacSegModel):
        return model
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_model(model)
    raise TypeError(
        f"model must be a PacSegModel or the path of a model file (see load_model), got "
        f"{type(model).__name__}"
    )


_MODELS: dict[str, PacSegModel] = {}
_MODELS_LOCK = threading.Lock()


def model_from_payload(payload: ModelPayload) -> PacSegModel:
    """The payload's model, built once per process (the last one kept)."""
    with _MODELS_LOCK:
        model = _MODELS.get(payload.digest)
        if model is None:
            model = model_from_bytes(payload.data, "the model sent to this worker")
            _MODELS.clear()
            _MODELS[payload.digest] = model
        return model
