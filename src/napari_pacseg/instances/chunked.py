"""Instance labels of a zarr label volume, chunk by chunk: the same ids as ``instance_labels``
on the whole volume in memory.

``instance_labels`` splits each connected piece of a class on its own, so a chunked run only
has to find the pieces across chunk borders; then every piece is split exactly as in memory,
on its own bounding box. Four passes of tasks (run by ``segment_zarr``'s scheduler):

1. per chunk: the 6-connected components of each class (ids unique over the volume: the
   chunk's index in the high 32 bits) into a temporary int64 zarr array, and per component its
   class, bounding box and first voxel in raster order;
2. here: components that touch across a chunk face with the same class are merged
   (union-find on the faces' planes), giving the pieces, ordered as ``instance_labels`` orders
   them (class, then the raster index of the first voxel);
3. per group of pieces: how many objects each piece splits into (``split_piece`` on the
   piece's box), so ids can be numbered consecutively;
4. per chunk: the ids of the pieces that meet the chunk (each recomputed on its box, the same
   deterministic computation) written into the output chunk.

Memory per task: a chunk, plus the bounding box of the largest piece that meets it.

Cells mode (``InstanceConfig.boundary``; ``CellRule``): the pieces are those of the cells'
interiors (every interior class as one), split with the boundary's contrast; the boundary is
then filled chunk by chunk (``instances.chunked_cells``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

from napari_pacseg.instances.cells import interior_mask, stain_contrast
from napari_pacseg.instances.evidence import smoothed_on
from napari_pacseg.instances.labels import (
    FACES,
    InstanceConfig,
    cell_weight,
    on_border,
    split_piece,
)

SHIFT = 32  # component id = (chunk index << SHIFT) + local id (1-based)


@dataclass(frozen=True)
class Piece:
    members: tuple[int, ...]  # component ids
    value: int  # the class's label value
    box: tuple[tuple[int, int], ...]
    first: int  # raster index of its first voxel


@dataclass(frozen=True)
class CellRule:
    """Cells mode for the passes: ``boundary``, the boundary class's label value; ``bright``,
    whether its stain is bright (``cells.stain_is_bright``), None without the image."""

    boundary: int
    bright: bool | None = None


def _slices(box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def piece_values(labels: np.ndarray, cells: CellRule | None) -> np.ndarray:
    """What the pieces are made of: ``labels`` itself, or in cells mode 1 on the interiors."""
    if cells is None:
        return labels
    return interior_mask(labels, cells.boundary).view(np.uint8)


def components_chunk(labels_path: str, cc_path: str, index: int, box,
                     cells: CellRule | None = None) -> list[tuple]:  # fmt: skip
    """Pass 1 for one chunk: returns ``(id, class value, box, first raster index, size)`` per
    component and writes the component ids into ``cc_path``."""
    import zarr

    labels = np.asarray(zarr.open_array(labels_path, mode="r")[_slices(box)])
    labels = piece_values(labels, cells)
    cc = np.zeros(labels.shape, np.int64)
    out, base, shape = [], 0, zarr.open_array(labels_path, mode="r").shape
    for value in np.unique(labels):
        if value == 0:
            continue
        local, n = ndi.label(labels == value, structure=FACES)
        cc[local > 0] = local[local > 0].astype(np.int64) + base + (index << SHIFT)
        for i, sl in enumerate(ndi.find_objects(local), start=1):
            coords = np.argwhere(local[sl] == i)[0] + [s.start for s in sl]
            first = int(np.ravel_multi_index(tuple(coords + [a for a, _ in box]), shape))
            gbox = tuple((s.start + a, s.stop + a) for s, (a, _) in zip(sl, box))
            out.append(((index << SHIFT) + base + i, int(value), gbox, first))
        base += n
    zarr.open_array(cc_path, mode="r+")[_slices(box)] = cc
    return out


def merge_pieces(cc_path: str, labels_path: str, boxes, comps: list[tuple],
                 cells: CellRule | None = None) -> list[Piece]:  # fmt: skip
    """Pass 2: the pieces (components joined across chunk faces), in ``instance_labels``' order."""
    import zarr

    cc = zarr.open_array(cc_path, mode="r")
    labels = zarr.open_array(labels_path, mode="r")
    parent = {c[0]: c[0] for c in comps}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    shape = cc.shape
    for box in boxes:
        for axis in range(3):
            end = box[axis][1]
            if end >= shape[axis]:
                continue
            lo = [slice(a, b) for a, b in box]
            hi = list(lo)
            lo[axis], hi[axis] = slice(end - 1, end), slice(end, end + 1)
            a, b = np.asarray(cc[tuple(lo)]).ravel(), np.asarray(cc[tuple(hi)]).ravel()
            la = piece_values(np.asarray(labels[tuple(lo)]), cells).ravel()
            lb = piece_values(np.asarray(labels[tuple(hi)]), cells).ravel()
            touch = (a > 0) & (b > 0) & (la == lb)
            for x, y in set(zip(a[touch].tolist(), b[touch].tolist())):
                rx, ry = find(x), find(y)
                if rx != ry:
                    parent[max(rx, ry)] = min(rx, ry)
    groups: dict[int, list[tuple]] = {}
    for c in comps:
        groups.setdefault(find(c[0]), []).append(c)
    pieces = []
    for members in groups.values():
        box = tuple(
            (min(m[2][a][0] for m in members), max(m[2][a][1] for m in members)) for a in range(3)
        )
        pieces.append(
            Piece(tuple(m[0] for m in members), members[0][1], box, min(m[3] for m in members))
        )
    pieces.sort(key=lambda p: (p.value, p.first))
    return pieces


