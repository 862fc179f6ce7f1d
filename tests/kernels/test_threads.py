"""The thread policy: inside ``adaptive_threads()`` torch gets the cores other processes leave
free, for the block only; the ops never change torch's thread count themselves; segment() and
train() apply the policy at their own call sites."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pacseg_kernels
from pacseg_kernels import (
    MaxUnpool3d,
    PacConv3d,
    PacCRF3d,
    VoxelMLP,
    crf_torch,
    max_pool3d_with_indices,
    max_unpool3d,
    mlp_torch,
    pac3d,
    pac_crf3d,
    pac_torch,
    threads,
    unpool_torch,
    voxel_mlp,
)

CORES = os.cpu_count() or 1


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads, "_reading", None)
    monkeypatch.setattr(threads, "_enabled", True)
    monkeypatch.setattr(threads, "usable_cores", lambda: CORES)


def load_of(monkeypatch, load):
    monkeypatch.setattr(threads, "current_load", lambda: load)


def test_policy_follows_the_measured_load(monkeypatch):
    before = torch.get_num_threads()
    load_of(monkeypatch, float(CORES))  # every core taken
    with threads.adaptive_threads() as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    load_of(monkeypatch, 0.0)
    with threads.adaptive_threads() as n:
        assert n == min(before, CORES)
    load_of(monkeypatch, None)  # cannot tell: the caller's count
    with threads.adaptive_threads() as n:
        assert n == before


def test_free_cores_not_the_thread_count_decide(monkeypatch):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    assert threads.threads_for_load(4, 1.0) == 4  # 15 cores free: the caller's 4 all fit
    assert threads.threads_for_load(4, 13.4) == 3
    assert threads.threads_for_load(8, 19.0) == 1  # never below one
    assert threads.threads_for_load(3, None) == 3
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)  # an affinity mask of 2 cores
    assert threads.threads_for_load(4, 0.0) == 2


def test_a_users_own_thread_count_is_never_raised(monkeypatch):
    before = torch.get_num_threads()
    load_of(monkeypatch, 0.0)
    torch.set_num_threads(1)
    try:
        with threads.adaptive_threads() as n:
            assert n == 1
    finally:
        torch.set_num_threads(before)


def test_nested_blocks_keep_the_outer_choice_and_restore_once(monkeypatch):
    before = torch.get_num_threads()
    load_of(monkeypatch, float(CORES))
    with threads.adaptive_threads():
        load_of(monkeypatch, 0.0)  # the inner block must not raise the count again
        with threads.adaptive_threads() as inner:
            assert inner == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_the_policy_can_be_turned_off(monkeypatch):
    before = torch.get_num_threads()
    load_of(monkeypatch, float(CORES))
    threads.set_adaptive(False)
    with threads.adaptive_threads() as n:
        assert n == before


def test_a_load_is_reused_then_averaged_since_the_last_reading(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    # (busy, total, own) jiffies: between the readings the machine was 50 % busy, none of it ours
    readings = iter([(0, 0, 0), (50, 100, 0), (150, 300, 0)])
    monkeypatch.setattr(threads, "_jiffies", lambda: next(readings))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    first = threads.current_load()  # no earlier reading: a sleep between two readings
    assert first == pytest.approx(0.5 * CORES)
    clock[0] += 1.0
    assert threads.current_load() == first  # reused, no reading taken
    clock[0] += 2.0  # 3 s after the reading: averaged since it, without a sleep
    monkeypatch.setattr(threads.time, "sleep", lambda s: pytest.fail("slept"))
    assert threads.current_load() == pytest.approx(0.5 * CORES)


def _recording(monkeypatch, module, name, seen):
    real = getattr(module, name)

    def record(*args, **kwargs):
        seen.append((name, torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, record)


@pytest.fixture
def two_threads():
    """torch on at least two threads (so a lowered count shows), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def _run_every_op(progress=None):
    """Every op on CPU tensors, forward and backward, as functions and as modules."""
    x = torch.randn(1, 3, 4, 5, 6, requires_grad=True)
    ws = [torch.randn(4, 3, requires_grad=True), torch.randn(2, 4)]
    voxel_mlp(x, ws, [torch.zeros(4), torch.zeros(2)]).sum().backward()
    g = torch.randn(1, 1, 4, 5, 6)
    pac3d(x, g, torch.randn(2, 3, 3, 3, 3), padding=1).sum().backward()
    pac_crf3d(torch.randn(1, 2, 4, 5, 6), g, iterations=2, kernel_size=3, progress=progress)
    values, indices = max_pool3d_with_indices(torch.randn(1, 2, 4, 6, 6), 2)
    values.requires_grad_(True)
    max_unpool3d(values, indices, 2, output_size=(4, 6, 6)).sum().backward()
    VoxelMLP(3, [4], 2)(x).sum().backward()
    PacConv3d(3, 2, 3, padding=1)(x, g).sum().backward()
    PacCRF3d(iterations=2, kernel_size=3)(torch.randn(1, 2, 4, 5, 6), g)
    MaxUnpool3d(2)(values, indices).sum().backward()


