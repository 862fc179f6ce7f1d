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
6. and 7. the labels on the boundary's stain (``stain_pass``, on the side pass 0 read): per
   chunk the stain's histograms, the cells' enclosed classes and the interior classes' counts
   (``stain_stats_chunk``), then per chunk, in waves of chunks that do not touch, the labels
   rewritten (``thin_chunk``).

Memory per task: a chunk grown by the halo, plus the box of the largest piece that meets it.
"""

from __future__ import annotations

import numpy as np

from napari_pacseg.instances.cells import (
    apply_enclosed,
    enclosed_labels,
    enclosed_lut,
    enclosed_pairs,
    fill_boundary,
    fill_halo,
    interior_counts,
    main_interior,
    stain_contrast,
    stain_histogram,
    stain_is_bright,
    stain_sums,
    stain_threshold,
    thin_boundary,
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
    Returns ``(number of cells, table, is_bright)``: with ``measure`` the measurement table of
    every cell (ids as in ``arrays.ids``), else None; the side of the stain the cells read
    (``cells.stain_is_bright``; None without ``brightness``)."""
    import dask
    import zarr

    delayed = dask.delayed
    labels_path, out_path, cc_path = arrays.labels, arrays.ids, arrays.scratch
    shape = zarr.open_array(labels_path, mode="r").shape
    bright = None
    if brightness is not None:
        sums = run([
            delayed(stain_chunk, pure=False)(labels_path, box, spacing, config, brightness,
                                             boundary, dask_key_name=f"pacseg-stain-{token}-{i}")
            for i, box in enumerate(boxes)
        ])  # fmt: skip
        bright = stain_is_bright([sum(parts) for parts in zip(*sums)])
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
    return int(sum(counts)), table, bright


def stain_stats_chunk(labels_path: str, ids_path: str, box, spacing, brightness: Brightness,
                      boundary: int, is_bright: bool, size: int):  # fmt: skip
    """Pass 6 for one chunk: ``(histogram, pairs, counts)``, its ``cells.stain_histogram`` of
    the stain (``Brightness.stain``), its ``enclosed_pairs`` of the cells and its
    ``interior_counts`` (``size`` values)."""
    import zarr

    labels = zarr.open_array(labels_path, mode="r")
    lab = np.asarray(labels[_slices(box)])
    stain = brightness.stain(box, labels.shape, spacing)
    ids = np.asarray(zarr.open_array(ids_path, mode="r")[_slices(box)])
    return (stain_histogram(stain, lab, boundary, is_bright),
            enclosed_pairs(ids, lab, boundary), interior_counts(lab, boundary, size))  # fmt: skip


def thin_chunk(labels_path: str, ids_path: str, box, spacing, brightness: Brightness,
               boundary: int, rule: tuple) -> int:  # fmt: skip
    """Pass 7 for one chunk: its labels rewritten on the stain (``cells.thin_boundary``, read
    one voxel beyond it); ``rule``: ``(threshold, is_bright, lut, has, fallback)`` of the
    whole volume. No chunk it reads is rewritten meanwhile (``stain_pass`` runs the chunks in
    waves of non-touching ones). Returns the voxels that changed."""
    import zarr

    threshold, is_bright, lut, has, fallback = rule
    labels = zarr.open_array(labels_path, mode="r+")
    ext = grown(box, (1, 1, 1), labels.shape)
    lab = np.asarray(labels[_slices(ext)])
    ids = np.asarray(zarr.open_array(ids_path, mode="r")[_slices(ext)])
    enclosed = apply_enclosed(lab, ids, lut, has)
    stain = brightness.stain(ext, labels.shape, spacing)
    out = thin_boundary(lab, stain, boundary, threshold, is_bright, enclosed, fallback)
    core = tuple(slice(a - e, b - e) for (a, b), (e, _) in zip(box, ext))
    changed = int(np.count_nonzero(out[core] != lab[core]))
    if changed:
        labels[_slices(box)] = out[core]
    return changed


def waves(boxes) -> list[list[int]]:
    """The indices of ``boxes`` (a grid of chunks) in up to 8 groups by the parity of each
    axis's chunk index: no two chunks of a group touch, not even at a corner."""
    starts = [sorted({box[a][0] for box in boxes}) for a in range(3)]
    groups: dict[tuple, list[int]] = {}
    for i, box in enumerate(boxes):
        key = tuple(starts[a].index(box[a][0]) % 2 for a in range(3))
        groups.setdefault(key, []).append(i)
    return [groups[k] for k in sorted(groups)]


def stain_pass(run, arrays: IdArrays, boxes, spacing, token: str, boundary: int,
               brightness: Brightness, is_bright: bool | None, classes: int, n_cells: int,
               before_write=None) -> int:  # fmt: skip
    """Passes 6 and 7: the labels zarr array (``arrays.labels``, chunks ``boxes``) rewritten
    with the boundary class on its stain, as ``segment`` draws it in memory
    (``cells.boundary_on_stain``; the cells in ``arrays.ids``, ids 1..``n_cells``, are final;
    ``is_bright``: the side of the stain they read, ``cells_pass``). ``classes``: the model's
    number of classes; ``before_write()``, when given, is called once the rule is known, before
    the first chunk is rewritten. The rewrite runs in waves of chunks that do not touch
    (``waves``): a chunk reads its neighbours' voxels, which no task of its wave writes.
    Returns the voxels that changed."""
    import dask
    import zarr

    delayed = dask.delayed
    labels_path, ids_path = arrays.labels, arrays.ids
    is_bright = True if is_bright is None else is_bright
    stats = run([
        delayed(stain_stats_chunk, pure=False)(labels_path, ids_path, box, spacing, brightness,
                                               boundary, is_bright, classes + 1,
                                               dask_key_name=f"pacseg-stain-stats-{token}-{i}")
        for i, box in enumerate(boxes)
    ])  # fmt: skip
    threshold = stain_threshold(np.sum([s[0] for s in stats], axis=0))
    if threshold is None:
        return 0
    cells, values, counts = (np.concatenate([s[1][k] for s in stats]) for k in range(3))
    dtype = zarr.open_array(labels_path, mode="r").dtype
    lut, has = enclosed_lut(cells, values, counts, n_cells + 1, dtype)
    fallback = main_interior(np.sum([s[2] for s in stats], axis=0))
    # one key for every task: the cells' table travels to a worker once
    rule = delayed((threshold, is_bright, lut, has, fallback), pure=True, traverse=False,
                   name=f"pacseg-thin-rule-{token}")  # fmt: skip
    if before_write is not None:
        before_write()
    changed = 0
    for wave in waves(boxes):
        changed += sum(run([
            delayed(thin_chunk, pure=False)(labels_path, ids_path, boxes[i], spacing, brightness,
                                            boundary, rule, dask_key_name=f"pacseg-thin-{token}-{i}")
            for i in wave
        ]))  # fmt: skip
    return int(changed)