@dataclass(frozen=True)
class Brightness:
    """What the passes need to read the image as the object steps read it: the raw zarr source
    (read here) with its layout and name for messages, and the segmentation's normalisation
    ``lo``/``hi`` (one value per channel). ``on`` gives the brightness evidence
    (``brightness_evidence``)."""

    source: object
    layout: object
    name: str
    lo: tuple[float, ...]
    hi: tuple[float, ...]

    def on(self, box, shape, spacing, config: InstanceConfig) -> np.ndarray:
        """The evidence on ``box`` of a volume of spatial ``shape``: equal to the whole
        volume's there (``evidence.smoothed_on``)."""
        from napari_pacseg.io.volumes import read_region

        def read(ext):
            return read_region(self.source, self.layout, ext, self.name)

        return smoothed_on(read, box, shape, spacing, config.smoothing, self.lo, self.hi)


def split_of(cc_path: str, piece: Piece, spacing, config: InstanceConfig,
             brightness: Brightness | None = None, cells: CellRule | None = None,
             seeds_path: str | None = None) -> np.ndarray:  # fmt: skip
    """A piece's objects on its box (``split_piece``, as ``instance_labels`` splits it);
    ``seeds_path``: the zarr array of the labels that seed the objects (``IdArrays.seeds``)."""
    import zarr

    cc = zarr.open_array(cc_path, mode="r")
    crop = np.asarray(cc[_slices(piece.box)])
    piece_mask = np.isin(crop, piece.members)
    if cells is not None:
        valley = None
        if brightness is not None and cells.bright is not None:
            bright = brightness.on(piece.box, cc.shape, spacing, config)
            valley = np.float32(1.0) - stain_contrast(bright, cells.bright)
        return split_piece(piece_mask, spacing, config, evidence=valley,
                           weight=cell_weight(config))  # fmt: skip
    bright = None
    if brightness is not None and config.brightness_weight != 0:
        bright = brightness.on(piece.box, cc.shape, spacing, config)
    core = None
    if seeds_path is not None:
        core = np.asarray(zarr.open_array(seeds_path, mode="r")[_slices(piece.box)]) == piece.value
    return split_piece(piece_mask, spacing, config, evidence=bright,
                       edges=on_border(piece.box, cc.shape), core=core)  # fmt: skip


@dataclass(frozen=True)
class Measure:
    """What pass 3 needs to measure the objects: the raw zarr source (read here) with its
    layout, its name for messages, the labels array and the model's class names."""

    source: object
    layout: object
    name: str
    labels_path: str
    class_names: tuple[str, ...]
    channels: int


def count_objects(cc_path: str, index: int, pieces: list[Piece], spacing, config,
                  measure: Measure | None = None,
                  brightness: Brightness | None = None, cells: CellRule | None = None,
                  seeds_path: str | None = None):  # fmt: skip
    """Pass 3 for group ``index`` of pieces: ``(index, objects per piece, tables)``; with
    ``measure`` each piece's ``object_table`` (ids 1..n of the piece, positions in the
    volume's coordinates), else None for each (in cells mode the cells are measured once the
    boundary is filled: ``chunked_cells``)."""
    counts, tables = [], []
    for p in pieces:
        ids = split_of(cc_path, p, spacing, config, brightness, cells, seeds_path)
        counts.append(int(ids.max()))
        measured = measure is not None and cells is None and ids.max()
        tables.append(_measure(ids, p, spacing, measure) if measured else None)
    return index, counts, tables


def _measure(ids: np.ndarray, piece: Piece, spacing, measure: Measure) -> dict:
    import zarr

    from napari_pacseg.instances.labels import object_table
    from napari_pacseg.io.volumes import read_region

    labels = np.asarray(zarr.open_array(measure.labels_path, mode="r")[_slices(piece.box)])
    image = read_region(measure.source, measure.layout, piece.box, measure.name)
    table = object_table(ids, labels, image, spacing, measure.class_names)
    for axis, name in enumerate("zyx"):
        start = piece.box[axis][0]
        table[f"bbox_{name}0"] = table[f"bbox_{name}0"] + start
        table[f"bbox_{name}1"] = table[f"bbox_{name}1"] + start
        table[f"centroid_{name}"] = table[f"centroid_{name}"] + start * spacing[axis]
    return table


