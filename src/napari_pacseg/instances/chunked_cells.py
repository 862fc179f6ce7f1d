"""Cells of a zarr label volume, chunk by chunk: the same ids as ``instance_labels`` in cells mode
on the whole volume in memory (``InstanceConfig.boundary``; ``instances.cells``).

The tissue is one connected piece, so it is never handled whole: only the cells' interiors are
pieces (as in ``instances.chunked``), and the boundary's fill reaches a bounded number of voxels
(``cells.fill_halo``). The passes (run by ``segment_zarr``'s scheduler):

0. with the image: per chunk, the sums that tell the side of the boundary's stain
   (``cells.stain_sums``, integers: their total is the whole volume's);
1. and 2. the interiors' pieces, across chunk borders (``chunked.components_chunk``,
   ``chunked.merge_pieces``);
3. per group of pieces: how many cells each piece splits into (``chunked.count_objects``);
4. per chunk: the chunk grown by the fill's halo, the cells of every piece that meets it (each
   split on its own box), the fill there, the chunk's part written (``fill_chunk``);
5. with measurements: per group of pieces, each cell measured on its piece's box grown by the
   halo (it holds the whole cell), read back from the written ids (``measure_cells``);
6. and 7. the labels drawn on the cells (``labels_pass``, with pass 0's sums): per chunk the
   cells' enclosed classes and the interior classes' counts (``labels_stats_chunk``), then
   per chunk the labels rewritten (``draw_chunk``).

Memory per task: a chunk grown by the halo, plus the box of the largest piece that meets it.
"""

from __future__ import annotations

import numpy as np

from napari_pacseg.instances.cells import (
    apply_enclosed,
    cell_band,
    draw_cells,
    enclosed_labels,
    enclosed_lut,
    enclosed_pairs,
    fill_boundary,
    fill_halo,
    interior_counts,
    main_interior,
    stain_contrast,
    stain_is_bright,
    stain_sums,
    unstained,
)
from napari_pacseg.instances.chunked import (
    Brightness,
    CellRule,
    IdArrays,
    Measure,
    Piece,
    components_chunk,
    concat_tables,
    count_objects,
    merge_pieces,
    paste_ids,
    piece_bases,
    split_of,
)
from napari_pacseg.model.network import InstanceConfig

GROUP = 256  # pieces per task of passes 3 and 5


