"""Objects from classes: instance labels by a seeded watershed in physical units, and the
per-object measurement table. (Cells mode, ``InstanceConfig.boundary``: the pieces are those of
the cells' interiors, then ``instances.cells`` fills the boundary; see there.)

Each connected piece (6-connected) of a non-background class is handled alone, in its own
bounding box: its elevation is the distance transform of the piece in physical units (the voxel
spacing) over ``radius``, plus ``brightness_weight`` times the image's evidence (``evidence``: the
image smoothed and normalised, so a dim gap between two bright objects is a valley); seeds at
its h-maxima (``InstanceConfig.h``), a watershed of the negated elevation from those seeds
inside the piece. Working piece by piece keeps the cost proportional to the foreground, and
makes an object's result depend only on its own piece, which is what lets chunked runs equal
the whole-volume one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from napari_pacseg.checks import check_callable, check_spacing
from napari_pacseg.instances.cells import (
    boundary_label,
    fill_boundary,
    image_sums,
    interior_mask,
    stain_contrast,
    stain_is_bright,
)
from napari_pacseg.instances.evidence import smoothed_image
from napari_pacseg.model.network import InstanceConfig, with_overrides
from napari_pacseg.progress import stop_if_cancelled

__all__ = [
    "InstanceConfig",
    "brightness_evidence",
    "instance_config",
    "instance_labels",
    "object_table",
]

FACES = ndi.generate_binary_structure(
    3, 1
)  # 6-connectivity: one object is one face-connected piece


def instance_config(base: InstanceConfig, instances) -> InstanceConfig | None:
    """The instance parameters of a call: None (``instances`` False/None), ``base`` (True), an
    ``InstanceConfig``, or ``base`` with a dict of overrides."""
    if instances is None or instances is False:
        return None
    return with_overrides(base, instances, "instances")


def brightness_evidence(
    image: np.ndarray, lo, hi, spacing, config: InstanceConfig
) -> np.ndarray | None:
    """The brightness evidence of ``instance_labels``: ``smoothed_image`` of ``image`` (``(C,
    D, H, W)``, or ``(C, H, W)`` with a ``(y, x)`` spacing) at ``config.smoothing``: float32 of
    the spatial shape, 0..1. None when ``config.brightness_weight`` is 0 in blobs mode (cells
    mode always reads the image: ``instances.cells``)."""
    if config.brightness_weight == 0 and config.boundary is None:
        return None
    return smoothed_image(image, lo, hi, spacing, config.smoothing)


def instance_labels(
    labels: np.ndarray,
    spacing,
    config: InstanceConfig | None = None,
    *,
    should_cancel: Callable[[], bool] | None = None,
    evidence: np.ndarray | None = None,
    classes=None,
    background: int = 0,
    seeds: np.ndarray | None = None,
    stain=None,
) -> np.ndarray:
    """One id per object: ``(D, H, W)`` int32, 0 where ``labels`` is 0 (background) or the
    object was smaller than ``config.smallest()``, 1..N objects (consecutive), each one
    6-connected piece of a single class. ``labels``: ``(D, H, W)`` integer class labels (0
    background), e.g. ``Segmentation.labels``; ``spacing``: ``(z, y, x)`` voxel size. Ids
    follow the classes in increasing order, then the pieces in raster order of their first
    voxel, then the objects of a piece in raster order of theirs.

    2D labels ``(H, W)`` with a ``(y, x)`` spacing give ``(H, W)`` ids: pieces are then
    4-connected and ``config.smallest(planar=True)`` is an area (spacing units squared).

    ``evidence``: float32 of the labels' shape, the image's brightness in 0..1 (``brightness_evidence``);
    None (or ``config.brightness_weight`` 0): the pieces' shapes alone.

    ``seeds``: integer class labels of the labels' shape from a refinement with a stronger local
    fit (``InstanceConfig.split_fit``; ``segment`` makes them), or None: a piece's objects are
    then seeded by the pieces of its class in ``seeds`` inside it, split by their own shapes
    (``split_piece``'s ``core``); blobs mode only (cells mode ignores them).

    Cells mode (``config.boundary`` a class name; ``classes``: the model's class names,
    background first, ``background`` the index of the class that is 0 in ``labels``): the ids
    are cells that tile the tissue, numbered by the interiors' pieces (any interior class) in
    raster order of their first voxel, then the cells of a piece in raster order of theirs;
    ``evidence`` (the brightness evidence, as above) gives the boundary's contrast
    (``instances.cells``), its side read from ``stain`` (``cells.image_sums`` of ``evidence``
    and ``labels``) when given, else from ``evidence`` and ``labels`` here."""
    check_callable(should_cancel, "instance_labels: should_cancel", "should_cancel() -> bool")
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"instance_labels: labels must be a 2D (H, W) or 3D (D, H, W) integer array, got "
            f"{labels.ndim}D {labels.dtype}"
        )
    planar = labels.ndim == 2
    if planar:  # one plane with a unit z: volumes are areas, nothing reaches along z
        y, x = check_spacing(spacing, (1.0, 1.0), 2)
        labels, spacing = labels[None], (1.0, y, x)
        evidence = None if evidence is None else np.asarray(evidence)[None]
        seeds = None if seeds is None else np.asarray(seeds)[None]
    else:
        spacing = check_spacing(spacing, (1.0, 1.0, 1.0))
    config = config or InstanceConfig()
    if evidence is not None and np.shape(evidence) != labels.shape:
        raise ValueError(
            f"instance_labels: evidence has shape {np.shape(evidence)}, the labels "
            f"{labels.shape}; give one value per voxel"
        )
    if seeds is not None and (
        np.shape(seeds) != labels.shape or not np.issubdtype(np.asarray(seeds).dtype, np.integer)
    ):
        raise ValueError(
            f"instance_labels: seeds must be integer class labels of the labels' shape "
            f"{labels.shape}, got {np.asarray(seeds).dtype} of shape {np.shape(seeds)}"
        )
    boundary = boundary_label(config, classes, background, "instance_labels")
    if boundary is None:
        out = _split_pieces(labels, spacing, config, planar, evidence, None, should_cancel, seeds)
        return out[0] if planar else out
    contrast = None
    if evidence is not None:
        if stain is None:
            stain = image_sums(evidence, labels, boundary)  # a 2D image: its one-plane volume
        contrast = stain_contrast(evidence, stain_is_bright(stain))
    inner = interior_mask(labels, boundary).view(np.uint8)
    valley = None if contrast is None else np.float32(1.0) - contrast
    out = _split_pieces(inner, spacing, config, planar, valley, cell_weight(config), should_cancel)
    stop_if_cancelled(should_cancel, "instance labelling cancelled")
    out = fill_boundary(out, labels, boundary, spacing, config, contrast, planar)
    return out[0] if planar else out


def cell_weight(config: InstanceConfig) -> float:
    """The weight of the boundary's contrast in a cell piece's elevation: ``1 + brightness``
    (the contrast counts as much as the distance in radii, ``brightness`` adds to it; None,
    auto, adds nothing)."""
    return 1.0 + (config.brightness or 0.0)


def _split_pieces(
    values, spacing, config, planar, evidence, weight, should_cancel, seeds=None, within=None
) -> np.ndarray:
    """``split_piece`` on every 6-connected piece of each non-zero value of ``values`` ``(D, H,
    W)``, ids numbered as ``instance_labels`` numbers them; ``seeds`` (class labels of the same
    shape, or None): a piece's ``core`` is where they hold its value. ``within``: which sides
    of ``values``' box lie on the image's border (``on_border``), or None: ``values`` is the
    whole image."""
    out = np.zeros(values.shape, dtype=np.int32)
    next_id = 1
    for value in np.unique(values):
        if value == 0:
            continue
        pieces, _ = ndi.label(values == value, structure=FACES)
        for i, box in enumerate(ndi.find_objects(pieces), start=1):
            stop_if_cancelled(should_cancel, "instance labelling cancelled")
            piece = pieces[box] == i
            bright = None if evidence is None else evidence[box]
            edges = on_border(box, values.shape, planar)
            if within is not None:  # a side of the piece on the image's border
                edges = tuple((a and lo, b and hi) for (a, b), (lo, hi) in zip(edges, within))
            core = None if seeds is None else seeds[box] == value
            ids = split_piece(piece, spacing, config, planar, bright, weight, edges, core)
            n = int(ids.max())
            if n:
                view = out[box]
                view[ids > 0] = ids[ids > 0] + (next_id - 1)
                next_id += n
    return out


def on_border(box, shape, planar: bool = False) -> tuple[tuple[bool, bool], ...]:
    """Which sides ``(low, high)`` per axis of ``box`` (slices or ``(start, stop)`` pairs) lie
    on the border of an image of ``shape``; a 2D image's plane axis has none."""
    sides = []
    for axis, (part, n) in enumerate(zip(box, shape)):
        a, b = (part.start, part.stop) if isinstance(part, slice) else part
        sides.append((False, False) if planar and axis == 0 else (a == 0, b == n))
    return tuple(sides)


def split_piece(
    piece: np.ndarray, spacing, config: InstanceConfig, planar: bool = False, evidence=None,
    weight: float | None = None, edges=None, core: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Objects of one connected piece: ``piece`` ``(d, h, w)`` bool -> int32 ids 1..n (0 outside
    the piece and in dropped fragments), in raster order of each object's first voxel.
    ``planar``: the piece is of a 2D image (``d`` is 1): its distances are in the plane.
    ``evidence``: the image's brightness on the piece's box (``brightness_evidence``), or None;
    ``weight``: its weight in the elevation (None: ``config.brightness_weight``). ``edges``: which
    sides of the box lie on the image's border (``on_border``; None: none): a piece or
    fragment touching one is kept from ``config.smallest(cut=True)`` up. ``core``: bool of the
    box's shape, or None: the seeding foreground (``instance_labels``' ``seeds``); its pieces
    inside ``piece``, each split as a piece (without a core), are the seeds, and the watershed
    grows them over ``piece``; where they are fewer than the piece's own h-maxima (or the core
    differs from the piece by less than the smallest object), those seed it."""
    weight = config.brightness_weight if weight is None else weight
    voxel = float(np.prod(spacing))
    size = int(piece.sum())
    edges = edges or ((False, False),) * 3
    cut = any(lo or hi for lo, hi in edges)
    if size * voxel < config.smallest(planar, cut):
        return np.zeros(piece.shape, np.int32)
    # Outside the volume counts as background, so a piece's distances never depend on where
    # its box was cut from (chunks, tiles). A 2D image has no planes above or below: padding
    # it along z would cap every distance at one z step, and no piece would ever split.
    pad = ((0, 0), (1, 1), (1, 1)) if planar else 1
    padded = np.pad(piece, pad)
    if planar:
        dist = ndi.distance_transform_edt(padded[0], sampling=spacing[1:])[None]
    else:
        dist = ndi.distance_transform_edt(padded, sampling=spacing)
    # The elevation, in units of radius: the shape, plus the image's brightness inside.
    dist = (dist / config.radius).astype(np.float32)
    elevation = dist
    if evidence is not None and weight > 0:
        bright = np.pad(np.asarray(evidence, np.float32), pad) * padded
        elevation = dist + np.float32(weight) * bright
    if core is not None:
        core = core & piece
        # A core that differs from the piece by less than the smallest object is no evidence
        # of a gap: its split differs from the piece's own only where a seed sits at the
        # threshold, as on the generator's volumes (bench_instances.py), where no piece is
        # shaved by that much and no object changes (benchmarks/results/instances-cpu.md).
        if (size - int(core.sum())) * voxel < config.smallest(planar):
            core = None
    markers, n = _seeds(elevation, config.h)
    if core is not None:
        # the core's seeds, unless they are fewer than the piece's own: a core that lost an
        # object (a dim one beside a bright one) must not merge it into its neighbour
        core_markers, k = _core_seeds(core, spacing, config, planar, evidence, weight, edges, pad)
        if k >= n:
            markers, n = core_markers, k
    if n <= 1:
        return piece.astype(np.int32)
    from skimage.segmentation import watershed

    dist = elevation

    ids = watershed(-dist, markers, mask=padded)
    for _ in range(n):  # fragments under min_volume give their seed up and join a neighbour
        sizes = np.bincount(ids.ravel(), minlength=n + 1)[1:]
        least = np.where(_touching(ids, edges, pad, n), config.smallest(planar, True),
                         config.smallest(planar))  # fmt: skip
        small = np.flatnonzero((sizes * voxel < least) & (sizes > 0))
        if small.size == 0:
            break
        if small.size == np.count_nonzero(sizes):  # every part too small: the piece is one
            return piece.astype(np.int32)
        markers[np.isin(markers, small + 1)] = 0
        ids = watershed(-dist, markers, mask=padded)
    ids = ids[:, 1:-1, 1:-1] if planar else ids[1:-1, 1:-1, 1:-1]
    return _raster_order(ids)


def _core_seeds(core, spacing, config, planar, evidence, weight, edges, pad):
    """Seeds from a piece's core (``split_piece``): ``(markers int32, n)`` on the padded box,
    the objects of each 6-connected piece of ``core`` (split as pieces without a core, on the
    piece's box whose sides ``edges`` lie on the image's border)."""
    ids = _split_pieces(core.view(np.uint8), spacing, config, planar, evidence, weight, None,
                        within=edges)  # fmt: skip
    return np.pad(ids, pad), int(ids.max())


def _touching(ids: np.ndarray, edges, pad, n: int) -> np.ndarray:
    """Per id 1..n of a padded box's watershed, whether it reaches a side of the box on the
    image's border (bool ``(n,)``)."""
    out = np.zeros(n + 1, bool)
    for axis, sides in enumerate(edges):
        width = pad if isinstance(pad, int) else pad[axis][0]
        for index, edge in ((width, sides[0]), (-1 - width, sides[1])):
            if edge:
                out[np.unique(np.take(ids, index, axis=axis))] = True
    return out[1:]


