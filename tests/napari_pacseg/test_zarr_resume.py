"""segment_zarr resumes a killed run block by block: the outputs being written live in partials
(``batch.partial``) that a failure keeps; a rerun with the same source, model and parameters
computes only the blocks left and gives the uninterrupted run's labels, matte and instances bit
for bit; anything else discards the partial; a folder at a partial's name that is not ours is
refused and left as it is."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")

from napari_pacseg.batch import segment_zarr, zarr_runs  # noqa: E402
from napari_pacseg.batch.partial import RECORD_DIR, partial_path  # noqa: E402
from napari_pacseg.cli import main  # noqa: E402
from napari_pacseg.engine.plan import extend_box, settle, split_box, whole  # noqa: E402
from napari_pacseg.sample import DEMO_MODEL_FILE, load_demo_model, load_sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNKS = (8, 32, 32)


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def image():
    return np.ascontiguousarray(load_sample().image[16:48, 96:160, 96:160])  # 32 x 64 x 64


def write_zarr(path, array, chunks=(6, 20, 20)):
    z = zarr.open_array(str(path), mode="w", shape=array.shape, chunks=chunks, dtype=array.dtype)
    z[:] = array
    return path


def budget(model, shape, chunks, per_block, refine=True):
    """A memory budget that allows blocks of ``per_block`` chunks per axis (and no larger)."""
    settings = settle(model, None, refine)
    size = [b * c for b, c in zip(per_block, chunks)]
    exts = [extend_box(box, settings.receptive_field, shape)[0]
            for box in split_box(whole(shape), size)]  # fmt: skip
    largest = [max(e[a][1] - e[a][0] for e in exts) for a in range(3)]
    return zarr_runs.task_memory(largest, settings, model, 2)


class Blocks:
    """``segment_chunk`` counted; ``stop_at``: the call (0-based) that raises ``error``.
    ``seeds_only``: the calls for blocks an earlier run finished, which make the objects'
    seeds alone (``ChunkJob.outputs`` both None)."""

    def __init__(self, monkeypatch, stop_at=None, error=KeyboardInterrupt):
        self.calls, self.seeds_only, self.stop_at, self.error = 0, 0, stop_at, error
        real = zarr_runs.segment_chunk

        def counted(job, source):
            if self.stop_at is not None and self.calls == self.stop_at:
                raise self.error("stopped")
            self.calls += 1
            self.seeds_only += job.outputs == (None, None)
            return real(job, source)

        monkeypatch.setattr(zarr_runs, "segment_chunk", counted)


def outputs(folder, names=("labels.zarr", "matte.zarr")):
    return [zarr.open_array(str(folder / n), mode="r")[:] for n in names]


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


CASES = {
    # shape, storage chunks, chunks per block the budget allows, refine
    "one chunk per block": ((32, 64, 64), (8, 32, 32), (1, 1, 1), False),
    "blocks of several chunks, odd shape, refined": (
        (40, 90, 100),
        (8, 24, 32),
        (2, 2, 2),
        {"iterations": 2, "fit_sigma": 1.0},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_interrupted_between_blocks_resumes_exactly(tmp_path, model, monkeypatch, case):
    shape, chunks, per_block, refine = CASES[case]
    data = np.ascontiguousarray(load_sample().image[16 : 16 + shape[0], 90:, 90:]
                                [:, : shape[1], : shape[2]])  # fmt: skip
    src = write_zarr(tmp_path / "in.zarr", data)
    memory = budget(model, shape, chunks, per_block, refine)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    with pytest.MonkeyPatch.context() as m:
        full = Blocks(m)
        ref = segment_zarr(src, model, ref_dir / "labels.zarr", ref_dir / "matte.zarr",
                           chunks=chunks, memory=memory, refine=refine,
                           instances_out=ref_dir / "ids.zarr")  # fmt: skip
    n = ref.n_blocks
    assert n == full.calls and n >= 4
    out = tmp_path / "out"
    out.mkdir()
    args = (src, model, out / "labels.zarr", out / "matte.zarr")
    kw = dict(chunks=chunks, memory=memory, refine=refine, instances_out=out / "ids.zarr")
    k = n // 2
    with pytest.MonkeyPatch.context() as m:
        first = Blocks(m, stop_at=k)
        with pytest.raises(KeyboardInterrupt):
            segment_zarr(*args, **kw)
    assert first.calls == k
    assert hidden(out) == [".labels.zarr.pacseg-partial.tmp", ".matte.zarr.pacseg-partial.tmp"]
    assert not (out / "labels.zarr").exists() and not (out / "ids.zarr").exists()
    seen = []
    with pytest.MonkeyPatch.context() as m:
        second = Blocks(m)
        res = segment_zarr(*args, **kw, progress=lambda d, t: seen.append((d, t)))
    assert second.calls == n - k and second.seeds_only == 0  # the seeds were kept too
    assert res.resumed_blocks == k and res.blocks == ref.blocks
    assert ("seeds" in res.timings) == bool(refine)  # objects seeded by a refinement
    # the finished blocks count as done from the first report
    assert seen[0][0] > 0 and seen[-1] == (data.size, data.size)
    for got, want in zip(outputs(out, ("labels.zarr", "matte.zarr", "ids.zarr")),
                         outputs(ref_dir, ("labels.zarr", "matte.zarr", "ids.zarr"))):  # fmt: skip
        assert got.dtype == want.dtype and np.array_equal(got, want)  # bit for bit
    assert res.n_objects == ref.n_objects
    assert hidden(out) == []  # the partials moved into place, their records gone
    assert not (out / "labels.zarr" / RECORD_DIR).exists()
    assert zarr.open_array(str(out / "labels.zarr")).chunks == chunks


def test_a_run_without_objects_resumed_with_them_seeds_its_finished_blocks(
    tmp_path, model, monkeypatch
):
    """Blocks a run without objects finished hold no seeds (``InstanceConfig.split_fit``): the
    resumed run with objects segments them again for their seeds alone, and its labels and
    objects are the uninterrupted run's."""
    shape, chunks, per_block, refine = CASES["blocks of several chunks, odd shape, refined"]
    data = np.ascontiguousarray(load_sample().image[16 : 16 + shape[0], 90:, 90:]
                                [:, : shape[1], : shape[2]])  # fmt: skip
    src = write_zarr(tmp_path / "in.zarr", data)
    kw = dict(chunks=chunks, memory=budget(model, shape, chunks, per_block, refine), refine=refine)
    ref = segment_zarr(src, model, tmp_path / "ref.zarr", instances_out=tmp_path / "ref_ids.zarr",
                       **kw)  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    with pytest.MonkeyPatch.context() as m:
        first = Blocks(m, stop_at=2)
        with pytest.raises(KeyboardInterrupt):
            segment_zarr(src, model, out / "labels.zarr", **kw)  # no objects: no seeds
    assert first.calls == 2
    with pytest.MonkeyPatch.context() as m:
        second = Blocks(m)
        res = segment_zarr(src, model, out / "labels.zarr", instances_out=out / "ids.zarr", **kw)
    assert res.resumed_blocks >= 1 and second.seeds_only == res.resumed_blocks
    assert res.n_objects == ref.n_objects
    for name, want in (("labels.zarr", "ref.zarr"), ("ids.zarr", "ref_ids.zarr")):
        got = zarr.open_array(str(out / name), mode="r")[:]
        assert np.array_equal(got, zarr.open_array(str(tmp_path / want), mode="r")[:])
    assert hidden(out) == [] and not (out / "labels.zarr" / RECORD_DIR).exists()


