"""Instance labels (``instances.instance_labels``, ``segment(instances=...)``) and the
measurement table (``instances.object_table``)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_pacseg import (
    InstanceConfig,
    PacSegModel,
    SegmentationCancelled,
    image_range,
    instance_labels,
    load_model,
    object_table,
    save_model,
    segment,
    train,
)
from napari_pacseg.instances.labels import brightness_evidence
from napari_pacseg.io.model_file import config_from_dict, config_to_dict
from napari_pacseg.sample import load_demo_model, load_sample


def balls(shape, spacing, spheres, value=1) -> np.ndarray:
    """uint8 labels: ``value`` inside each ``(centre, radius)`` (physical units)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))
    out = np.zeros(shape, np.uint8)
    for centre, radius in spheres:
        d2 = ((grid - np.asarray(centre, float)[:, None, None, None]) ** 2).sum(0)
        out[d2 < radius**2] = value
    return out


def chain(radii, centre=(15.0, 20.0, 12.0), overlap=0.85, axis=2):
    """Spheres in a row, each touching the last: centres 0.85 x the sum of the radii apart."""
    spheres, pos = [], np.asarray(centre, float)
    for i, r in enumerate(radii):
        if i:
            pos = pos.copy()
            pos[axis] += overlap * (radii[i - 1] + r)
        spheres.append((pos, r))
    return spheres


@pytest.mark.parametrize(
    "radii", [(5.0, 5.0), (5.0, 5.0, 5.0), (6.0, 4.0), (4.0, 6.0, 5.0), (7.0, 3.5)], ids=str
)
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.0, 1.0), (1.0, 0.5, 0.5)], ids=str)
def test_touching_spheres_split_into_their_count(radii, spacing):
    shape = tuple(int(n / s) for n, s in zip((30.0, 40.0, 60.0), spacing))
    labels = balls(shape, spacing, chain(radii), value=2)
    ids = instance_labels(labels, spacing)
    assert ids.max() == len(radii)
    sizes = np.bincount(ids.ravel())[1:] * np.prod(spacing)
    expected = [4 / 3 * np.pi * r**3 for r in radii]
    # each object is mostly one sphere: volumes within 25% of the sphere's
    assert np.allclose(sorted(sizes), sorted(expected), rtol=0.25)


