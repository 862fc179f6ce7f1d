"""Cells from a boundary class (``InstanceConfig.boundary``): objects are the regions a membrane
class encloses, they tile the tissue, and chunked, tiled and zarr runs give the in-memory ids."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_pacseg import InstanceConfig, PacSegModel, instance_labels, load_model, save_model
from napari_pacseg.instances.cells import boundary_label, cell_band, enclosed_labels
from napari_pacseg.instances.labels import brightness_evidence, object_table
from napari_pacseg.sample import load_demo_model, load_sample
from tests.napari_pacseg.tables import assert_same_table

CLASSES = ["background", "membrane", "cell"]  # label values 0, 2, 3
MEMBRANE, CELL = 2, 3


def honeycomb(shape, spacing, radius, seed=0, width=1):
    """A Voronoi tissue: ``(truth, membrane)``, ``truth`` the cell of each voxel (1..n) and
    ``membrane`` the voxels with a face neighbour in another cell (on the lower cell's side
    when ``width`` is 1, both sides when 2). Seeds on a jittered grid ``2 * radius`` apart."""
    rng = np.random.default_rng(seed)
    extent = np.asarray(shape) * np.asarray(spacing)
    axes = [np.arange(radius, e, 2 * radius) for e in extent]
    seeds = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape))
    seeds = seeds + rng.uniform(-0.4, 0.4, seeds.shape) * radius
    points = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)],
                                  indexing="ij"), -1).reshape(-1, len(shape))  # fmt: skip
    nearest = np.argmin(((points[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1)
    truth = (nearest + 1).reshape(shape).astype(np.int32)
    membrane = np.zeros(shape, bool)
    for axis in range(len(shape)):
        lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(len(shape)))
        hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(len(shape)))
        differ = truth[lo] != truth[hi]
        membrane[lo] |= differ & ((truth[lo] < truth[hi]) | (width == 2))
        membrane[hi] |= differ & ((truth[hi] < truth[lo]) | (width == 2))
    return truth, membrane


def as_labels(membrane, tissue=None):
    """Class labels of ``CLASSES``: membrane 2, cell interiors 3, outside ``tissue`` 0."""
    labels = np.where(membrane, MEMBRANE, CELL).astype(np.uint8)
    if tissue is not None:
        labels[~tissue] = 0
    return labels


def assert_one_per_cell(ids, truth, tissue):
    """Each true cell (in the tissue) is one id, a different one per cell, and no tissue voxel
    lacks an id."""
    assert np.all(ids[tissue] > 0) and np.all(ids[~tissue] == 0)  # tiles the tissue: no gaps
    cells = np.unique(truth[tissue])
    assert ids.max() == len(cells)
    for cell in cells:
        inside = (truth == cell) & tissue
        _, counts = np.unique(ids[inside], return_counts=True)
        assert counts.max() >= 0.8 * inside.sum()  # the cell is mostly its one id
    owners = [np.bincount(ids[(truth == c) & tissue]).argmax() for c in cells]
    assert len(set(owners)) == len(cells)


@pytest.mark.parametrize("width", [1, 2])
def test_a_honeycomb_gives_one_object_per_cell_and_no_gaps_in_3d(width):
    spacing = (2.0, 0.8, 0.8)
    radius = 6.0
    truth, membrane = honeycomb((16, 48, 48), spacing, radius, seed=width, width=width)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(truth.shape, spacing)],
                                indexing="ij"))  # fmt: skip
    tissue = ((grid - np.array([16, 19, 19])[:, None, None, None]) ** 2).sum(0) < 30.0**2
    truth = np.where(tissue, truth, 0)
    labels = as_labels(membrane, tissue)
    config = InstanceConfig(radius=radius, boundary="membrane")
    ids = instance_labels(labels, spacing, config, classes=CLASSES)
    assert ids.dtype == np.int32 and ids.shape == labels.shape
    cut = [c for c in np.unique(truth[tissue]) if ((truth == c) & tissue).sum() < 40]
    keep = tissue & ~np.isin(truth, cut)  # slivers cut by the tissue's edge join a neighbour
    assert_one_per_cell(np.where(np.isin(truth, cut), 0, ids), np.where(keep, truth, 0), keep)
    # with the image (a bright membrane stain) the cells are the same
    image = ndi.gaussian_filter(membrane.astype(np.float32), 0.7) + 0.1
    bright = brightness_evidence(image[None], [0.0], [image.max()], spacing, config)
    with_image = instance_labels(labels, spacing, config, evidence=bright, classes=CLASSES)
    np.testing.assert_array_equal(with_image > 0, ids > 0)
    assert with_image.max() == ids.max()


def membrane_strokes(truth, membrane, planes, seed):
    """Strokes a user paints on a membrane-stained tissue: per plane, 4 short strokes on the
    membrane (its voxels within 3 of a point on it, in the plane; value 1) and 4 lines of up
    to 6 voxels inside cells, 2 or more voxels from the membrane (value 2)."""
    rng = np.random.default_rng(seed)
    inside = ndi.distance_transform_edt(~membrane) > 2
    out = np.zeros(truth.shape, np.uint8)
    yy, xx = np.mgrid[: truth.shape[1], : truth.shape[2]]
    for z in planes:
        ys, xs = np.nonzero(membrane[z])
        for i in rng.choice(len(ys), 4, replace=False):
            near = (yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 <= 9
            out[z][near & membrane[z]] = 1
        ys, xs = np.nonzero(inside[z])
        for i in rng.choice(len(ys), 4, replace=False):
            x1 = xs[i] + 1
            while x1 < min(xs[i] + 6, truth.shape[2]) and inside[z, ys[i], x1]:
                x1 += 1
            out[z, ys[i], xs[i] : x1] = 2
    return out


def test_a_thin_membrane_survives_training_from_strokes_and_the_refinement():
    """A one-voxel membrane stain (blurred, noisy), a few strokes in 3 planes: the membrane
    class keeps the membrane whole and within a voxel of it, with and without refinement, and the
    cells come out one per cell."""
    from napari_pacseg import segment, train

    shape, spacing, radius = (24, 64, 64), (1.0, 1.0, 1.0), 8.0
    truth, membrane = honeycomb(shape, spacing, radius, seed=5, width=1)
    rng = np.random.default_rng(5)
    image = ndi.gaussian_filter(membrane.astype(np.float32), 0.8) + 0.2
    image = np.clip((image + rng.normal(0, 0.08, shape)) * 1000, 0, None).astype(np.uint16)
    strokes = membrane_strokes(truth, membrane, (6, 12, 18), seed=5)
    assert np.count_nonzero(strokes) < 0.005 * strokes.size
    model = train(image, strokes, spacing=spacing, seed=0, class_names=["membrane", "cell"])
    for refine in (False, True):
        seg = segment(image, model, spacing=spacing, refine=refine,
                      instances={"radius": radius, "boundary": "membrane"})  # fmt: skip
        called = seg.labels == 0  # the membrane is the background class here
        assert (called & membrane).sum() >= 0.95 * membrane.sum(), refine
        cells = np.unique(truth)
        owners = [np.bincount(seg.instances[truth == c]).argmax() for c in cells]
        assert len(set(owners)) == len(cells) == seg.instances.max()  # one id per cell
        for cell, owner in zip(cells, owners):
            assert (seg.instances[truth == cell] == owner).mean() >= 0.8
        # and it stays on the stain: within a voxel of the membrane (the blur's width)
        assert (called & ndi.binary_dilation(membrane)).sum() >= 0.9 * called.sum(), refine


def test_the_background_class_as_boundary_tiles_the_whole_image():
    """Two classes, membrane and interior, the membrane the background class (the image is a
    crop inside the tissue): every voxel belongs to a cell."""
    spacing = (1.5, 1.0, 1.0)
    truth, membrane = honeycomb((12, 40, 40), spacing, 5.0, seed=3)
    labels = np.where(membrane, 0, 2).astype(np.uint8)  # classes: membrane (0), cell (2)
    ids = instance_labels(labels, spacing, InstanceConfig(radius=5.0, boundary="membrane"),
                          classes=["membrane", "cell"])  # fmt: skip
    assert_one_per_cell(ids, truth, np.ones(truth.shape, bool))


def test_a_honeycomb_in_2d():
    spacing = (1.0, 0.5)
    truth, membrane = honeycomb((60, 120), spacing, 6.0, seed=4)
    labels = as_labels(membrane)
    ids = instance_labels(labels, spacing, InstanceConfig(radius=6.0, boundary="membrane"),
                          classes=CLASSES)  # fmt: skip
    assert ids.shape == labels.shape
    assert_one_per_cell(ids, truth, np.ones(truth.shape, bool))


def test_a_gap_in_the_membrane_still_gives_two_cells():
    """Two box cells behind a wall with a hole: their interiors are one piece, the distance to
    the membrane has a neck at the hole, and they split there. Without a wall they are one."""
    spacing = (1.0, 1.0, 1.0)
    labels = np.full((14, 24, 48), CELL, np.uint8)
    labels[:, :, 23:25] = MEMBRANE
    labels[5:9, 10:14, 23:25] = CELL  # the hole
    config = InstanceConfig(radius=6.0, boundary="membrane")
    inner = (labels == CELL).astype(np.uint8)
    assert ndi.label(inner, ndi.generate_binary_structure(3, 1))[1] == 1
    ids = instance_labels(labels, spacing, config, classes=CLASSES)
    assert ids.max() == 2 and np.all(ids > 0)
    assert set(np.unique(ids[:, :, :20])) == {1} and set(np.unique(ids[:, :, 28:])) == {2}
    whole = instance_labels(np.full(labels.shape, CELL, np.uint8), spacing, config,
                            classes=CLASSES)  # fmt: skip
    assert whole.max() == 1


def test_small_interior_pieces_join_the_cells_around_them():
    spacing = (1.0, 1.0, 1.0)
    truth, membrane = honeycomb((12, 36, 36), spacing, 6.0, seed=5, width=2)
    labels = as_labels(membrane)
    speck = np.argwhere(membrane)[len(np.argwhere(membrane)) // 2]
    labels[tuple(speck)] = CELL  # a one-voxel interior inside the membrane
    config = InstanceConfig(radius=6.0, boundary="membrane", min_volume=5.0)
    ids = instance_labels(labels, spacing, config, classes=CLASSES)
    assert np.all(ids > 0) and ids.max() == truth.max()


def test_a_cell_is_measured_as_the_class_it_encloses():
    spacing = (1.0, 1.0, 1.0)
    _, membrane = honeycomb((10, 30, 30), spacing, 5.0, seed=6)
    labels = as_labels(membrane)
    ids = instance_labels(labels, spacing, InstanceConfig(radius=5.0, boundary="membrane"),
                          classes=CLASSES)  # fmt: skip
    table = object_table(ids, enclosed_labels(ids, labels, MEMBRANE), None, spacing, CLASSES)
    assert set(table["class_name"]) == {"cell"} and len(table["id"]) == ids.max()
    np.testing.assert_allclose(table["volume"].sum(), labels.size)


@pytest.mark.parametrize(
    ("boundary", "classes", "match"),
    [
        ("wall", CLASSES, "'wall' is not a class of the model; its classes are 'background', 'membrane', 'cell'"),
        ("cell", ["background", "cell"], "leaves no class for the cells' interiors"),
        ("membrane", None, "give the model's classes"),
    ],
)  # fmt: skip
def test_bad_boundary_classes_are_refused(boundary, classes, match):
    labels = np.full((4, 8, 8), CELL, np.uint8)
    config = InstanceConfig(boundary=boundary)
    with pytest.raises(ValueError, match=match):
        instance_labels(labels, (1.0, 1.0, 1.0), config, classes=classes)


@pytest.mark.parametrize("bad", [3, "", "   ", "a\nb", "x" * 101])
def test_a_boundary_must_be_a_class_name(bad):
    with pytest.raises(ValueError, match="boundary must be None"):
        InstanceConfig(boundary=bad)


def test_boundary_label_values():
    assert boundary_label(InstanceConfig(), CLASSES) is None
    assert boundary_label(InstanceConfig(boundary="membrane"), CLASSES) == MEMBRANE
    assert boundary_label(InstanceConfig(boundary="background"), CLASSES) == 0
    # another background class: the old background comes out as 1, the boundary as 0
    assert boundary_label(InstanceConfig(boundary="background"), CLASSES, background=1) == 1
    assert boundary_label(InstanceConfig(boundary="membrane"), CLASSES, background=1) == 0


# --- the pipeline: segment(), tiles, zarr, the model file ----------------------------------------


@pytest.fixture(scope="module")
def demo():
    return load_demo_model()


@pytest.fixture(scope="module")
def crop():
    return np.ascontiguousarray(load_sample().image[24:40, 80:144, 80:144])


CELLS = {"boundary": "background", "radius": 3.0}  # the demo's nuclei as cells in the tissue


def test_segment_with_a_bad_boundary_fails_before_segmenting(demo, crop):
    from napari_pacseg import segment

    with pytest.raises(ValueError, match="'wall' is not a class of the model; its classes are 'background', 'nucleus'"):  # fmt: skip
        segment(crop, demo, instances={"boundary": "wall"})
    with pytest.raises(ValueError, match="leaves no class for the cells' interiors"):
        segment(crop, demo, instances={"boundary": "nucleus"})


def test_segment_tiled_and_zarr_give_the_same_cells(tmp_path, demo, crop):
    pytest.importorskip("distributed")
    zarr = pytest.importorskip("zarr")
    import pandas as pd

    from napari_pacseg import segment
    from napari_pacseg.batch import segment_zarr

    spacing = load_sample().spacing
    ref = segment(crop, demo, spacing=spacing, instances=CELLS)
    assert ref.instances.max() >= 3
    tissue = ref.instances > 0
    plain = segment(crop, demo, spacing=spacing)  # no cells: the classifier's labels
    assert tissue.mean() > 2 * (plain.labels > 0).mean()  # the cells reach beyond the nuclei
    assert set(ref.objects["class_name"]) == {"nucleus"}
    # cells mode drew the cells: their class inside, the boundary where they meet; the
    # background no cell reaches stays background (the image is the boundary's there)
    np.testing.assert_array_equal(ref.labels[tissue] > 0, ~cell_band(ref.instances)[tissue])
    assert (ref.labels[~tissue] > 0).mean() < 0.01
    tiled = segment(crop, demo, spacing=spacing, instances=CELLS, tile_shape=(8, 40, 40))
    np.testing.assert_array_equal(tiled.instances, ref.instances)
    np.testing.assert_array_equal(tiled.labels, ref.labels)
    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=crop.shape,
                             chunks=(8, 24, 24), dtype=crop.dtype)  # fmt: skip
    source[:] = crop
    res = segment_zarr(tmp_path / "in.zarr", demo, tmp_path / "labels.zarr", spacing=spacing,
                       chunks=(8, 24, 24), instances_out=tmp_path / "ids.zarr", instances=CELLS,
                       objects_out=tmp_path / "objects.csv")  # fmt: skip
    ids = zarr.open_array(str(tmp_path / "ids.zarr"), mode="r")[:]
    np.testing.assert_array_equal(ids, ref.instances)
    labels = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:]
    np.testing.assert_array_equal(labels, ref.labels)
    assert res.n_objects == ref.instances.max()
    table = pd.read_csv(tmp_path / "objects.csv")
    assert_same_table(table, ref.objects)


def test_chunked_cells_equal_in_memory_with_pieces_and_fills_across_chunks(tmp_path):
    dask = pytest.importorskip("dask")
    zarr = pytest.importorskip("zarr")
    from napari_pacseg.engine.plan import split_box, whole
    from napari_pacseg.instances.chunked import IdArrays
    from napari_pacseg.instances.chunked_cells import cells_pass

    spacing = (1.5, 1.0, 1.0)
    _, membrane = honeycomb((14, 40, 40), spacing, 4.0, seed=7, width=2)
    labels = as_labels(membrane)
    labels[:, :, :3] = 0  # some outside
    labels[6:9, 10:30, 19:21] = MEMBRANE  # a thick wall: a long fill
    config = InstanceConfig(radius=4.0, boundary="membrane", min_volume=8.0)
    expected = instance_labels(labels, spacing, config, classes=CLASSES)
    chunks = (5, 12, 12)
    paths = {}
    for name, dtype in (("labels", np.uint8), ("ids", np.int32), ("cc", np.int64)):
        paths[name] = str(tmp_path / f"{name}.zarr")
        arr = zarr.open_array(paths[name], mode="w", shape=labels.shape, chunks=chunks,
                              dtype=dtype, fill_value=0)  # fmt: skip
        if name == "labels":
            arr[:] = labels
    n, table, _ = cells_pass(
        lambda tasks: list(dask.compute(*tasks, scheduler="synchronous")),
        IdArrays(paths["labels"], paths["ids"], paths["cc"]),
        split_box(whole(labels.shape), chunks), spacing, config, "test", MEMBRANE,
    )  # fmt: skip
    assert n == expected.max() >= 20 and table is None
    np.testing.assert_array_equal(zarr.open_array(paths["ids"], mode="r")[:], expected)


def _meta(path):
    """The napari_pacseg metadata of a model file (safetensors: 8-byte length, JSON header)."""
    import json

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["napari_pacseg"])


def test_the_model_file_carries_a_boundary_class(tmp_path, demo):
    cells = dataclasses.replace(demo.config.instances, boundary="background", radius=4.0)
    model = PacSegModel(dataclasses.replace(demo.config, instances=cells))
    model.load_state_dict(demo.state_dict())
    path = save_model(model, tmp_path / "cells.safetensors")
    assert load_model(path).config.instances == cells
    meta = _meta(path)  # a release without cells mode refuses it as newer, not misread
    assert meta["version"] == 5 and meta["config"]["instances"]["boundary"] == "background"
    blobs = _meta(save_model(demo, tmp_path / "blobs.safetensors"))  # as before cells mode
    assert blobs["version"] == 4 and "boundary" not in blobs["config"]["instances"]


def test_the_brightness_weight_on_auto(demo, tmp_path):
    """``brightness`` None (auto, the default) weighs the image ``AUTO_BRIGHTNESS`` in blobs mode
    and adds nothing to the cells' contrast weight (1); a given value keeps its meaning in both
    modes (a model saved before auto, with 0, splits blobs by shape and weighs the cells'
    contrast 1). A model on auto is written in format version 6, its brightness as null."""
    from napari_pacseg.instances.labels import cell_weight
    from napari_pacseg.model.network import AUTO_BRIGHTNESS

    auto = InstanceConfig()
    assert auto.brightness is None and auto.brightness_weight == AUTO_BRIGHTNESS > 0
    assert cell_weight(dataclasses.replace(auto, boundary="membrane")) == 1.0
    for value in (0.0, 0.25, 3.0):
        given = InstanceConfig(brightness=value)
        assert given.brightness_weight == value
        assert cell_weight(dataclasses.replace(given, boundary="membrane")) == 1.0 + value
    assert demo.config.instances.brightness == 0.0  # saved before auto: shape alone in blobs
    for boundary in (None, "background"):
        inst = dataclasses.replace(demo.config.instances, brightness=None, boundary=boundary)
        model = PacSegModel(dataclasses.replace(demo.config, instances=inst))
        model.load_state_dict(demo.state_dict())
        path = save_model(model, tmp_path / f"auto-{boundary}.safetensors")
        meta = _meta(path)
        assert meta["version"] == 6 and meta["config"]["instances"]["brightness"] is None
        assert load_model(path).config.instances == inst


def test_the_command_takes_a_boundary_class(tmp_path, demo, crop, capsys):
    from napari_pacseg import segment
    from napari_pacseg.cli import main
    from napari_pacseg.sample import DEMO_MODEL_FILE

    np.save(tmp_path / "crop.npy", crop)

    def run(*flags):
        return main(["segment", str(DEMO_MODEL_FILE), str(tmp_path / "crop.npy"), "-o",
                     str(tmp_path / "out"), "-q", *flags])  # fmt: skip

    assert run("--boundary-class", "background") == 2
    assert "--boundary-class given without --instances" in capsys.readouterr().err
    assert run("--instances", "--boundary-class", "wall") == 2
    assert "'wall' is not a class of the model" in capsys.readouterr().err
    assert run("--instances", "--boundary-class", "background", "--radius", "3") == 0
    ids = np.load(tmp_path / "out" / "crop_instances.npy")
    ref = segment(crop, demo, spacing=demo.config.spacing, instances=CELLS)
    np.testing.assert_array_equal(ids, ref.instances)


def test_the_widget_control_chooses_blobs_or_a_boundary_class(qtbot):
    from napari_pacseg._napari.controls import (
        instance_controls,
        instance_values,
        set_instance_controls,
    )

    controls = instance_controls()
    assert instance_values(controls)["boundary"] is None
    assert InstanceConfig(**instance_values(controls)) == InstanceConfig()
    config = InstanceConfig(radius=12.0, boundary="membrane")
    set_instance_controls(controls, config, ["membrane", "cell"])
    choices = [c for c in controls["boundary"].choices]
    assert choices == ["", "membrane", "cell"]
    assert InstanceConfig(**instance_values(controls)) == config
    controls["boundary"].value = ""  # blobs again
    assert instance_values(controls)["boundary"] is None


@pytest.mark.parametrize("stain", ["bright", "dark"])
def test_the_side_of_the_stain_is_read_where_the_classes_meet(stain):
    from napari_pacseg.instances.cells import stain_is_bright, stain_sums

    spacing = (1.0, 1.0, 1.0)
    truth, membrane = honeycomb((10, 36, 36), spacing, 6.0, seed=8)
    labels = as_labels(membrane)
    image = ndi.gaussian_filter(membrane.astype(np.float32), 0.7)
    image = image if stain == "bright" else 1.0 - image
    config = InstanceConfig(radius=6.0, boundary="membrane")
    bright = brightness_evidence(image[None], [image.min()], [image.max()], spacing, config)
    assert stain_is_bright(stain_sums(bright, labels, MEMBRANE)) == (stain == "bright")
    ids = instance_labels(labels, spacing, config, evidence=bright, classes=CLASSES)
    assert_one_per_cell(ids, truth, np.ones(truth.shape, bool))


# --- the labels drawn on the cells ------------------------------------------------------------


def _thick_prediction(seed=8, stain="bright", width=3):
    """A honeycomb with a one-voxel membrane stain (blurred, noisy) and a classifier's labels
    that paint the membrane ``2 * width + 1`` voxels wide and call a dark patch inside one
    cell membrane too: ``(truth, membrane, labels, image, spacing)``."""
    spacing = (1.0, 1.0, 1.0)
    truth, membrane = honeycomb((16, 48, 48), spacing, 8.0, seed=seed)
    rng = np.random.default_rng(seed)
    image = ndi.gaussian_filter(membrane.astype(np.float32), 0.8) + 0.2
    image = image + rng.normal(0, 0.05, image.shape).astype(np.float32)
    labels = as_labels(ndi.binary_dilation(membrane, iterations=width))
    cell = truth == truth[8, 24, 24]
    dark = cell & (ndi.distance_transform_edt(cell) >= 2)
    image[dark] = 0.05
    labels[dark] = MEMBRANE
    if stain == "dark":
        image = 1.2 - image
    return truth, membrane, labels, image, spacing


def _evidence(image, spacing, radius=8.0):
    config = InstanceConfig(radius=radius, boundary="membrane")
    lo, hi = [float(image.min())], [float(image.max())]
    return brightness_evidence(image[None], lo, hi, spacing, config)


def _drawn(labels, image, spacing, classes=CLASSES, radius=8.0):
    """``boundary_on_cells`` as segment() runs it, on the cells of the labels read with the
    image's contrast: ``(out, ids)``."""
    from napari_pacseg.instances.cells import boundary_on_cells

    config = InstanceConfig(radius=radius, boundary="membrane")
    evidence = _evidence(image, spacing, radius)
    ids = instance_labels(labels, spacing, config, evidence=evidence, classes=classes)
    return boundary_on_cells(labels, ids, MEMBRANE, evidence), ids