def _seeds(dist: np.ndarray, h: float) -> tuple[np.ndarray, int]:
    """Seeds of the watershed: ``(markers int32, n)``. A seed is the cap of a peak of ``dist``
    that rises more than ``h`` above the highest saddle to any higher point: the points above
    ``peak - h`` connected to it (the h-dome transform, ``dist`` minus its grey
    reconstruction from ``dist - h``, is positive there and reaches ``h`` at the peak). Peaks
    joined above that level (a ridge, the bumps of one object) share one cap."""
    from skimage.morphology import reconstruction

    dome = dist - reconstruction(np.maximum(dist - h, 0), dist, method="dilation")
    tol = 1e-4 * max(h, 1e-6)
    caps, n = ndi.label(dome > tol, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return caps.astype(np.int32), 0
    tall = np.asarray(ndi.maximum(dome, caps, np.arange(1, n + 1))) >= h - tol
    lut = np.zeros(n + 1, np.int32)
    lut[1:][tall] = np.arange(1, int(tall.sum()) + 1, dtype=np.int32)
    return lut[caps], int(tall.sum())


def _raster_order(ids: np.ndarray) -> np.ndarray:
    """Renumber 1..n by the raster index of each id's first voxel (0 stays 0)."""
    flat = ids.ravel()
    values, first = np.unique(flat, return_index=True)
    keep = values > 0
    values, first = values[keep], first[keep]
    lut = np.zeros(int(flat.max()) + 1, np.int32)
    lut[values[np.argsort(first)]] = np.arange(1, values.size + 1, dtype=np.int32)
    return lut[ids]


def object_table(
    instances: np.ndarray,
    labels: np.ndarray,
    image: np.ndarray | None,
    spacing,
    class_names=None,
) -> dict[str, np.ndarray]:
    """Per-object measurements, one row per id of ``instances`` (``(D, H, W)`` ints, 0 none),
    as a dict of equal-length columns:

    ``id``; ``class`` (the model's class index: the label value in ``labels`` minus 1);
    ``class_name`` (when ``class_names``, the model's class names, is given); ``volume`` (spacing
    units^3); ``centroid_z/y/x`` (spacing units); ``bbox_z0/y0/x0/z1/y1/x1`` (voxel indices,
    end exclusive); ``mean_intensity`` / ``max_intensity`` of ``image`` (``(D, H, W)`` or
    ``(C, D, H, W)``: per channel ``mean_intensity_c0``, ...); ``surface_area`` (spacing
    units^2, marching cubes on the object's mask) and ``sphericity`` (pi^(1/3) (6 V)^(2/3) / A:
    1 for a ball, less for anything else).

    2D ``instances`` ``(H, W)`` (``image`` ``(H, W)`` or ``(C, H, W)``, ``spacing`` ``(y, x)``)
    give ``area`` (spacing units^2), y and x centroids and boxes, the intensities,
    ``perimeter`` (spacing units, marching squares on the object's mask, holes included) and
    ``circularity`` (4 pi A / P^2: about 1 for a disc)."""
    instances = np.asarray(instances)
    if instances.ndim == 2:
        return _object_table_2d(instances, labels, image, spacing, class_names)
    from skimage.measure import marching_cubes, mesh_surface_area

    spacing = check_spacing(spacing, (1.0, 1.0, 1.0))
    channels = None
    if image is not None:
        image = np.asarray(image)
        channels = image[None] if image.ndim == 3 else image
        if channels.shape[1:] != instances.shape:
            raise ValueError(
                f"object_table: image of shape {image.shape} does not match the instances' "
                f"{instances.shape}"
            )
    boxes = ndi.find_objects(instances)
    rows = [(i, box) for i, box in enumerate(boxes, start=1) if box is not None]
    voxel = float(np.prod(spacing))
    cols: dict[str, list] = {
        k: []
        for k in ["id", "class", "volume", "centroid_z", "centroid_y", "centroid_x"]
        + [f"bbox_{a}{e}" for e in "01" for a in "zyx"]
    }
    n_ch = 0 if channels is None else channels.shape[0]
    names = (
        [("mean_intensity", "max_intensity")]
        if n_ch == 1
        else [(f"mean_intensity_c{c}", f"max_intensity_c{c}") for c in range(n_ch)]
    )
    for mean_name, max_name in names[:n_ch]:
        cols[mean_name], cols[max_name] = [], []
    cols["surface_area"], cols["sphericity"] = [], []
    for i, box in rows:
        mask = instances[box] == i
        coords = np.nonzero(mask)
        count = coords[0].size
        cols["id"].append(i)
        cols["class"].append(int(labels[box][mask][0]) - 1)
        volume = count * voxel
        cols["volume"].append(volume)
        for axis, name in enumerate("zyx"):
            centre = (coords[axis].mean() + box[axis].start) * spacing[axis]
            cols[f"centroid_{name}"].append(float(centre))
            cols[f"bbox_{name}0"].append(box[axis].start)
            cols[f"bbox_{name}1"].append(box[axis].stop)
        for c, (mean_name, max_name) in enumerate(names[:n_ch]):
            values = channels[(c, *box)][mask]
            cols[mean_name].append(float(values.mean()))
            cols[max_name].append(float(values.max()))
        verts, faces, _, _ = marching_cubes(
            np.pad(mask, 1).astype(np.float32), 0.5, spacing=tuple(spacing)
        )
        area = float(mesh_surface_area(verts, faces))
        cols["surface_area"].append(area)
        cols["sphericity"].append(
            float(np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area) if area > 0 else 0.0
        )
    return _typed(cols, class_names)


def _object_table_2d(instances, labels, image, spacing, class_names) -> dict[str, np.ndarray]:
    from skimage.measure import find_contours

    spacing = check_spacing(spacing, (1.0, 1.0), 2)
    one_plane = object_table(
        instances[None],
        np.asarray(labels)[None],
        None if image is None else np.asarray(image)[..., None, :, :],
        (1.0, *spacing),
        class_names,
    )
    drop = {"centroid_z", "bbox_z0", "bbox_z1", "surface_area", "sphericity"}
    table = {("area" if k == "volume" else k): v for k, v in one_plane.items() if k not in drop}
    perimeters = []
    for i, box in enumerate(ndi.find_objects(instances), start=1):
        if box is None:
            continue
        mask = np.pad(instances[box] == i, 1).astype(np.float32)
        length = 0.0
        for contour in find_contours(mask, 0.5):
            steps = np.diff(contour, axis=0) * np.asarray(spacing)
            length += float(np.sqrt((steps**2).sum(axis=1)).sum())
        perimeters.append(length)
    table["perimeter"] = np.asarray(perimeters, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = 4 * np.pi * table["area"] / table["perimeter"] ** 2
    table["circularity"] = np.where(table["perimeter"] > 0, circ, 0.0)
    return table


def _typed(cols: dict[str, list], class_names) -> dict[str, np.ndarray]:
    """The columns as arrays: ids, classes and boxes int64, the rest float64; ``class_name``
    after ``class`` when ``class_names`` is given."""
    table = {k: np.asarray(v) for k, v in cols.items()}
    table["id"] = table["id"].astype(np.int64)
    table["class"] = table["class"].astype(np.int64)
    for k in [c for c in table if c.startswith("bbox_")]:
        table[k] = table[k].astype(np.int64)
    for k in [c for c in table if c not in ("id", "class") and not c.startswith("bbox_")]:
        table[k] = table[k].astype(np.float64)
    if class_names is not None:
        names_arr = np.asarray(list(class_names), dtype=object)
        table = {
            "id": table["id"],
            "class": table["class"],
            "class_name": names_arr[table["class"]] if len(table["class"]) else names_arr[:0],
            **{k: v for k, v in table.items() if k not in ("id", "class")},
        }
    return table


def as_table(columns: dict[str, np.ndarray]):
    """A pandas DataFrame of ``columns`` when pandas is installed, else ``columns`` itself."""
    try:
        import pandas as pd
    except ImportError:
        return columns
    return pd.DataFrame(columns)


def table_csv(table) -> str:
    """CSV text of a measurement table (a DataFrame or a dict of columns): a header of the
    column names, one row per object; floats as Python writes them (round-trip exact)."""
    import csv
    import io

    columns = {k: list(np.asarray(table[k]).tolist()) for k in table.keys()}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*columns.values()))
    return out.getvalue()