def _slices(box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def grown(box, halo, shape) -> tuple[tuple[int, int], ...]:
    """``box`` grown by ``halo`` voxels per axis, clipped to a volume of ``shape``."""
    return tuple((max(0, a - h), min(n, b + h)) for (a, b), h, n in zip(box, halo, shape))


def stain_chunk(labels_path: str, box, spacing, config: InstanceConfig, brightness: Brightness,
                boundary: int) -> tuple[int, ...]:  # fmt: skip
    """Pass 0 for one chunk: its ``cells.stain_sums`` (read one voxel beyond it)."""
    import zarr

    labels = zarr.open_array(labels_path, mode="r")
    ext = grown(box, (1, 1, 1), labels.shape)
    lab = np.asarray(labels[_slices(ext)])
    bright = brightness.on(ext, labels.shape, spacing, config)
    core = tuple((a - e, b - e) for (a, b), (e, _) in zip(box, ext))
    return stain_sums(bright, lab, boundary, core=core)


def _cells_on(cc_path, ext, pieces, bases, spacing, config, brightness, cells) -> np.ndarray:
    """The interiors' cells (final ids) on the box ``ext``: int32 of its shape."""
    out = np.zeros(tuple(b - a for a, b in ext), np.int32)
    for piece, base in zip(pieces, bases):
        ids = split_of(cc_path, piece, spacing, config, brightness, cells)
        paste_ids(out, ext, ids, piece.box, base)
    return out


def fill_chunk(cc_path: str, labels_path: str, out_path: str, box, pieces: list[Piece],
               bases: list[int], spacing, config: InstanceConfig,
               brightness: Brightness | None, cells: CellRule) -> int:  # fmt: skip
    """Pass 4 for one chunk: the cells of ``pieces`` (those meeting the chunk grown by the
    fill's halo; ``bases[i]`` the id before piece ``i``'s first cell) on the grown box, the
    boundary filled there, the chunk's part written into ``out_path``."""
    import zarr

    labels = zarr.open_array(labels_path, mode="r")
    shape = labels.shape
    ext = grown(box, fill_halo(spacing, config), shape)
    ids = _cells_on(cc_path, ext, pieces, bases, spacing, config, brightness, cells)
    lab = np.asarray(labels[_slices(ext)])
    contrast = None
    if brightness is not None and cells.bright is not None:
        contrast = stain_contrast(brightness.on(ext, shape, spacing, config), cells.bright)
    filled = fill_boundary(ids, lab, cells.boundary, spacing, config, contrast)
    core = tuple(slice(a - e, b - e) for (a, b), (e, _) in zip(box, ext))
    zarr.open_array(out_path, mode="r+")[_slices(box)] = filled[core]
    return len(pieces)


def measure_cells(out_path: str, index: int, pieces: list[Piece], bases: list[int],
                  counts: list[int], spacing, config: InstanceConfig, measure: Measure,
                  cells: CellRule):  # fmt: skip
    """Pass 5 for group ``index`` of pieces: ``(index, tables)``, each piece's cells measured
    (``object_table``, the enclosed class as a cell's class; ids and positions in the volume's
    terms), None for a piece without cells."""
    import zarr

    from napari_pacseg.instances.labels import object_table
    from napari_pacseg.io.volumes import read_region

    written = zarr.open_array(out_path, mode="r")
    labels = zarr.open_array(measure.labels_path, mode="r")
    halo = fill_halo(spacing, config)
    tables = []
    for piece, base, n in zip(pieces, bases, counts):
        if not n:
            tables.append(None)
            continue
        ext = grown(piece.box, halo, written.shape)
        ids = np.asarray(written[_slices(ext)])
        mine = (ids > base) & (ids <= base + n)
        local = np.where(mine, ids - base, 0).astype(np.int32)
        enclosed = enclosed_labels(local, np.asarray(labels[_slices(ext)]), cells.boundary)
        image = read_region(measure.source, measure.layout, ext, measure.name)
        table = object_table(local, enclosed, image, spacing, measure.class_names)
        table["id"] = table["id"] + base
        for axis, name in enumerate("zyx"):
            start = ext[axis][0]
            table[f"bbox_{name}0"] = table[f"bbox_{name}0"] + start
            table[f"bbox_{name}1"] = table[f"bbox_{name}1"] + start
            table[f"centroid_{name}"] = table[f"centroid_{name}"] + start * spacing[axis]
        tables.append(table)
    return index, tables


def cells_pass(run, arrays: IdArrays, boxes, spacing, config: InstanceConfig, token: str,
               boundary: int, measure: Measure | None = None,
               brightness: Brightness | None = None):  # fmt: skip
    """The passes over a finished labels zarr array (chunks ``boxes``) into ``arrays.ids``, in
    cells mode: ``boundary`` is the boundary class's label value (``cells.boundary_label``).
    ``run(tasks)`` computes a list of dask delayed tasks and returns their results.
    ``brightness``: the image (the boundary's contrast, as ``segment`` reads it in memory).
    Returns ``(number of cells, table, sums)``: with ``measure`` the measurement table of
    every cell (ids as in ``arrays.ids``), else None; the whole volume's ``cells.stain_sums``,
    whose side of the stain the cells read (``cells.stain_is_bright``; None without
    ``brightness``)."""
    import dask
    import zarr

    delayed = dask.delayed
    labels_path, out_path, cc_path = arrays.labels, arrays.ids, arrays.scratch
    shape = zarr.open_array(labels_path, mode="r").shape
    bright = total = None
    if brightness is not None:
        sums = run([
            delayed(stain_chunk, pure=False)(labels_path, box, spacing, config, brightness,
                                             boundary, dask_key_name=f"pacseg-stain-{token}-{i}")
            for i, box in enumerate(boxes)
        ])  # fmt: skip
        total = tuple(sum(parts) for parts in zip(*sums))
        bright = stain_is_bright(total)
    cells = CellRule(boundary, bright)
    comps_per_chunk = run([
        delayed(components_chunk, pure=False)(labels_path, cc_path, i, box, cells,
                                               dask_key_name=f"pacseg-cc-{token}-{i}")
        for i, box in enumerate(boxes)
    ])  # fmt: skip
    comps = [c for chunk in comps_per_chunk for c in chunk]
    pieces = merge_pieces(cc_path, labels_path, boxes, comps, cells)
    starts = range(0, len(pieces), GROUP)
    done = run([
        delayed(count_objects, pure=False)(cc_path, i, pieces[s : s + GROUP], spacing, config,
                                           None, brightness, cells,
                                           dask_key_name=f"pacseg-count-{token}-{i}")
        for i, s in enumerate(starts)
    ])  # fmt: skip
    counts = [n for _, group, _ in sorted(done, key=lambda r: r[0]) for n in group]
    bases = piece_bases(counts)
    halo = fill_halo(spacing, config)
    lo = np.asarray([[a for a, _ in p.box] for p in pieces], np.int64).reshape(-1, 3)
    hi = np.asarray([[b for _, b in p.box] for p in pieces], np.int64).reshape(-1, 3)
    tasks = []
    for i, box in enumerate(boxes):
        ext = np.asarray(grown(box, halo, shape), np.int64)
        near = np.flatnonzero(np.all((lo < ext[:, 1]) & (ext[:, 0] < hi), axis=1)).tolist()
        tasks.append(delayed(fill_chunk, pure=False)(
            cc_path, labels_path, out_path, box, [pieces[k] for k in near],
            [bases[k] for k in near], spacing, config, brightness, cells,
            dask_key_name=f"pacseg-fill-{token}-{i}",
        ))  # fmt: skip
    run(tasks)
    table = None
    if measure is not None:
        measured = run([
            delayed(measure_cells, pure=False)(
                out_path, i, pieces[s : s + GROUP], bases[s : s + GROUP],
                counts[s : s + GROUP], spacing, config, measure, cells,
                dask_key_name=f"pacseg-measure-{token}-{i}",
            )
            for i, s in enumerate(starts)
        ])  # fmt: skip
        parts = [t for _, group in sorted(measured, key=lambda r: r[0]) for t in group]
        table = concat_tables([t for t in parts if t is not None], measure)
    return int(sum(counts)), table, total


def labels_stats_chunk(labels_path: str, ids_path: str, box, boundary: int, size: int):
    """Pass 6 for one chunk: ``(pairs, counts)``, its ``enclosed_pairs`` of the cells and its
    ``interior_counts`` (``size`` values)."""
    import zarr

    lab = np.asarray(zarr.open_array(labels_path, mode="r")[_slices(box)])
    ids = np.asarray(zarr.open_array(ids_path, mode="r")[_slices(box)])
    return enclosed_pairs(ids, lab, boundary), interior_counts(lab, boundary, size)


def draw_chunk(labels_path: str, ids_path: str, box, spacing, config: InstanceConfig,
               brightness: Brightness | None, boundary: int, rule: tuple) -> int:  # fmt: skip
    """Pass 7 for one chunk: its labels drawn on the cells (``cells.draw_cells``, the cells'
    band read one voxel beyond it); ``rule``: ``(lut, has, fallback, sums)`` of the whole
    volume (``sums``: ``cells.stain_sums``, None without ``brightness``). A chunk's result
    depends on its own labels and image and on the ids around it, which no task writes:
    chunks run in any order. Returns the voxels that changed."""
    import zarr

    lut, has, fallback, sums = rule
    labels = zarr.open_array(labels_path, mode="r+")
    ext = grown(box, (1, 1, 1), labels.shape)
    ids = np.asarray(zarr.open_array(ids_path, mode="r")[_slices(ext)])
    core = tuple(slice(a - e, b - e) for (a, b), (e, _) in zip(box, ext))
    band = cell_band(ids)[core]
    ids = ids[core]
    lab = np.asarray(labels[_slices(box)])
    free = None
    if brightness is not None and sums is not None and fallback is not None:
        free = unstained(brightness.on(box, labels.shape, spacing, config), sums)
    out = draw_cells(lab, ids, band, apply_enclosed(lab, ids, lut, has), boundary, fallback,
                     free)  # fmt: skip
    changed = int(np.count_nonzero(out != lab))
    if changed:
        labels[_slices(box)] = out
    return changed


def labels_pass(run, arrays: IdArrays, boxes, spacing, config: InstanceConfig, token: str,
                boundary: int, classes: int, n_cells: int, brightness: Brightness | None = None,
                sums=None, before_write=None) -> int:  # fmt: skip
    """Passes 6 and 7: the labels zarr array (``arrays.labels``, chunks ``boxes``) drawn on
    the cells, as ``segment`` draws them in memory (``cells.boundary_on_cells``; the cells in
    ``arrays.ids``, ids 1..``n_cells``, are final). ``classes``: the model's number of
    classes; ``brightness`` and ``sums`` (the image and its ``cells.stain_sums``:
    ``cells_pass``), or None: tissue in no cell keeps its class. ``before_write()``, when
    given, is called once the rule is known, before the first chunk is rewritten. Returns the
    voxels that changed."""
    import dask
    import zarr

    delayed = dask.delayed
    labels_path, ids_path = arrays.labels, arrays.ids
    stats = run([
        delayed(labels_stats_chunk, pure=False)(labels_path, ids_path, box, boundary,
                                                classes + 1,
                                                dask_key_name=f"pacseg-cell-stats-{token}-{i}")
        for i, box in enumerate(boxes)
    ])  # fmt: skip
    cells, values, counts = (np.concatenate([s[0][k] for s in stats]) for k in range(3))
    dtype = zarr.open_array(labels_path, mode="r").dtype
    lut, has = enclosed_lut(cells, values, counts, n_cells + 1, dtype)
    fallback = main_interior(np.sum([s[1] for s in stats], axis=0))
    # one key for every task: the cells' table travels to a worker once
    rule = delayed((lut, has, fallback, sums), pure=True, traverse=False,
                   name=f"pacseg-draw-rule-{token}")  # fmt: skip
    if before_write is not None:
        before_write()
    return int(sum(run([
        delayed(draw_chunk, pure=False)(labels_path, ids_path, box, spacing, config, brightness,
                                        boundary, rule, dask_key_name=f"pacseg-draw-{token}-{i}")
        for i, box in enumerate(boxes)
    ])))  # fmt: skip