def _faces_between(ids):
    """bool of ``ids``' shape: the voxels with a face neighbour of another non-zero id."""
    out = np.zeros(ids.shape, bool)
    for axis in range(ids.ndim):
        lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(ids.ndim))
        hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(ids.ndim))
        differ = (ids[lo] != ids[hi]) & (ids[lo] > 0) & (ids[hi] > 0)
        out[lo] |= differ
        out[hi] |= differ
    return out


@pytest.mark.parametrize("stain", ["bright", "dark"])
@pytest.mark.parametrize("width", [3, 5])
def test_the_boundary_class_is_drawn_where_the_cells_meet(stain, width):
    """A boundary class painted 7 or 11 voxels wide over a one-voxel stain (and over a dark
    patch no stroke covered) is drawn back to the faces between the cells: both voxels of
    every face between two cells, which follow the stain (the true membrane lies on the
    drawn one, which keeps within two voxels of it, within a voxel's diagonal nearly
    everywhere, but where the dark cell's neighbours meet inside it); the rest of each cell
    takes its class; nothing outside the boundary class changes but the faces."""
    truth, membrane, labels, image, spacing = _thick_prediction(stain=stain, width=width)
    out, ids = _drawn(labels, image, spacing)
    called = out == MEMBRANE
    # the dark cell, all boundary to the classifier, has no interior: its neighbours take it
    dark = ndi.binary_dilation(truth == truth[8, 24, 24], iterations=2)
    assert ids.max() == truth.max() - 1 and np.all(ids > 0)
    faces = _faces_between(ids)
    np.testing.assert_array_equal(called, faces)  # the whole image is tissue: no other edge
    drawn = (called & membrane & ~dark).sum()
    assert drawn >= 0.95 * (membrane & ~dark).sum()  # the stain is drawn
    off = ndi.distance_transform_edt(~membrane)[called & ~dark]
    assert off.max() <= 2 and (off > 1.8).mean() < 0.01
    assert called.sum() < 0.5 * (labels == MEMBRANE).sum()
    assert set(np.unique(out)) == {MEMBRANE, CELL} and out.dtype == labels.dtype
    np.testing.assert_array_equal(out[(labels != MEMBRANE) & ~faces],
                                  labels[(labels != MEMBRANE) & ~faces])  # fmt: skip