def test_the_ops_never_change_the_thread_count(monkeypatch, two_threads):
    """Under a full load the ops' CPU paths run at the caller's count: they neither measure the
    load nor call torch.set_num_threads."""
    measured, set_to, seen = [], [], []
    monkeypatch.setattr(threads, "current_load", lambda: measured.append(1) or float(CORES))
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_to.append(n) or real_set(n))
    for module, name in (
        (mlp_torch, "mlp_forward"), (mlp_torch, "mlp_backward"), (pac_torch, "pac_forward"),
        (pac_torch, "pac_backward"), (crf_torch, "mean_field"), (unpool_torch, "unpool"),
        (unpool_torch, "unpool_backward"),
    ):  # fmt: skip
        _recording(monkeypatch, module, name, seen)
    steps = []
    _run_every_op(progress=lambda done, total: steps.append(torch.get_num_threads()))
    assert {name for name, _ in seen} == {
        "mlp_forward", "mlp_backward", "pac_forward", "pac_backward", "mean_field", "unpool",
        "unpool_backward",
    }  # fmt: skip
    assert {n for _, n in seen} == {two_threads}
    assert steps and set(steps) == {two_threads}  # pac_crf3d's progress, inside the op
    assert measured == [] and set_to == []
    assert torch.get_num_threads() == two_threads


def test_adaptive_threads_used_explicitly_lowers_and_restores(monkeypatch, two_threads):
    assert pacseg_kernels.adaptive_threads is threads.adaptive_threads
    assert pacseg_kernels.readapt is threads.readapt
    load_of(monkeypatch, float(CORES))
    seen, steps = [], []
    _recording(monkeypatch, pac_torch, "pac_forward", seen)
    with pacseg_kernels.adaptive_threads() as n:
        assert n == 1
        _run_every_op(progress=lambda done, total: steps.append(torch.get_num_threads()))
    assert {n for _, n in seen} == {1} and set(steps) == {1}
    assert torch.get_num_threads() == two_threads


def test_segment_adapts_at_its_own_call_site(monkeypatch, two_threads):
    """segment() wraps itself in adaptive_threads(): the ops run with the lowered count there."""
    pytest.importorskip("napari_pacseg")
    from napari_pacseg import segment
    from napari_pacseg.sample import load_demo_model

    load_of(monkeypatch, float(CORES))
    seen, progress = [], []
    _recording(monkeypatch, crf_torch, "mean_field", seen)
    image = torch.rand(12, 24, 24, generator=torch.Generator().manual_seed(0)).numpy() * 100
    segment(image, load_demo_model(), progress=lambda d, t: progress.append(torch.get_num_threads()))  # fmt: skip
    assert seen and {n for _, n in seen} == {1}
    assert progress and set(progress) == {1}
    assert torch.get_num_threads() == two_threads