def test_interrupted_by_the_progress_callback_and_resumed_twice(tmp_path, model, image,
                                                               monkeypatch):  # fmt: skip
    """Ctrl-C as a caller sees it: the progress callback raises once some blocks are done; two
    interruptions in a row, then the rest."""
    src = write_zarr(tmp_path / "in.zarr", image)
    kw = dict(chunks=CHUNKS, memory=budget(model, image.shape, CHUNKS, (1, 1, 1), False),
              refine=False)  # fmt: skip
    ref = segment_zarr(src, model, tmp_path / "ref_l.zarr", tmp_path / "ref_m.zarr", **kw)
    n = ref.n_blocks
    args = (src, model, tmp_path / "labels.zarr", tmp_path / "matte.zarr")
    counts = []
    for stop in (n // 3, 2 * n // 3):

        def interrupt(done, total, stop=stop):
            if done >= stop * image.size / n:
                raise KeyboardInterrupt

        with pytest.MonkeyPatch.context() as m:
            blocks = Blocks(m)
            with pytest.raises(KeyboardInterrupt):
                segment_zarr(*args, **kw, progress=interrupt)
        counts.append(blocks.calls)
    with pytest.MonkeyPatch.context() as m:
        last = Blocks(m)
        res = segment_zarr(*args, **kw)
    # each interruption stops a block midway (its tiles report progress): that block is redone
    assert 0 < last.calls < n - 1 and res.resumed_blocks == n - last.calls
    assert sum(counts) == res.resumed_blocks + 2
    for got, want in zip(outputs(tmp_path), outputs(tmp_path, ("ref_l.zarr", "ref_m.zarr"))):
        assert np.array_equal(got, want)
    assert hidden(tmp_path) == []


def test_a_killed_process_is_resumed(tmp_path, model, image, monkeypatch):
    """SIGKILL after 3 blocks: the partial and its log stay; the rerun (its writer is gone)
    computes the other blocks only."""
    src = write_zarr(tmp_path / "in.zarr", image)
    kw = dict(chunks=CHUNKS, refine=False,
              memory=budget(model, image.shape, CHUNKS, (1, 1, 1), False))  # fmt: skip
    args = (tmp_path / "labels.zarr", tmp_path / "matte.zarr")
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from napari_pacseg.batch import segment_zarr, zarr_runs
        from napari_pacseg.sample import load_demo_model
        real, calls = zarr_runs.segment_chunk, []

        def killed(job, source):
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            calls.append(job.index)
            return real(job, source)

        zarr_runs.segment_chunk = killed
        segment_zarr({str(src)!r}, load_demo_model(), {str(args[0])!r}, {str(args[1])!r},
                     **{kw!r})
    """)  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(hidden(tmp_path)) == 2
    with pytest.MonkeyPatch.context() as m:
        blocks = Blocks(m)
        res = segment_zarr(src, model, *args, **kw)
    assert res.resumed_blocks == 3 and blocks.calls == res.n_blocks - 3
    segment_zarr(src, model, tmp_path / "ref_l.zarr", tmp_path / "ref_m.zarr", **kw)
    for got, want in zip(outputs(tmp_path), outputs(tmp_path, ("ref_l.zarr", "ref_m.zarr"))):
        assert np.array_equal(got, want)
    assert hidden(tmp_path) == []


def test_a_threads_run_resumes_what_it_finished(tmp_path, model, image, monkeypatch):
    """With dask's thread pool the blocks finished before the failure are logged as they
    finish (in the calling thread); the rerun computes the others."""
    import dask

    src = write_zarr(tmp_path / "in.zarr", image)
    kw = dict(chunks=CHUNKS, refine=False, scheduler="threads",
              memory=budget(model, image.shape, CHUNKS, (1, 1, 1), False))  # fmt: skip
    args = (src, model, tmp_path / "labels.zarr", tmp_path / "matte.zarr")
    with dask.config.set(num_workers=2):
        ref = segment_zarr(src, model, tmp_path / "ref_l.zarr", tmp_path / "ref_m.zarr", **kw)
        n = ref.n_blocks
        with pytest.MonkeyPatch.context() as m:
            Blocks(m, stop_at=n - 1, error=RuntimeError)
            with pytest.raises(RuntimeError, match="stopped"):
                segment_zarr(*args, **kw)
        with pytest.MonkeyPatch.context() as m:
            blocks = Blocks(m)
            res = segment_zarr(*args, **kw)
    # at most one other block was running when the last one failed
    assert res.resumed_blocks >= n - 3 and blocks.calls == n - res.resumed_blocks
    for got, want in zip(outputs(tmp_path), outputs(tmp_path, ("ref_l.zarr", "ref_m.zarr"))):
        assert np.array_equal(got, want)
    assert hidden(tmp_path) == []


def _interrupted(tmp_path, model, image, monkeypatch, **kw):
    """A run of ``image`` stopped after 3 blocks: (source, its outputs' args, the keywords)."""
    src = tmp_path / "in.zarr"
    if not src.exists():
        write_zarr(src, image)
    kw = {"chunks": CHUNKS, "refine": False,
          "memory": budget(model, image.shape, CHUNKS, (1, 1, 1), False), **kw}  # fmt: skip
    with pytest.MonkeyPatch.context() as m:
        Blocks(m, stop_at=3)
        with pytest.raises(KeyboardInterrupt):
            segment_zarr(src, model, tmp_path / "labels.zarr", tmp_path / "matte.zarr", **kw)
    assert len(hidden(tmp_path)) == 2
    return src, kw


def _changed_model(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    return other


@pytest.mark.parametrize("change", ["threshold", "refinement", "model", "source content",
                                    "chunks", "without matte"])  # fmt: skip
def test_a_changed_run_discards_the_partial(tmp_path, model, image, monkeypatch, change):
    src, kw = _interrupted(tmp_path, model, image, monkeypatch)
    matte = tmp_path / "matte.zarr"
    if change == "threshold":
        kw["threshold"] = 0.6
    elif change == "refinement":
        kw.update(refine={"iterations": 1}, memory="64G")
    elif change == "model":
        model = _changed_model(model)
    elif change == "source content":
        arr = zarr.open_array(str(src), mode="r+")
        arr[5, 20, 20] = arr[5, 20, 20] + 1
    elif change == "chunks":
        kw["chunks"] = (16, 32, 32)
    else:
        matte = None
    with pytest.MonkeyPatch.context() as m:
        blocks = Blocks(m)
        res = segment_zarr(src, model, tmp_path / "labels.zarr", matte, **kw)
    assert res.resumed_blocks == 0 and blocks.calls == res.n_blocks
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    segment_zarr(src, model, fresh / "labels.zarr", **kw)
    assert np.array_equal(*(zarr.open_array(str(d / "labels.zarr"))[:] for d in (tmp_path, fresh)))
    left = [] if matte is not None else [".matte.zarr.pacseg-partial.tmp"]  # not this run's
    assert hidden(tmp_path) == left


def test_a_resume_keeps_its_blocks_or_counts_whole_chunks(tmp_path, model, image, monkeypatch):
    """A rerun whose budget allows the partial's blocks keeps them; one whose budget does not
    skips the blocks whose chunks are all finished, in any layout."""
    src, kw = _interrupted(tmp_path, model, image, monkeypatch)
    ref = segment_zarr(src, model, tmp_path / "ref.zarr", **kw)
    with pytest.MonkeyPatch.context() as m:
        blocks = Blocks(m)
        res = segment_zarr(src, model, tmp_path / "labels.zarr", tmp_path / "matte.zarr",
                           **{**kw, "memory": "64G"})  # fmt: skip
    assert res.blocks == ref.blocks != (2, 2, 2) and res.resumed_blocks == 3
    assert blocks.calls == ref.n_blocks - 3
    # stopped in larger blocks, resumed in single chunks: the chunks of the finished ones skipped
    out = tmp_path / "second"
    out.mkdir()
    large = {**kw, "memory": budget(model, image.shape, CHUNKS, (1, 2, 2), False)}
    layout = segment_zarr(src, model, tmp_path / "layout.zarr", **large)
    k = layout.n_blocks - 1
    assert 1 <= k < layout.n_blocks < layout.n_chunks == 16
    size = [b * c for b, c in zip(layout.blocks, CHUNKS)]
    finished = split_box(whole(image.shape), size)[:k]
    skipped = sum(np.prod([-(-(b - a) // c) for (a, b), c in zip(box, CHUNKS)]) for box in finished)
    with pytest.MonkeyPatch.context() as m:
        Blocks(m, stop_at=k)
        with pytest.raises(KeyboardInterrupt):
            segment_zarr(src, model, out / "labels.zarr", **large)
    with pytest.MonkeyPatch.context() as m:
        blocks = Blocks(m)
        with pytest.warns(UserWarning, match="one chunk per work block"):
            res = segment_zarr(src, model, out / "labels.zarr", **{**kw, "memory": "1M"})
    assert res.blocks == (1, 1, 1) and res.n_blocks == 16
    assert res.resumed_blocks == skipped and blocks.calls == 16 - skipped
    assert np.array_equal(zarr.open_array(str(out / "labels.zarr"))[:],
                          zarr.open_array(str(tmp_path / "ref.zarr"))[:])  # fmt: skip


def test_a_foreign_folder_at_a_partials_name_is_refused(tmp_path, model, image, monkeypatch):
    src = write_zarr(tmp_path / "in.zarr", image)
    for kind in ("folder", "file", "link"):
        partial = partial_path(tmp_path / "labels.zarr")
        if kind == "folder":
            partial.mkdir()
            (partial / "notes.txt").write_text("precious")
        elif kind == "file":
            partial.write_text("precious")
        else:
            target = tmp_path / "elsewhere"
            target.mkdir()
            partial.symlink_to(target)
        with pytest.MonkeyPatch.context() as m:
            blocks = Blocks(m)
            with pytest.raises(FileExistsError, match="not a partial output of pacseg"):
                segment_zarr(src, model, tmp_path / "labels.zarr", chunks=CHUNKS, refine=False,
                             overwrite=True)  # fmt: skip
        assert blocks.calls == 0 and not (tmp_path / "labels.zarr").exists()
        if kind == "folder":
            assert (partial / "notes.txt").read_text() == "precious"
            (partial / "notes.txt").unlink()
            partial.rmdir()
        elif kind == "file":
            assert partial.read_text() == "precious"
            partial.unlink()
        else:
            assert partial.is_symlink() and target.is_dir()
            partial.unlink()
    assert hidden(tmp_path) == []


def test_a_partial_being_written_is_refused(tmp_path, model, image, monkeypatch):
    """A partial whose writer still runs on this host (here: the parent process) is another
    run's: refused, and kept."""
    _, kw = _interrupted(tmp_path, model, image, monkeypatch)
    record_path = partial_path(tmp_path / "labels.zarr") / RECORD_DIR / "record.json"
    record = json.loads(record_path.read_text())
    record["writer"]["pid"] = os.getppid()
    record_path.write_text(json.dumps(record))
    with pytest.raises(FileExistsError, match=f"process {os.getppid()}"):
        segment_zarr(tmp_path / "in.zarr", model, tmp_path / "labels.zarr",
                     tmp_path / "matte.zarr", **kw)  # fmt: skip
    assert len(hidden(tmp_path)) == 2


def test_existing_outputs_are_still_refused_before_any_work(tmp_path, model, image,
                                                            monkeypatch):  # fmt: skip
    src, kw = _interrupted(tmp_path, model, image, monkeypatch)
    (tmp_path / "labels.zarr").mkdir()
    with pytest.MonkeyPatch.context() as m:
        blocks = Blocks(m)
        with pytest.raises(FileExistsError, match="overwrite"):
            segment_zarr(src, model, tmp_path / "labels.zarr", tmp_path / "matte.zarr", **kw)
    assert blocks.calls == 0 and len(hidden(tmp_path)) == 2
    # with overwrite the partial is resumed and replaces the folder
    with pytest.MonkeyPatch.context() as m:
        blocks = Blocks(m)
        res = segment_zarr(src, model, tmp_path / "labels.zarr", tmp_path / "matte.zarr",
                           overwrite=True, **kw)  # fmt: skip
    assert res.resumed_blocks == 3 and blocks.calls == res.n_blocks - 3
    assert hidden(tmp_path) == []


def test_nothing_to_resume_leaves_nothing(tmp_path, model, image, monkeypatch):
    """A failure before any block is finished, or of a source not on disk (an in-memory or dask
    array: no content to match), removes the partials; a success leaves none."""
    src = write_zarr(tmp_path / "in.zarr", image)
    kw = dict(chunks=CHUNKS, refine=False,
              memory=budget(model, image.shape, CHUNKS, (1, 1, 1), False))  # fmt: skip
    args = (tmp_path / "labels.zarr", tmp_path / "matte.zarr")
    with pytest.MonkeyPatch.context() as m:
        Blocks(m, stop_at=0, error=RuntimeError)
        with pytest.raises(RuntimeError):
            segment_zarr(src, model, *args, **kw)
    assert hidden(tmp_path) == []
    for source in (image, zarr.open_array(str(src))[:] + 0):
        with pytest.MonkeyPatch.context() as m:
            Blocks(m, stop_at=3)
            with pytest.raises(KeyboardInterrupt):
                segment_zarr(source, model, *args, **kw)
        assert hidden(tmp_path) == []
    segment_zarr(src, model, *args, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "labels.zarr", "matte.zarr"]


def test_the_command_resumes_a_zarr_input(tmp_path, model, image, monkeypatch, capsys):
    """``pacseg segment`` on a zarr input, interrupted (exit 130), then run again: only the
    blocks left are computed and the outputs equal an uninterrupted run's."""
    src = write_zarr(tmp_path / "vol.zarr", image)
    memory = str(budget(model, image.shape, CHUNKS, (1, 1, 1), False))
    command = ["segment", str(DEMO_MODEL_FILE), str(src), "-o", str(tmp_path / "out"), "-q",
               "--no-refine", "--chunks", *map(str, CHUNKS), "--memory", memory]  # fmt: skip
    with pytest.MonkeyPatch.context() as m:
        Blocks(m, stop_at=5)
        assert main(command) == 130
    out = tmp_path / "out"
    assert hidden(out) == [".vol_labels.zarr.pacseg-partial.tmp",
                           ".vol_matte.zarr.pacseg-partial.tmp"]  # fmt: skip
    with pytest.MonkeyPatch.context() as m:
        blocks = Blocks(m)
        assert main(command) == 0
    ref = segment_zarr(src, model, tmp_path / "ref_l.zarr", tmp_path / "ref_m.zarr",
                       chunks=CHUNKS, refine=False, memory=int(memory))  # fmt: skip
    assert blocks.calls == ref.n_blocks - 5
    got = outputs(out, ("vol_labels.zarr", "vol_matte.zarr"))
    for g, w in zip(got, outputs(tmp_path, ("ref_l.zarr", "ref_m.zarr"))):
        assert np.array_equal(g, w)
    assert sorted(p.name for p in out.iterdir()) == ["vol_labels.zarr", "vol_matte.zarr",
                                                     "vol_pacseg.json"]  # fmt: skip
    capsys.readouterr()


def test_a_cells_run_stopped_while_drawing_the_labels_starts_anew(tmp_path, model, image):
    """Cells mode rewrites the labels after the blocks (drawn on the cells): a run
    stopped there cannot be resumed (its partials no longer hold what the blocks wrote), so
    they are removed, and a record a kill left marked (``REWRITTEN``) makes the next run start
    anew; both give the uninterrupted run's labels and cells."""
    from napari_pacseg.batch.partial import REWRITTEN
    from napari_pacseg.instances import chunked_cells

    src = write_zarr(tmp_path / "in.zarr", image)
    kw = {"chunks": CHUNKS, "refine": False, "instances": {"boundary": "background", "radius": 3.0},
          "memory": budget(model, image.shape, CHUNKS, (1, 1, 1), False)}  # fmt: skip
    segment_zarr(src, model, tmp_path / "ref.zarr", instances_out=tmp_path / "ref_ids.zarr", **kw)
    out = tmp_path / "out"
    out.mkdir()
    real, calls = chunked_cells.draw_chunk, []

    def stopping(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("stopped")
        calls.append(1)
        return real(*args, **kwargs)

    run = lambda: segment_zarr(src, model, out / "labels.zarr",  # noqa: E731
                               instances_out=out / "ids.zarr", **kw)  # fmt: skip
    with pytest.MonkeyPatch.context() as m:
        m.setattr(chunked_cells, "draw_chunk", stopping)
        with pytest.raises(KeyboardInterrupt):
            run()
    assert calls and hidden(out) == []  # one chunk rewritten, then the partials removed
    with pytest.MonkeyPatch.context() as m:
        Blocks(m, stop_at=3)
        with pytest.raises(KeyboardInterrupt):
            run()
    assert len(hidden(out)) == 1  # the labels' partial, kept to resume
    (partial_path(out / "labels.zarr") / RECORD_DIR / REWRITTEN).touch()  # as a kill leaves it
    res = run()
    assert res.resumed_blocks == 0
    for name, want in (("labels.zarr", "ref.zarr"), ("ids.zarr", "ref_ids.zarr")):
        got = zarr.open_array(str(out / name), mode="r")[:]
        assert np.array_equal(got, zarr.open_array(str(tmp_path / want), mode="r")[:])