def test_the_drawing_gives_cells_their_class_and_tissue_in_no_cell_the_main_one():
    """With two interior classes a boundary voxel off the faces takes the class its cell
    encloses, an interior voxel keeps its own; a cell's edge on the background is drawn; a
    boundary voxel in no cell takes the image's most common interior class where the image
    is not the stain, stays on the stain, and stays without the image or an interior class;
    the background never changes."""
    from napari_pacseg.instances.cells import (
        boundary_on_cells,
        cell_band,
        draw_cells,
        enclosed_labels,
        interior_counts,
        main_interior,
        stain_sums,
        unstained,
    )

    _, membrane, labels, image, spacing = _thick_prediction()
    labels[:, :, 40:] = 0  # outside the tissue
    two = labels.copy()
    two[(two == CELL) & (np.arange(48)[None, None, :] < 30)] = 4
    out, ids = _drawn(two, image, spacing, classes=[*CLASSES, "other"])
    enclosed = enclosed_labels(ids, two, MEMBRANE)
    band = cell_band(ids)
    moved = (two == MEMBRANE) & ~band
    assert moved.sum() > 1000 and {4, CELL} <= set(np.unique(out[moved]))
    np.testing.assert_array_equal(out[moved], enclosed[moved])
    np.testing.assert_array_equal(out[band], MEMBRANE)
    assert band[:, :, 39].all() and not band[:, :, 40].any()  # the tissue's edge, one side
    inner = (two != MEMBRANE) & (two != 0) & ~band
    np.testing.assert_array_equal(out[inner], two[inner])
    np.testing.assert_array_equal(out[two == 0], 0)
    counts = interior_counts(two, MEMBRANE, 5)
    assert counts[4] > counts[CELL] and main_interior(counts) == 4
    assert main_interior(np.zeros(5)) is None
    # tissue in no cell: a slab whose ids are removed
    lost = ids.copy()
    lost[:, 20:26] = 0
    evidence = _evidence(image, spacing)
    drawn = boundary_on_cells(two, lost, MEMBRANE, evidence)
    free = unstained(evidence, stain_sums(evidence, two, MEMBRANE))
    slab = (lost == 0) & (two == MEMBRANE)
    assert (slab & free).sum() > 100 and (slab & ~free).sum() > 100
    np.testing.assert_array_equal(drawn[slab & free], 4)
    np.testing.assert_array_equal(drawn[slab & ~free], MEMBRANE)
    assert (slab & ~free & membrane).sum() >= 0.9 * (slab & membrane).sum()  # the stain stays
    np.testing.assert_array_equal(drawn[cell_band(lost)], MEMBRANE)
    kept = boundary_on_cells(two, lost, MEMBRANE)  # without the image
    np.testing.assert_array_equal(kept[slab], MEMBRANE)
    none = draw_cells(two, lost, cell_band(lost), enclosed, MEMBRANE, None, free)
    np.testing.assert_array_equal(none[slab], MEMBRANE)  # no interior class: it stays
    assert unstained(evidence, (0, 0, 5, 1)) is None  # the classes never meet


