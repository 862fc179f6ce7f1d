"""The thread policy: torch gets the cores other processes leave free, for the run only."""

import subprocess
import sys
import time

import pytest
import torch

from napari_pacseg import threads


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads, "_default", None)


def test_policy_follows_the_measured_load(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "other_load", lambda: float(before))  # every core taken
    with threads.adaptive_threads() as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads, "other_load", lambda: 0.0)
    with threads.adaptive_threads() as n:
        assert n == before
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads, "other_load", lambda: None)  # cannot tell: the default
    with threads.adaptive_threads() as n:
        assert n == before


def test_a_users_own_thread_count_is_never_raised(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "other_load", lambda: 0.0)
    torch.set_num_threads(1)
    try:
        with threads.adaptive_threads() as n:
            assert n == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_spinning_process_is_seen():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        load = threads.other_load(0.3)
    finally:
        spinner.kill()
        spinner.wait()
    assert load is not None and load >= 0.5