@pytest.mark.parametrize("seed", range(4))
def test_an_isolated_object_is_never_split(seed):
    """Rough, elongated or flattened single objects stay one, at 1:1 and 3:1 spacing; very
    rough ones when ``radius`` is their size."""
    rng = np.random.default_rng(seed)
    for spacing in ((1.0, 1.0, 1.0), (3.0, 1.0, 1.0)):
        shape = tuple(int(n / s) for n, s in zip((36.0, 48.0, 48.0), spacing))
        grid = np.stack(
            np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
        )
        radii = rng.uniform(4.0, 12.0, 3)
        r = (((grid - np.array([18.0, 24.0, 24.0])[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0)  # fmt: skip
        bumps = ndi.gaussian_filter(rng.standard_normal(shape), 1.0)
        bumps /= bumps.std()
        for roughness, config in ((0.15, InstanceConfig()), (0.3, InstanceConfig(radius=8.0))):
            pieces = ndi.label(r + roughness * bumps < 1)[0]
            largest = np.argmax(np.bincount(pieces.ravel())[1:]) + 1
            labels = np.where(pieces == largest, 2, 0).astype(np.uint8)
            assert instance_labels(labels, spacing, config).max() == 1, (radii, spacing)


def test_a_sphere_in_physical_units_stays_one_object_at_3_to_1_spacing():
    spacing = (3.0, 1.0, 1.0)
    labels = balls((14, 40, 40), spacing, [((21.0, 20.0, 20.0), 9.0)], value=2)
    assert instance_labels(labels, spacing).max() == 1
    # read as isotropic voxels the same mask is a flat disc; still one object
    assert instance_labels(labels, (1.0, 1.0, 1.0)).max() == 1


def test_ids_are_consecutive_connected_and_inside_the_classes():
    spacing = (1.0, 1.0, 1.0)
    labels = balls((30, 40, 80), spacing, chain((5.0, 5.0, 4.0)), value=2)
    labels |= balls((30, 40, 80), spacing, [((15.0, 20.0, 68.0), 5.0)], value=3)
    ids = instance_labels(labels, spacing)
    assert ids.dtype == np.int32 and ids.shape == labels.shape
    assert set(np.unique(ids)) == set(range(ids.max() + 1)) and ids.max() == 4
    assert not ids[labels == 0].any() and (ids[labels > 0] > 0).all()
    for i in range(1, ids.max() + 1):
        assert ndi.label(ids == i)[1] == 1  # one 6-connected piece
        assert np.unique(labels[ids == i]).size == 1  # one class


def test_two_classes_in_contact_are_two_objects():
    """Instances are per class: a blob half of one class, half of another, is two objects."""
    spacing = (1.0, 1.0, 1.0)
    labels = balls((24, 24, 40), spacing, [((12.0, 12.0, 20.0), 9.0)], value=2)
    labels[:, :, 20:][labels[:, :, 20:] == 2] = 3
    ids = instance_labels(labels, spacing)
    assert ids.max() == 2
    assert set(np.unique(labels[ids == 1])) != set(np.unique(labels[ids == 2]))


def test_small_objects_are_removed_and_min_volume_is_physical():
    spacing = (2.0, 1.0, 1.0)
    labels = balls((20, 40, 60), spacing, [((20.0, 20.0, 15.0), 6.0), ((20.0, 20.0, 45.0), 1.5)], 2)  # fmt: skip
    assert instance_labels(labels, spacing, InstanceConfig(min_volume=0.0)).max() == 2
    small = 4 / 3 * np.pi * 1.5**3
    ids = instance_labels(labels, spacing, InstanceConfig(min_volume=3 * small))
    assert ids.max() == 1 and not ids[:, :, 35:].any()


def test_min_volume_auto_is_a_ball_of_half_the_radius(tmp_path):
    spacing = (2.0, 1.0, 1.0)
    # a ball of radius 6 and one of 1.5: auto at radius 4 keeps balls from radius 2 up
    labels = balls((20, 40, 60), spacing, [((20.0, 20.0, 15.0), 6.0), ((20.0, 20.0, 45.0), 1.5)], 2)  # fmt: skip
    auto = InstanceConfig(radius=4.0)
    assert auto.min_volume is None and auto.smallest() == pytest.approx(4 / 3 * np.pi * 8)
    assert auto.smallest(planar=True) == pytest.approx(np.pi * 4)
    ids = instance_labels(labels, spacing, auto)
    assert ids.max() == 1 and not ids[:, :, 35:].any()
    assert instance_labels(labels, spacing, InstanceConfig(radius=2.0)).max() == 2  # from 1 up
    assert InstanceConfig(min_volume=7.5).smallest() == 7.5  # a given value is kept
    cells = InstanceConfig(radius=8.0, boundary="membrane")  # cells: a quarter of the radius
    assert cells.smallest() == pytest.approx(4 / 3 * np.pi * 8)
    # a model file keeps None (auto) as None
    demo = load_demo_model()
    config = dataclasses.replace(demo.config, instances=InstanceConfig(radius=4.0))
    model = PacSegModel(config)
    model.load_state_dict(demo.state_dict())
    save_model(model, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").config.instances.min_volume is None


def test_objects_cut_by_the_border_are_kept_from_an_eighth_of_the_auto_size():
    from napari_pacseg.model.network import BORDER_SHARE

    auto = InstanceConfig(radius=4.0)  # whole objects from 33.5 voxels up, cut ones from 4.2
    assert auto.smallest(cut=True) == pytest.approx(BORDER_SHARE * auto.smallest())
    labels = np.zeros((12, 20, 30), np.uint8)
    labels[5:7, 8:11, 8:11] = 1  # 18 voxels inside: dropped
    labels[5:7, 0:3, 20:23] = 1  # 18 voxels on the y border: kept (a cut nucleus)
    labels[0:2, 14:16, 26:28] = 1  # 8 voxels on the z border: kept
    labels[11, 0:2, 0:2] = 1  # 4 voxels in a corner: under an eighth, dropped
    ids = instance_labels(labels, (1.0, 1.0, 1.0), auto)
    assert ids.max() == 2 and ids[5, 0, 20] and ids[0, 14, 26] and not ids[11, 0, 0]
    # a size the user gives holds everywhere
    given = InstanceConfig(radius=4.0, min_volume=auto.smallest())
    assert instance_labels(labels, (1.0, 1.0, 1.0), given).max() == 0
    # cells mode keeps its own rule: small interior pieces join the cells around them
    assert InstanceConfig(radius=8.0, boundary="m").smallest(cut=True) == pytest.approx(
        InstanceConfig(radius=8.0, boundary="m").smallest()
    )
    # 2D: whole from 12.6 pixels, cut from 1.6; the plane itself is no border
    flat = np.zeros((20, 30), np.uint8)
    flat[8:10, 8:10] = 1  # 4 pixels inside: dropped
    flat[0:2, 20:22] = 1  # 4 pixels on the border: kept
    flat[19, 5] = 1  # 1 pixel on the border: dropped
    ids = instance_labels(flat, (1.0, 1.0), auto)
    assert ids.max() == 1 and ids[0, 20] == 1


def test_fragments_touching_a_border_side_are_found():
    """The fragments of a split that reach a side of the piece's box on the image's border (the
    ones kept from the cut size up), on the padded box the split works on."""
    from napari_pacseg.instances.labels import _touching

    ids = np.zeros((5, 6, 6), np.int32)  # a box of (3, 4, 4) padded by 1
    ids[1:4, 1:5, 1:3] = 1  # on the box's low x side
    ids[1:4, 1:5, 3:5] = 2  # on its high x side
    ids[1, 2, 3] = 3  # on its low z side
    low_x = ((False, False), (False, False), (True, False))
    assert _touching(ids, low_x, 1, 3).tolist() == [True, False, False]
    assert _touching(ids, ((True, False), (False, False), (False, True)), 1, 3).tolist() == [
        True, True, True,
    ]  # fmt: skip
    flat = ids[2:3]  # a 2D image's piece: padded in y and x only
    pad = ((0, 0), (1, 1), (1, 1))
    assert _touching(flat, ((False, False), (False, False), (False, True)), pad, 3).tolist() == [
        False, True, False,
    ]  # fmt: skip


def test_sensitivity_controls_splitting():
    spacing = (1.0, 1.0, 1.0)
    labels = balls((30, 40, 60), spacing, chain((5.0, 5.0), overlap=0.85), value=2)
    assert instance_labels(labels, spacing, InstanceConfig(sensitivity=0.85)).max() == 2
    assert instance_labels(labels, spacing, InstanceConfig(sensitivity=0.0, radius=5.0)).max() == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"radius": 0.0}, "radius must be a number in"),
        ({"radius": float("nan")}, "radius"),
        ({"sensitivity": 1.0}, "sensitivity must be a number in"),
        ({"sensitivity": -0.1}, "sensitivity"),
        ({"min_volume": -1.0}, "min_volume"),
        ({"radius": "3"}, "radius"),
        ({"radius": True}, "radius"),
    ],
)
def test_bad_instance_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InstanceConfig(**kwargs)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"2D \(H, W\) or 3D \(D, H, W\) integer array"):
        instance_labels(np.zeros((4, 4)), (1, 1))
    with pytest.raises(ValueError, match=r"3D .* integer array"):
        instance_labels(np.zeros((4, 4, 4), np.float32), (1, 1, 1))
    with pytest.raises(ValueError, match="integer array, got 4D"):
        instance_labels(np.zeros((2, 4, 4, 4), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match=r"spacing must be 2 positive numbers \(y, x\)"):
        instance_labels(np.zeros((4, 4), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        instance_labels(np.zeros((4, 4, 4), np.uint8), (1, -1, 1))
    sample = load_sample()
    image = sample.image[:8, :32, :32]
    model = load_demo_model()
    with pytest.raises(ValueError, match="instances must be True, False, an InstanceConfig"):
        segment(image, model, instances="yes")
    with pytest.raises(ValueError, match="unknown parameters \\['size'\\]"):
        segment(image, model, instances={"size": 3})
    with pytest.raises(ValueError, match="sensitivity"):
        segment(image, model, instances={"sensitivity": 2.0})


def test_object_table_measures_each_object():
    spacing = (2.0, 0.5, 0.5)
    spheres = [((20.0, 10.0, 10.0), 6.0), ((20.0, 10.0, 28.0), 4.0)]
    labels = balls((20, 40, 80), spacing, spheres, value=2)
    image = np.zeros((2, *labels.shape), np.float32)
    image[0][labels > 0] = 5.0
    image[1] = np.arange(labels.shape[2], dtype=np.float32)[None, None, :]
    ids = instance_labels(labels, spacing)
    table = object_table(ids, labels, image, spacing, ["background", "nucleus"])
    assert list(table["id"]) == [1, 2]
    assert list(table["class"]) == [1, 1] and list(table["class_name"]) == ["nucleus"] * 2
    for i, (centre, radius) in enumerate(spheres):
        mask = ids == i + 1
        assert table["volume"][i] == pytest.approx(mask.sum() * 0.5)
        assert table["volume"][i] == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.1)
        zyx = np.argwhere(mask).mean(0) * spacing
        assert [table[f"centroid_{a}"][i] for a in "zyx"] == pytest.approx(list(zyx))
        assert [table[f"centroid_{a}"][i] for a in "zyx"] == pytest.approx(centre, abs=0.3)
        box = ndi.find_objects(mask.astype(int))[0]
        assert [table[f"bbox_{a}0"][i] for a in "zyx"] == [s.start for s in box]
        assert [table[f"bbox_{a}1"][i] for a in "zyx"] == [s.stop for s in box]
        assert table["mean_intensity_c0"][i] == 5.0 and table["max_intensity_c0"][i] == 5.0
        assert table["mean_intensity_c1"][i] == pytest.approx(image[1][mask].mean())
        assert table["max_intensity_c1"][i] == box[2].stop - 1
        assert table["surface_area"][i] == pytest.approx(4 * np.pi * radius**2, rel=0.15)
        assert 0.8 < table["sphericity"][i] <= 1.05
    # a long box is far from a ball
    bar = np.zeros((10, 10, 60), np.uint8)
    bar[3:7, 3:7, 5:55] = 2
    tab = object_table(instance_labels(bar, (1, 1, 1)), bar, None, (1, 1, 1))
    assert tab["sphericity"][0] < 0.6 and "mean_intensity" not in tab
    with pytest.raises(ValueError, match="does not match"):
        object_table(ids, labels, image[:, :5], spacing)


def test_an_empty_segmentation_has_no_objects():
    labels = np.zeros((6, 8, 8), np.uint8)
    ids = instance_labels(labels, (1, 1, 1))
    assert ids.max() == 0
    table = object_table(ids, labels, labels, (1, 1, 1), ["background", "x"])
    assert all(len(v) == 0 for v in table.values()) and "sphericity" in table


def test_segment_with_instances_on_the_sample():
    sample = load_sample()
    image = sample.image[16:48, 64:192, 64:192]  # 10 nuclei, some cut by the edges
    model = load_demo_model()
    result = segment(image, model, spacing=sample.spacing, instances=True)
    ids = result.instances
    assert ids.shape == image.shape and ids.max() >= 8
    assert not ids[result.labels == 0].any()
    config = model.config.instances
    lo, hi = image_range(image[None], model.config.normalisation)
    bright = brightness_evidence(image[None], lo.numpy(), hi.numpy(), sample.spacing, config)
    assert np.array_equal(ids, instance_labels(result.labels, sample.spacing, config, evidence=bright))
    assert "instances" in result.timings
    table = result.objects
    assert len(table) == ids.max()
    assert list(table["id"]) == list(range(1, ids.max() + 1))
    assert set(table["class_name"]) == {"nucleus"}
    # tiled == untiled, and overrides per call
    tiled = segment(image, model, spacing=sample.spacing, instances=True, tile_shape=(16, 48, 40))
    assert np.array_equal(tiled.instances, ids)
    fewer = segment(image, model, spacing=sample.spacing, instances={"min_volume": 150.0})
    assert 0 < fewer.instances.max() < ids.max()
    assert segment(image, model, spacing=sample.spacing).instances is None


def test_instances_on_the_sample_match_its_truth():
    """The sample's bundled instance truth: ours finds its nuclei one by one (F1 at IoU 0.5)."""
    sample = load_sample()
    truth = sample.instances
    assert truth.max() == 45 and np.array_equal(truth > 0, sample.truth)
    sl = (slice(8, 56), slice(0, 160), slice(0, 160))
    result = segment(sample.image[sl], load_demo_model(), spacing=sample.spacing, instances=True)
    t, p = truth[sl], result.instances
    matched = 0
    for i in np.unique(t[t > 0]):
        ids, counts = np.unique(p[t == i], return_counts=True)
        j, inter = ids[np.argmax(counts)], counts.max()
        if j and inter / ((t == i).sum() + (p == j).sum() - inter) >= 0.5:
            matched += 1
    n_t, n_p = np.unique(t[t > 0]).size, int(p.max())
    assert 2 * matched / (n_t + n_p) >= 0.8


def test_segment_instances_can_be_cancelled():
    sample = load_sample()
    image = sample.image[16:40, :96, :96]
    tiles_done = []

    def progress(done, total):
        if done == total:
            tiles_done.append(True)

    with pytest.raises(SegmentationCancelled, match="instance"):
        segment(image, load_demo_model(), spacing=sample.spacing, instances=True,
                progress=progress, should_cancel=lambda: bool(tiles_done))  # fmt: skip
    assert tiles_done  # cancelled in the instance step, after every tile


def test_the_model_file_carries_the_instance_config(tmp_path):
    demo = load_demo_model()
    config = dataclasses.replace(demo.config, instances=InstanceConfig(radius=4.5, min_volume=30.0))
    model = PacSegModel(config)
    model.load_state_dict(demo.state_dict())
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config.instances == InstanceConfig(radius=4.5, min_volume=30.0)
    # a file written before instances existed loads with the defaults
    data = config_to_dict(model.config)
    del data["instances"]
    assert config_from_dict(data).instances == InstanceConfig()


def test_a_piece_whose_parts_are_all_too_small_stays_one_object():
    spacing = (1.0, 1.0, 1.0)
    labels = balls((20, 20, 30), spacing, chain((3.0, 3.0), centre=(10.0, 10.0, 10.0)), value=2)
    one = 4 / 3 * np.pi * 27
    assert instance_labels(labels, spacing, InstanceConfig(radius=1.0, min_volume=0.0)).max() == 2
    ids = instance_labels(labels, spacing, InstanceConfig(radius=1.0, min_volume=1.2 * one))
    assert ids.max() == 1 and np.array_equal(ids > 0, labels > 0)


def discs(shape, spacing, circles) -> np.ndarray:
    """2D uint8 labels: 1 inside each ``(centre, radius)`` (physical units)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))
    out = np.zeros(shape, np.uint8)
    for centre, radius in circles:
        out[((grid - np.asarray(centre, float)[:, None, None]) ** 2).sum(0) < radius**2] = 1
    return out


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 0.25)])
@pytest.mark.parametrize("count", [2, 3])
def test_touching_discs_split_into_their_count_in_2d(spacing, count):
    """A 2D image's pieces are split in the plane (no z distance caps them)."""
    r = 4.0
    circles = [((12.0, 8.0 + i * 0.85 * 2 * r), r) for i in range(count)]
    shape = (int(24 / spacing[0]), int(48 / spacing[1]))
    labels = discs(shape, spacing, circles)
    assert ndi.label(labels)[1] == 1  # one connected piece
    ids = instance_labels(labels, spacing, InstanceConfig(radius=3.0, min_volume=5.0))
    assert ids.shape == labels.shape and ids.max() == count
    isolated = instance_labels(discs(shape, spacing, circles[:1]), spacing, InstanceConfig(radius=3.0))
    assert isolated.max() == 1


def test_a_dim_gap_splits_objects_the_mask_fused():
    """Two bright balls joined by a slab of foreground with no neck in the mask: the shape
    alone keeps them one object; the image's dim gap splits them. An isolated ball stays one."""
    from napari_pacseg.instances.labels import brightness_evidence

    spacing = (1.0, 0.5, 0.5)
    shape = (16, 40, 64)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))
    image = np.zeros(shape, np.float32)
    for cx in (10.0, 22.0):  # two bright nuclei, 12 apart, radius 5.5
        d2 = (grid[0] - 8) ** 2 + (grid[1] - 10) ** 2 + (grid[2] - cx) ** 2
        image += np.exp(-d2 / (2 * 3.0**2))
    mask = np.zeros(shape, np.uint8)  # a fused foreground: a box around both, no neck
    mask[3:13, 10:30, 8:56] = 1
    config = InstanceConfig(radius=4.0, min_volume=5.0, brightness=1.0)
    bright = brightness_evidence(image[None], [0.0], [1.0], spacing, config)
    assert instance_labels(mask, spacing, dataclasses.replace(config, brightness=0.0)).max() == 1
    assert instance_labels(mask, spacing, config, evidence=bright).max() == 2
    one = np.exp(-((grid[0] - 8) ** 2 + (grid[1] - 10) ** 2 + (grid[2] - 16.0) ** 2) / 18.0)
    single = brightness_evidence(one[None].astype(np.float32), [0.0], [1.0], spacing, config)
    ball = (((grid[0] - 8) ** 2 + (grid[1] - 10) ** 2 + (grid[2] - 16) ** 2) < 5.5**2)
    assert instance_labels(ball.astype(np.uint8), spacing, config, evidence=single).max() == 1