def test_enclosed_classes_summed_over_chunks_equal_the_whole():
    from napari_pacseg.engine.plan import split_box, whole
    from napari_pacseg.instances.cells import apply_enclosed, enclosed_lut, enclosed_pairs

    _, _, labels, _, spacing = _thick_prediction()
    labels[(labels == CELL) & (np.arange(48)[None, :, None] < 21)] = 4
    ids = instance_labels(labels, spacing, InstanceConfig(radius=8.0, boundary="membrane"),
                          classes=[*CLASSES, "other"])  # fmt: skip
    parts = [enclosed_pairs(ids, labels, MEMBRANE, core=box)
             for box in split_box(whole(labels.shape), (5, 12, 12))]  # fmt: skip
    lut, has = enclosed_lut(*(np.concatenate([p[k] for p in parts]) for k in range(3)),
                            int(ids.max()) + 1, labels.dtype)  # fmt: skip
    want = enclosed_labels(ids, labels, MEMBRANE)
    np.testing.assert_array_equal(apply_enclosed(labels, ids, lut, has), want)
    assert {4, CELL} <= set(np.unique(want[ids > 0]))


@pytest.mark.parametrize("stain", ["bright", "dark"])
def test_the_labels_pass_over_zarr_chunks_equals_memory(tmp_path, stain):
    """``chunked_cells.labels_pass`` on zarr arrays (odd chunks, a threads scheduler, the
    membrane a class of its own with the outside as background, two interior classes, tissue
    in no cell, the image read per chunk) gives ``boundary_on_cells``'s labels."""
    dask = pytest.importorskip("dask")
    zarr = pytest.importorskip("zarr")
    from napari_pacseg.engine.plan import split_box, whole
    from napari_pacseg.instances.cells import boundary_on_cells, stain_sums
    from napari_pacseg.instances.chunked import Brightness, IdArrays
    from napari_pacseg.instances.chunked_cells import labels_pass
    from napari_pacseg.io.volumes import Layout

    _, _, labels, image, spacing = _thick_prediction(stain=stain)
    labels[:, :, 40:] = 0  # outside the tissue
    labels[(labels == CELL) & (np.arange(48)[None, :, None] < 20)] = 4
    classes = [*CLASSES, "other"]
    _, ids = _drawn(labels, image, spacing, classes=classes)
    ids[:, 20:26] = 0  # tissue in no cell
    evidence = _evidence(image, spacing)
    want = boundary_on_cells(labels, ids, MEMBRANE, evidence)
    assert (want != labels).sum() > 1000
    assert ((ids == 0) & (labels == MEMBRANE) & (want != MEMBRANE)).sum() > 100
    chunks = (5, 12, 11)
    paths = {}
    for name, array in (("labels", labels), ("ids", ids), ("image", image)):
        paths[name] = str(tmp_path / f"{name}.zarr")
        zarr.open_array(paths[name], mode="w", shape=array.shape, chunks=chunks,
                        dtype=array.dtype)[:] = array  # fmt: skip
    boxes = split_box(whole(labels.shape), chunks)
    sums = tuple(sum(parts) for parts in zip(*[
        stain_sums(evidence, labels, MEMBRANE, core=box) for box in boxes]))  # fmt: skip
    assert sums == stain_sums(evidence, labels, MEMBRANE)
    lo, hi = float(image.min()), float(image.max())
    source = zarr.open_array(paths["image"], mode="r")
    calls = []
    changed = labels_pass(
        lambda tasks: list(dask.compute(*tasks, scheduler="threads", num_workers=4)),
        IdArrays(paths["labels"], paths["ids"], str(tmp_path / "cc.zarr")), boxes, spacing,
        InstanceConfig(radius=8.0, boundary="membrane"), "test", MEMBRANE, len(classes),
        int(ids.max()), Brightness(source, Layout((0, 1, 2)), "image", (lo,), (hi,)), sums,
        lambda: calls.append(1),
    )  # fmt: skip
    np.testing.assert_array_equal(zarr.open_array(paths["labels"], mode="r")[:], want)
    assert changed == (want != labels).sum() and calls == [1]


