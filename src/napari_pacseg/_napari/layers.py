"""napari layers of the plugin: class colours and names on Labels layers, the output layers
("<image> labels", "<image> matte", "<image> instances") reused and written in place, the scribbles layer, and the
region of a layer the viewer shows (what the live preview computes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_pacseg.model.classes import DEFAULT_COLORS, label_values, scribble_values

TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
SCRIBBLE_BACKGROUND = (0.6, 0.6, 0.6, 1.0)
METADATA_KEY = "pacseg"

SLAB_HALF = 1  # 2D view: planes on each side of the current one (3 planes in all)
MAX_PLANE = 1024  # 2D view: in-plane extent beyond which only a window around the centre is done
BOX_3D = (32, 192, 192)  # 3D view: the bounded region around the camera centre (z, y, x)


def class_features(names: Sequence[str], values: Sequence[int], zero: str | None = None) -> dict:
    """A Labels ``features`` table naming each label value (napari shows the name on hover):
    class ``names[i]`` has value ``values[i]``; value 0 is called ``zero`` unless a class has it."""
    table = dict(zip(values, names))
    if 0 not in table and zero is not None:
        table[0] = zero
    order = sorted(table)
    return {"index": order, "class": [table[v] for v in order]}


def class_colormap(colors: Sequence[Sequence[float]], values: Sequence[int], zero_color=None):
    """A ``DirectLabelColormap``: ``colors[i]`` for label value ``values[i]``, value 0 and
    unknown values transparent (``zero_color`` gives value 0 a colour when no class has it)."""
    from napari.utils.colormaps import DirectLabelColormap

    color_dict = {None: TRANSPARENT, 0: zero_color or TRANSPARENT}
    for value, color in zip(values, colors):
        color_dict[int(value)] = tuple(float(c) for c in color)
    return DirectLabelColormap(color_dict=color_dict)


def visible_colors(colors: Sequence[Sequence[float]], hidden: int | None = None) -> list[tuple]:
    """Class colours with every fully transparent one (except class ``hidden``) replaced by a
    visible default, so every class can be told apart on screen."""
    out = []
    for i, color in enumerate(colors):
        color = tuple(float(c) for c in color)
        if i != hidden and color[3] == 0:
            color = (
                SCRIBBLE_BACKGROUND if i == 0 else DEFAULT_COLORS[1 + i % (len(DEFAULT_COLORS) - 1)]
            )
        out.append(TRANSPARENT if i == hidden else color)
    return out


def result_styling(model, background: int) -> dict:
    """``features`` and ``colormap`` of a result Labels layer for ``model``'s classes with class
    ``background`` as label 0 (the other classes keep their scribble values)."""
    names = [c.name for c in model.config.classes]
    values = label_values(len(names), background)
    colors = visible_colors([c.color for c in model.config.classes], hidden=background)
    return {
        "features": class_features(names, values),
        "colormap": class_colormap(colors, values),
    }


def scribble_styling(names: Sequence[str], colors: Sequence[Sequence[float]] | None = None) -> dict:
    """``features``, ``colormap`` and ``metadata`` of a scribbles Labels layer: class ``i``
    is painted with value ``i + 1`` (1 = background), 0 is unlabelled."""
    names = list(names)
    if colors is None:
        colors = [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(names))]
    values = scribble_values(len(names))
    return {
        "features": class_features(names, values, zero="unlabelled"),
        "colormap": class_colormap(visible_colors(colors), values),
        "metadata": {"pacseg_classes": names},
    }


def scribble_class_names(layer) -> list[str] | None:
    """Class names stored on a scribbles layer (by ``scribble_styling`` or the sample), if any."""
    names = layer.metadata.get("pacseg_classes")
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def scribbles_of(layer) -> tuple:
    """``(data, name, class names)`` of a scribbles layer (``(None, "", None)`` for None)."""
    if layer is None:
        return None, "", None
    return layer.data, layer.name, scribble_class_names(layer)


def _find(viewer, name: str, kind: type):
    if name not in viewer.layers:
        return None
    layer = viewer.layers[name]
    if not isinstance(layer, kind):
        raise ValueError(
            f"a layer named {name!r} exists but is not a {kind.__name__} layer; rename or delete "
            "it so the results can be written"
        )
    return layer


def image_choices(viewer) -> list[tuple[str, object]]:
    """(name, layer) of the viewer's image layers the widget can segment: 2D (grey or RGB),
    3D (a volume, a time-lapse, a 2D image's channels; RGB too), or 4D with a channel axis;
    not an output of ours."""
    from napari.layers import Image

    return [
        (layer.name, layer)
        for layer in viewer.layers
        if isinstance(layer, Image)
        and (layer.ndim in (2, 3) or (layer.ndim == 4 and not layer.rgb))
        and METADATA_KEY not in layer.metadata
    ]


def scribble_choices(viewer) -> list[tuple[str, object]]:
    """(name, layer) of the viewer's Labels layers that can be scribbles (not outputs of ours)."""
    from napari.layers import Labels

    return [
        (layer.name, layer)
        for layer in viewer.layers
        if isinstance(layer, Labels) and METADATA_KEY not in layer.metadata
    ]


def add_scribbles(viewer, image, names: Sequence[str], colors=None):
    """An empty uint8 Labels layer ``"<image> scribbles"`` with ``image``'s spatial shape,
    scale and translate (``image``: a ``session.ImageInput``), styled by ``scribble_styling``,
    in paint mode with label 1 selected."""
    layer = viewer.add_labels(
        np.zeros(image.shape, np.uint8), name=f"{image.name} scribbles", scale=image.scale,
        translate=image.translate, **scribble_styling(names, colors),
    )  # fmt: skip
    layer.mode = "paint"
    layer.selected_label = 1
    return layer


def set_spacing(viewer, layer, spacing, scribbles=None) -> list[str]:
    """Make ``spacing`` (the pixel or voxel size of ``layer``'s last ``len(spacing)`` axes)
    the scale of those axes of the image ``layer``, of ``scribbles`` and of the image's
    scribbles and result layers (``"<image> scribbles"``, ``labels``, ``matte``,
    ``instances``) whose last axes have the image's shape, so they stay on top of it. Returns
    the names of the layers changed."""
    n = len(spacing)
    shape = tuple(layer.data.shape[-n - (1 if getattr(layer, "rgb", False) else 0) :])[:n]
    names = [f"{layer.name} {suffix}" for suffix in ("scribbles", "labels", "matte", "instances")]
    others = [viewer.layers[name] for name in names if name in viewer.layers]
    if scribbles is not None and scribbles not in others:
        others.append(scribbles)
    changed = []
    for target in [layer, *others]:
        if target is not layer and tuple(target.data.shape[-n:]) != shape:
            continue  # not drawn over this image: its scale is its own
        scale = list(target.scale)
        if len(scale) < n:
            continue
        scale[-n:] = spacing
        target.scale = scale
        changed.append(target.name)
    return changed


def place(layer, scale, translate) -> None:
    """Give ``layer`` the ``scale`` and ``translate`` where they differ from its own. Each
    assignment re-lays out and redraws the layer even when the value is the same (~4 ms of
    napari's main thread, while a run or preview needs the cores)."""
    if not np.array_equal(np.asarray(layer.scale, float), np.asarray(scale, float)):
        layer.scale = scale
    if not np.array_equal(np.asarray(layer.translate, float), np.asarray(translate, float)):
        layer.translate = translate


def _same_colormap(a, b) -> bool:
    """Whether two ``DirectLabelColormap`` give every label value the same colour."""
    da, db = getattr(a, "color_dict", None), getattr(b, "color_dict", None)
    if da is None or db is None or da.keys() != db.keys():
        return False
    return all(np.array_equal(np.asarray(da[k], float), np.asarray(db[k], float)) for k in da)


def output_names(image_name: str) -> tuple[str, str]:
    """Names of the output layers of an image: ``"<image> labels"``, ``"<image> matte"``."""
    return f"{image_name} labels", f"{image_name} matte"


def output_layers(viewer, image, model, background: int):
    """The ``"<image> labels"`` and ``"<image> matte"`` layers (labels above the matte) of
    ``image`` (a ``session.ImageInput``: name, spatial shape, scale, translate), created full
    size (zeros) when missing, reused when present (re-allocated as zeros only when their
    shape is wrong), with the image's scale and translate and the model's class names and
    colours (each set only where it differs: ``place``)."""
    from napari.layers import Image, Labels

    shape, scale, translate = tuple(int(n) for n in image.shape), image.scale, image.translate
    labels_name, matte_name = output_names(image.name)
    dtype = np.uint8  # at most MAX_CLASSES = 255 classes
    labels = _find(viewer, labels_name, Labels)
    matte = _find(viewer, matte_name, Image)
    styling = result_styling(model, background)
    if matte is None:
        matte = viewer.add_image(
            np.zeros(shape, np.float32), name=matte_name, scale=scale,
            translate=translate, colormap="magma", contrast_limits=(0.0, 1.0),
            blending="additive", opacity=0.7, metadata={METADATA_KEY: {"complete": False}},
        )  # fmt: skip
    else:
        if matte.data.shape != shape:
            matte.data = np.zeros(shape, np.float32)
        place(matte, scale, translate)
        if tuple(matte.contrast_limits) != (0.0, 1.0):
            matte.contrast_limits = (0.0, 1.0)
    if labels is None:
        labels = viewer.add_labels(
            np.zeros(shape, dtype), name=labels_name, scale=scale,
            translate=translate, opacity=0.5, metadata={METADATA_KEY: {"complete": False}},
            **styling,
        )  # fmt: skip
    else:
        if labels.data.shape != shape or labels.data.dtype != dtype:
            labels.data = np.zeros(shape, dtype)
        place(labels, scale, translate)
        labels.features = styling["features"]
        if not _same_colormap(labels.colormap, styling["colormap"]):
            labels.colormap = styling["colormap"]
    return labels, matte


def instance_name(image_name: str) -> str:
    """Name of the objects layer of an image: ``"<image> instances"``."""
    return f"{image_name} instances"


def holds_full_run(viewer, image_name: str) -> bool:
    """Whether ``"<image> instances"`` exists and holds a full run's objects (with their
    measurements): a live preview then leaves it as it is."""
    from napari.layers import Labels

    layer = _find(viewer, instance_name(image_name), Labels)
    return layer is not None and bool(layer.metadata.get(METADATA_KEY, {}).get("complete"))


def instance_layer(viewer, image):
    """The ``"<image> instances"`` Labels layer of ``image`` (a ``session.ImageInput``): int32
    object ids with napari's default random colour per label, created full size (zeros) when
    missing, reused when present (re-allocated only when its shape or dtype is wrong), with
    the image's scale and translate."""
    from napari.layers import Labels

    shape, scale, translate = tuple(int(n) for n in image.shape), image.scale, image.translate
    layer = _find(viewer, instance_name(image.name), Labels)
    if layer is None:
        return viewer.add_labels(
            np.zeros(shape, np.int32), name=instance_name(image.name), scale=scale,
            translate=translate, opacity=0.6, metadata={METADATA_KEY: {"complete": False}},
        )  # fmt: skip
    if layer.data.shape != shape or layer.data.dtype != np.int32:
        layer.data = np.zeros(shape, np.int32)
    place(layer, scale, translate)
    return layer


def object_features(objects) -> dict:
    """A Labels ``features`` table of a measurement table (``Segmentation.objects``): one row
    per object, its ``index`` column the object's id (how napari finds an object's row when
    the pointer is over it)."""
    columns = {k: np.asarray(objects[k]) for k in objects.keys()}
    return {"index": columns["id"], **columns}


def write_instances(layer, ids: np.ndarray, objects, what: str, box=None) -> None:
    """Object ids into the instances layer: the whole volume (``box`` None; ``features`` set
    to ``objects``' measurements) or one box in place (a live preview: ids of the box alone,
    no measurements, so the features are emptied rather than left describing other objects)."""
    if box is None:
        layer.data = ids
        layer.features = object_features(objects)
        layer.metadata[METADATA_KEY] = {"complete": True, "content": what}
        return
    layer.data[tuple(slice(a, b) for a, b in box)] = ids
    layer.features = {"index": np.zeros(0, np.int64)}
    layer.metadata[METADATA_KEY] = {"complete": False, "content": what, "region": box}
    layer.refresh()


def write_full(labels_layer, matte_layer, labels: np.ndarray, matte: np.ndarray, what: str) -> None:
    """Replace both layers' data (one assignment each; no undo history)."""
    labels_layer.data = labels
    matte_layer.data = matte
    matte_layer.contrast_limits = (0.0, 1.0)
    for layer in (labels_layer, matte_layer):
        layer.metadata[METADATA_KEY] = {"complete": True, "content": what}


def write_region(
    labels_layer, matte_layer, box, labels: np.ndarray, matte: np.ndarray, what: str,
    exact: bool = True,
):  # fmt: skip
    """Write one box of both layers in place (one slice assignment each, no undo history),
    then refresh them. The metadata records that the layers now hold a partial result, and
    whether the box equals the full run there (``exact``; False: a bounded preview)."""
    sl = tuple(slice(a, b) for a, b in box)
    labels_layer.data[sl] = labels
    matte_layer.data[sl] = matte
    meta = {"complete": False, "content": what, "region": box, "exact": bool(exact)}
    for layer in (labels_layer, matte_layer):
        layer.metadata[METADATA_KEY] = dict(meta)
        layer.refresh()


def visible_box(
    viewer,
    layer,
    channel_axis: int | None,
    shape,
    *,
    slab_half: int = SLAB_HALF,
    max_plane: int = MAX_PLANE,
    box_3d=BOX_3D,
    frames: bool = False,
) -> tuple[tuple[int, int], ...]:
    """The spatial box ``((z0, z1), (y0, y1), (x0, x1))`` of ``layer`` that the live mode
    computes: in a 2D view the slab of ``2 * slab_half + 1`` planes around the current step of
    the axis not shown (the in-plane extent cut to ``max_plane`` around the camera centre); in
    a 3D view (or when a channel axis is displayed) a box of at most ``box_3d`` voxels around
    the camera centre. A 2D image (``shape`` of two) gives ``((y0, y1), (x0, x1))``, its
    in-plane window; a time-lapse (``frames``: axis 0 is time) the current frame alone,
    ``((t, t + 1), (y0, y1), (x0, x1))``."""
    nd = layer.ndim
    offset = viewer.dims.ndim - nd
    displayed = list(viewer.dims.displayed)
    point = list(viewer.dims.point)
    scene = getattr(viewer, "scene", None)  # napari >= 0.9; viewer.camera before
    camera = scene.camera if scene is not None else viewer.camera
    center = list(camera.center)[-len(displayed) :]
    for axis, c in zip(displayed, center):
        point[axis] = c
    data_point = np.asarray(layer.world_to_data(point), dtype=float)[-nd:]
    spatial_axes = [a for a in range(nd) if channel_axis is None or a != channel_axis % nd]
    centre = [data_point[a] for a in spatial_axes]
    shown = {spatial_axes.index(d - offset) for d in displayed if d - offset in spatial_axes}
    if len(shape) == 2:
        sizes = [max_plane] * 2
    elif frames:
        sizes = [1, *([max_plane] * 2 if viewer.dims.ndisplay == 2 else box_3d[1:])]
    elif viewer.dims.ndisplay == 2 and len(shown) == 2:
        (slab_axis,) = {0, 1, 2} - shown
        sizes = [max_plane] * 3
        sizes[slab_axis] = 2 * slab_half + 1
    else:
        sizes = list(box_3d)
    return tuple(_window(c, s, n) for c, s, n in zip(centre, sizes, shape))


def _window(centre: float, size: int, n: int) -> tuple[int, int]:
    """``size`` consecutive indices (fewer at the edges of ``[0, n)``) centred on ``centre``."""
    c = int(np.clip(round(float(centre)), 0, n - 1))
    if size >= n:
        return (0, n)
    start = int(np.clip(c - size // 2, 0, n - size))
    return (start, start + size)