def write_chunk(
    cc_path: str, out_path: str, box, pieces: list[Piece], bases: list[int], spacing, config,
    brightness: Brightness | None = None, seeds_path: str | None = None,
) -> int:  # fmt: skip
    """Pass 4 for one chunk: the ids of ``pieces`` (those meeting the chunk; ``bases[i]`` is
    the id before piece ``i``'s first object) written into the chunk of ``out_path``."""
    import zarr

    out = np.zeros(tuple(b - a for a, b in box), np.int32)
    for piece, base in zip(pieces, bases):
        ids = split_of(cc_path, piece, spacing, config, brightness, None, seeds_path)
        paste_ids(out, box, ids, piece.box, base)
    zarr.open_array(out_path, mode="r+")[_slices(box)] = out
    return len(pieces)


def paste_ids(out: np.ndarray, box, ids: np.ndarray, ids_box, base: int) -> None:
    """Write the objects of ``ids`` (a piece's 1..n, on the box ``ids_box``), numbered from
    ``base + 1``, into ``out`` (int32 of the box ``box``) where the two boxes overlap."""
    inter = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(box, ids_box))
    src = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(inter, ids_box))
    dst = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(inter, box))
    part = ids[src]
    view = out[dst]
    view[part > 0] = part[part > 0] + base


def meets(piece: Piece, box) -> bool:
    return all(a < d and c < b for (a, b), (c, d) in zip(box, piece.box))


def piece_bases(counts: list[int]) -> list[int]:
    """The id before each piece's first object: ids run 1..N over the pieces in order."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist() if counts else []


class IdArrays(NamedTuple):
    """The zarr arrays of the instance passes (paths): ``labels``, the finished class labels;
    ``ids``, the int32 object ids they write; ``scratch``, an int64 array of the same shape and
    chunks for the connected pieces. ``ids`` and ``scratch`` exist already. ``seeds``: the
    class labels that seed the objects (``segment``'s ``Segmentation.seeds``; blobs mode), or
    None."""

    labels: str
    ids: str
    scratch: str
    seeds: str | None = None


def instances_pass(run, arrays: IdArrays, boxes, spacing, config: InstanceConfig, token: str,
                   measure: Measure | None = None,
                   brightness: Brightness | None = None):  # fmt: skip
    """The four passes over a finished labels zarr array (chunks ``boxes``) into
    ``arrays.ids``. ``run(tasks)`` computes a list of dask delayed tasks on the caller's
    scheduler and returns their results. Returns ``(number of objects, table)``: with
    ``measure`` the measurement table of every object (``object_table``'s columns, ids as in
    ``arrays.ids``), else None. ``brightness``: the image's evidence for the splits (needed when
    ``config.brightness_weight`` is not 0, as in memory)."""
    import dask

    delayed = dask.delayed
    labels_path, out_path, cc_path, seeds_path = arrays
    comps_per_chunk = run([
        delayed(components_chunk, pure=False)(labels_path, cc_path, i, box,
                                               dask_key_name=f"pacseg-cc-{token}-{i}")
        for i, box in enumerate(boxes)
    ])  # fmt: skip
    comps = [c for chunk in comps_per_chunk for c in chunk]
    pieces = merge_pieces(cc_path, labels_path, boxes, comps)
    groups = [pieces[i : i + 256] for i in range(0, len(pieces), 256)]
    counts = run([
        delayed(count_objects, pure=False)(cc_path, i, g, spacing, config, measure, brightness,
                                           None, seeds_path,
                                           dask_key_name=f"pacseg-count-{token}-{i}")
        for i, g in enumerate(groups)
    ])  # fmt: skip
    done = sorted(counts, key=lambda r: r[0])  # results come in any order
    counts = [n for _, group, _ in done for n in group]
    tables = [t for _, _, group in done for t in group]
    bases = piece_bases(counts)
    of_chunk: list[list[int]] = [[] for _ in boxes]
    for k, piece in enumerate(pieces):
        for chunk in sorted({m >> SHIFT for m in piece.members}):
            of_chunk[chunk].append(k)
    run([
        delayed(write_chunk, pure=False)(
            cc_path, out_path, box, [pieces[k] for k in ks], [bases[k] for k in ks], spacing,
            config, brightness, seeds_path, dask_key_name=f"pacseg-ids-{token}-{i}",
        )
        for i, (box, ks) in enumerate(zip(boxes, of_chunk))
    ])  # fmt: skip
    table = None
    if measure is not None:
        parts = [t for t in tables if t is not None]
        for part, base in zip(tables, bases):
            if part is not None:
                part["id"] = part["id"] + base
        table = concat_tables(parts, measure)
    return int(sum(counts)), table


def concat_tables(parts: list[dict], measure: Measure) -> dict:
    """The pieces' tables as one (an empty table with the same columns when there are none)."""
    if not parts:
        from napari_pacseg.instances.labels import object_table

        empty = np.zeros((1, 1, 1), np.int32)
        image = np.zeros((measure.channels, 1, 1, 1), np.float32)
        return object_table(empty, empty, image, (1.0, 1.0, 1.0), measure.class_names)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