def test_the_drawing_of_a_2d_image_is_the_one_plane_volume_s():
    """``boundary_on_cells`` takes a 2D image's ``(H, W)`` arrays (neighbours in the plane):
    the same as the one-plane volume, which has no neighbour along z."""
    from napari_pacseg.instances.cells import boundary_on_cells

    _, _, labels, image, spacing = _thick_prediction()
    plane = labels[8]
    ids = instance_labels(plane, spacing[1:], InstanceConfig(radius=8.0, boundary="membrane"),
                          classes=CLASSES)  # fmt: skip
    evidence = _evidence(image[8:9], spacing)[0]
    ids[:, 20:24] = 0  # tissue in no cell
    flat = boundary_on_cells(plane, ids, MEMBRANE, evidence)
    assert flat.shape == plane.shape and (flat != plane).sum() > 50
    lifted = boundary_on_cells(plane[None], ids[None], MEMBRANE, evidence[None])
    np.testing.assert_array_equal(flat, lifted[0])
    faces = _faces_between(ids)
    np.testing.assert_array_equal(flat[faces], MEMBRANE)
    # in the plane only: two planes of different cells have no band between them
    stacked = np.stack([np.ones((4, 4), np.int32), np.full((4, 4), 2, np.int32)])
    assert not cell_band(stacked, planar=True).any() and cell_band(stacked).all()


