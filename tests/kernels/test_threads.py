"""The thread policy: torch gets the cores other processes leave free, for the block only,
in the ops' CPU paths and around segment() and train()."""

import os
import subprocess
import sys
import time

import pytest
import torch

from pacseg_kernels import crf_torch, mlp_torch, pac3d, pac_crf3d, pac_torch, threads, voxel_mlp

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


def test_the_ops_cpu_paths_run_with_the_adapted_count(monkeypatch):
    before = torch.get_num_threads()
    load_of(monkeypatch, float(CORES))
    seen = []
    _recording(monkeypatch, mlp_torch, "mlp_forward", seen)
    _recording(monkeypatch, mlp_torch, "mlp_backward", seen)
    _recording(monkeypatch, pac_torch, "pac_forward", seen)
    _recording(monkeypatch, pac_torch, "pac_backward", seen)
    _recording(monkeypatch, crf_torch, "mean_field", seen)
    x = torch.randn(1, 3, 4, 5, 6, requires_grad=True)
    ws = [torch.randn(4, 3, requires_grad=True), torch.randn(2, 4)]
    voxel_mlp(x, ws, [torch.zeros(4), torch.zeros(2)]).sum().backward()
    g = torch.randn(1, 1, 4, 5, 6)
    pac3d(x, g, torch.randn(2, 3, 3, 3, 3), padding=1).sum().backward()
    pac_crf3d(torch.randn(1, 2, 4, 5, 6), g, iterations=2, kernel_size=3)
    assert {name for name, _ in seen} == {
        "mlp_forward", "mlp_backward", "pac_forward", "pac_backward", "mean_field"
    }  # fmt: skip
    assert {n for _, n in seen} == {1}
    assert torch.get_num_threads() == before


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