def _blobs(shape=(12, 32, 32)):
    """A noisy image of two bright balls with a few scribbles (background 1, ball 2)."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    balls = ((z - 6) ** 2 / 4 + (y - 11) ** 2 + (x - 11) ** 2 < 36) | (
        (z - 6) ** 2 / 4 + (y - 22) ** 2 + (x - 22) ** 2 < 25
    )
    image = (balls * 100.0 + 20 + rng.normal(0, 10, shape)).astype(np.float32)
    scribbles = np.zeros(shape, np.uint8)
    scribbles[6, 1:3, 2:30] = 1
    scribbles[6, 29:31, 2:16] = 1
    scribbles[6, 11, 7:15] = 2
    scribbles[6, 22, 19:25] = 2
    return image, scribbles


def test_train_adapts_its_head_fit_and_gives_the_same_model_at_every_load(monkeypatch, two_threads):
    """train() lowers the count for the features and the head fit, keeps the caller's for the
    context fit, and a seed gives bitwise the same model on a busy and a quiet machine."""
    pytest.importorskip("napari_pacseg")
    import napari_pacseg.training.fit as fit
    from napari_pacseg import ContextConfig, FeatureSpec, train

    image, scribbles = _blobs()
    settings = dict(
        spacing=(2.0, 1.0, 1.0), features=FeatureSpec(sigmas=(1.0, 2.0)), steps=30,
        context=ContextConfig((4, 4)), seed=3,
    )  # fmt: skip
    monkeypatch.setattr(fit, "CONTEXT_STEPS", 10)
    seen = []
    _recording(monkeypatch, fit, "_labelled_features", seen)
    _recording(monkeypatch, fit, "_fit", seen)
    _recording(monkeypatch, fit, "_fit_context", seen)
    models = {}
    for load in (0.0, float(CORES)):
        load_of(monkeypatch, load)
        seen.clear()
        models[load] = train(image, scribbles, **settings)
        assert torch.get_num_threads() == two_threads
        counts = dict(seen)
        assert counts["_fit_context"] == two_threads  # the caller's count at every load
        lowered = 1 if load else two_threads
        assert counts["_labelled_features"] == counts["_fit"] == lowered
    quiet, busy = (models[load].state_dict() for load in (0.0, float(CORES)))
    for name, tensor in quiet.items():
        assert torch.equal(tensor, busy[name]), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_spinning_process_is_seen(monkeypatch):
    monkeypatch.setattr(threads, "SAMPLE_S", 0.3)  # no earlier reading: a 0.3 s sample
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        load = threads.current_load()
    finally:
        spinner.kill()
        spinner.wait()
    assert load is not None and load >= 0.5


def test_readapt_follows_a_load_that_changes_during_a_block(monkeypatch):
    before = torch.get_num_threads()
    assert threads.readapt() == before  # outside a block: nothing changes
    load_of(monkeypatch, 0.0)
    with threads.adaptive_threads() as n:
        load_of(monkeypatch, float(CORES))  # another process took the cores
        assert threads.readapt() == 1 and torch.get_num_threads() == 1
        load_of(monkeypatch, 0.0)  # and left: back to the block's starting count, no higher
        assert threads.readapt() == n
    assert torch.get_num_threads() == before


def test_no_numba_loops_without_a_thread_safe_numba_layer():
    """With numba's workqueue layer (no OpenMP or TBB), loops launched from two threads at once
    abort the process and napari launches its own: the CRF and the features' filters then take
    their torch paths, with the same results."""
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from pacseg_kernels import crf_numba, pac_crf3d, threads\n"
        "from napari_pacseg.model import features\n"
        "assert not threads.numba_threadsafe() and not crf_numba.available()\n"
        "assert features._filter_loops() is None\n"
        "u, g = torch.randn(1, 2, 5, 6, 7), torch.randn(1, 1, 5, 6, 7)\n"
        "torch.testing.assert_close(pac_crf3d(u, g, 3, 3), pac_crf3d(u, g, 3, 3, backend='torch'))\n"
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