def test_the_stain_sums_given_are_the_ones_read():
    """``instance_labels``' ``stain`` and ``boundary_on_cells``' ``sums`` (``image_sums``,
    counted once by their callers): the image's own give what counting them there gives, sums
    of the other side turn the contrast and give other cells."""
    from napari_pacseg.instances.cells import boundary_on_cells, image_sums

    spacing, radius = (1.0, 1.0, 1.0), 5.0
    _, membrane = honeycomb((10, 36, 36), spacing, radius, seed=3)
    labels = np.where(membrane, MEMBRANE, CELL).astype(np.uint8)
    labels[:, ::7] = CELL  # gaps in the membrane: the stain splits the cells there
    evidence = ndi.gaussian_filter(membrane.astype(np.float32), 1.0)
    config = InstanceConfig(radius=radius, boundary="membrane")
    boundary = boundary_label(config, CLASSES)
    sums = image_sums(evidence, labels, boundary)
    kw = dict(evidence=evidence, classes=CLASSES)
    ids = instance_labels(labels, spacing, config, **kw)
    np.testing.assert_array_equal(instance_labels(labels, spacing, config, stain=sums, **kw), ids)
    turned = (sums[2], sums[3], sums[0], sums[1])  # the interiors' side as the stain's
    assert not np.array_equal(instance_labels(labels, spacing, config, stain=turned, **kw), ids)
    drawn = boundary_on_cells(labels, ids, boundary, evidence)
    np.testing.assert_array_equal(boundary_on_cells(labels, ids, boundary, evidence, sums=sums),
                                  drawn)  # fmt: skip