# --- objects seeded by a stronger local fit (InstanceConfig.split_fit) ---------------------------


def _ellipse(shape, spacing, centre, axes) -> np.ndarray:
    """bool: inside the ellipse (2D) or ellipsoid (3D) of semi-axes ``axes`` (physical units)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, axes)) < 1


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 0.25), (1.0, 0.5, 0.5), (2.0, 0.5, 0.5)])
def test_seeds_split_a_piece_whose_shape_is_one_object(spacing):
    """An elongated piece with no neck is one object by its shape; seeds cut across its middle
    (the dim gap a stronger fit drops) make two, which together cover the piece; seeds of
    another class, or that differ from the piece by less than the smallest object, change
    nothing; a piece whose seeds are a smaller copy of it stays one."""
    extent = (20.0, 16.0, 40.0)[-len(spacing) :]  # physical size per axis
    shape = tuple(int(e / s) for e, s in zip(extent, spacing))
    centre = tuple(e / 2 for e in extent)
    axes = (7.0, 6.0, 17.0)[-len(spacing) :]
    piece = _ellipse(shape, spacing, centre, axes)
    labels = piece.astype(np.uint8) * 2
    config = InstanceConfig(radius=4.0)
    assert instance_labels(labels, spacing, config).max() == 1
    x = np.arange(shape[-1]) * spacing[-1]
    gap = np.abs(x - centre[-1]) < 1.5  # 3 units wide, across the long axis
    seeds = np.where(gap, 0, labels).astype(np.uint8)
    ids = instance_labels(labels, spacing, config, seeds=seeds)
    assert ids.max() == 2
    np.testing.assert_array_equal(ids > 0, piece)  # the seeds grew over the whole piece
    left, right = piece & ~gap & (x < centre[-1]), piece & ~gap & (x > centre[-1])
    assert len(np.unique(ids[left])) == len(np.unique(ids[right])) == 1  # one object a side
    other = np.where(gap, 0, 3 * piece).astype(np.uint8)  # the seeds of another class
    assert instance_labels(labels, spacing, config, seeds=other).max() == 1
    voxel = float(np.prod(spacing))
    taken = np.cumsum((piece & gap).ravel()).reshape(shape) * voxel
    nick = piece & gap & (taken < 0.5 * config.smallest(len(spacing) == 2))  # a few voxels
    assert nick.any()
    assert instance_labels(labels, spacing, config, seeds=np.where(nick, 0, labels)).max() == 1
    smaller = _ellipse(shape, spacing, centre, [0.8 * a for a in axes])
    assert instance_labels(labels, spacing, config, seeds=2 * smaller.astype(np.uint8)).max() == 1


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 0.5, 0.5)])
def test_seeds_never_merge_what_the_shape_splits(spacing):
    """Two touching discs (balls) split by their shape; seeds that lost one of them (a dim
    nucleus the stronger fit drops) still give two objects."""
    r = 6.0
    extent = (16.0, 20.0, 40.0)[-len(spacing) :]
    shape = tuple(int(e / s) for e, s in zip(extent, spacing))
    centres = [(*(e / 2 for e in extent[:-1]), x) for x in (12.0, 12.0 + 1.7 * r)]
    a, b = (_ellipse(shape, spacing, c, (r,) * len(spacing)) for c in centres)
    labels = (a | b).astype(np.uint8)
    assert ndi.label(labels)[1] == 1
    config = InstanceConfig(radius=4.0)
    assert instance_labels(labels, spacing, config).max() == 2
    assert instance_labels(labels, spacing, config, seeds=a.astype(np.uint8)).max() == 2


def test_bad_seeds_are_refused():
    labels = np.zeros((8, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="seeds must be integer class labels"):
        instance_labels(labels, (1, 1, 1), seeds=np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="seeds must be integer class labels"):
        instance_labels(labels, (1, 1, 1), seeds=np.zeros((8, 8, 8), np.float32))
    with pytest.raises(ValueError, match="split_fit must be a number"):
        InstanceConfig(split_fit=-1.0)


@pytest.fixture(scope="module")
def fused_pair():
    """The dim-gap pair (``dim_gap.fused_pair``), its model, and a copy without the gap."""
    from tests.napari_pacseg.dim_gap import fused_pair as make

    image, strokes = make()
    model = train(image, strokes, seed=0)
    return image, make(gap_value=1.0)[0], model


def test_segment_seeds_objects_from_a_stronger_fit(fused_pair):
    """The 2D model's labels fuse two nuclei across a dim gap; the refinement with the fit at
    ``split_fit`` drops the gap, and its labels (``Segmentation.seeds``: that refinement run
    alone with ``SEED_ITERATIONS`` steps) seed two objects; ``split_fit`` 0 keeps one, and so
    does the same ellipse without a gap; tiles change nothing (brightness 0 throughout: the
    masks' shapes alone). The default brightness splits the gap without those seeds too, and
    leaves the ellipse without a gap whole."""
    from napari_pacseg.engine.plan import SEED_ITERATIONS

    image, no_gap, model = fused_pair
    kw = {"precision": "float32", "device": "cpu"}
    shape = {"radius": 4.0, "brightness": 0}
    assert model.config.refine.fit_weight < model.config.instances.split_fit
    off = segment(image, model, instances={**shape, "split_fit": 0}, **kw)
    assert off.instances.max() == 1 and off.seeds is None
    seg = segment(image, model, instances=shape, **kw)
    assert seg.instances.max() == 2
    np.testing.assert_array_equal(seg.instances > 0, seg.labels > 0)
    alone = segment(image, model, refine={"fit_weight": 1.0, "iterations": SEED_ITERATIONS}, **kw)
    np.testing.assert_array_equal(seg.seeds, alone.labels)
    assert seg.timings["instances"] > 0 and "seeds" not in seg.timings
    tiled = segment(image, model, instances=shape, tile_shape=(24, 24), **kw)
    np.testing.assert_array_equal(tiled.instances, seg.instances)
    np.testing.assert_array_equal(tiled.seeds, seg.seeds)
    assert segment(no_gap, model, instances=shape, **kw).instances.max() == 1
    # no refinement, or a fit already of that weight: the labels seed the objects themselves
    assert segment(image, model, refine=False, instances=shape, **kw).seeds is None
    same = segment(image, model, refine={"fit_weight": 1.0}, instances=shape, **kw)
    assert same.seeds is None
    bright = {"radius": 4.0, "split_fit": 0}  # InstanceConfig's default brightness
    assert segment(image, model, instances=bright, **kw).instances.max() == 2
    assert segment(no_gap, model, instances=bright, **kw).instances.max() == 1


def test_volumes_seed_with_a_stronger_fit_than_2d_models(fused_pair):
    """Volume models seed their objects with the fit at ``InstanceConfig()``'s ``split_fit``
    (2.0), the 2D models ``train`` makes at ``SPLIT_FIT_2D`` (as their refinement's own fit is
    weaker); a 2D file written before the seeding fit loads with the 2D value, a volume's with
    the default."""
    from napari_pacseg.model.network import SPLIT_FIT_2D
    from napari_pacseg.training.defaults import default_instances

    assert default_instances(3) == InstanceConfig() and InstanceConfig().split_fit == 2.0
    assert default_instances(2) == InstanceConfig(split_fit=SPLIT_FIT_2D)
    assert 0 < SPLIT_FIT_2D < InstanceConfig().split_fit
    _, _, model = fused_pair
    assert model.config.ndim == 2 and model.config.instances == default_instances(2)
    for config, expected in ((model.config, SPLIT_FIT_2D),
                             (dataclasses.replace(model.config, ndim=3), 2.0)):  # fmt: skip
        data = config_to_dict(config)
        del data["instances"]["split_fit"]
        assert config_from_dict(data).instances.split_fit == expected
        assert config_from_dict(config_to_dict(config)).instances == config.instances


def test_cells_mode_takes_no_seeds_and_refines_with_the_split_fit(fused_pair):
    """Cells mode runs one refinement, a volume model's local fit weighing ``split_fit``
    (``objects_refine``; 2D models keep theirs): no seeds; the matte is that refinement's."""
    from napari_pacseg.engine.request import SegmentRequest, objects_refine

    image, _, flat = fused_pair  # a 2D model: its own fit (no 2D membrane image measured it)
    cells = {"radius": 4.0, "boundary": flat.config.classes[0].name}
    seg = segment(image, flat, instances=cells, device="cpu")
    assert seg.seeds is None and seg.instances.max() >= 1
    request = SegmentRequest.build(flat, instances=cells)
    assert request.refine == flat.config.refine
    assert objects_refine(flat.config.refine, request.instances, 2) == flat.config.refine
    model = load_demo_model()  # a volume model
    image = np.ascontiguousarray(load_sample().image[24:32, 80:144, 80:144])
    cells = {"radius": 3.0, "boundary": "background"}
    seg = segment(image, model, instances=cells, device="cpu")
    assert seg.seeds is None and seg.instances.max() >= 1
    default = model.config.refine.fit_weight
    assert 0 < default != model.config.instances.split_fit
    build = functools.partial(SegmentRequest.build, model)
    assert build(instances=cells).refine.fit_weight == model.config.instances.split_fit
    assert build(instances={**cells, "split_fit": 1.5}).refine.fit_weight == 1.5
    assert build(instances={**cells, "split_fit": 0}).refine.fit_weight == default
    assert build(instances=cells, refine={"fit_weight": 0}).refine.fit_weight == 0  # fit off
    assert build(instances=cells, refine=False).refine is None
    assert build(instances={"radius": 4.0}).refine.fit_weight == default  # blobs: seeds
    assert build().refine.fit_weight == default
    fitted = segment(image, model, refine={"fit_weight": model.config.instances.split_fit},
                     device="cpu")  # fmt: skip
    np.testing.assert_array_equal(seg.matte, fitted.matte)
    assert (seg.matte != segment(image, model, device="cpu").matte).any()  # the fit counts