def test_a_zarr_run_of_a_request_without_objects_refines_as_its_cells_do(tmp_path, demo, crop):
    """``segment_zarr`` of a ``SegmentRequest`` built without objects, with ``instances_out``:
    the model's own objects (cells mode here) run at their fit (``objects_refine``), as
    ``segment(instances=True)`` does."""
    pytest.importorskip("distributed")
    zarr = pytest.importorskip("zarr")
    from napari_pacseg import segment
    from napari_pacseg.batch import segment_zarr
    from napari_pacseg.engine.request import SegmentRequest

    cells = dataclasses.replace(demo.config.instances, **CELLS)
    model = PacSegModel(dataclasses.replace(demo.config, instances=cells))
    model.load_state_dict(demo.state_dict())
    spacing = load_sample().spacing
    want = segment(crop, model, spacing=spacing, instances=True)
    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=crop.shape,
                             chunks=(8, 32, 32), dtype=crop.dtype)  # fmt: skip
    source[:] = crop
    request = SegmentRequest.build(model, spacing=spacing)
    assert request.instances is None and request.refine.fit_weight != cells.split_fit
    segment_zarr(tmp_path / "in.zarr", request, tmp_path / "labels.zarr", chunks=(8, 32, 32),
                 matte_out=tmp_path / "matte.zarr", instances_out=tmp_path / "ids.zarr")  # fmt: skip
    matte = zarr.open_array(str(tmp_path / "matte.zarr"), mode="r")[:]
    np.testing.assert_allclose(matte, want.matte, atol=1e-5)
    ids = zarr.open_array(str(tmp_path / "ids.zarr"), mode="r")[:]
    np.testing.assert_array_equal(ids, want.instances)
