"""Fixtures shared by the napari_pacseg tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: on a shared 2-core machine torch's spinning OpenMP
    threads slow down 10-100x when another process holds the cores (and LocalCluster workers
    are single-threaded anyway). Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def errors(monkeypatch):
    """Error notifications the widget raised (captured instead of shown; the widget tests)."""
    seen: list[str] = []
    monkeypatch.setattr("napari_pacseg._napari.widget.show_error", seen.append)
    return seen


@pytest.fixture(autouse=True)
def quiet_preview_budget(monkeypatch):
    """Live previews get the quiet machine's budget (``engine.plan.preview_budget`` shrinks it
    while other processes hold every core): which previews are exact must not depend on what
    else runs on the test machine. ``test_session.test_preview_budget_follows_the_load`` and
    ``test_preview_budget_follows_the_measured_rate`` test the rules themselves."""
    monkeypatch.setattr("napari_pacseg.engine.plan.current_load", lambda: 0.0)
    # nor on how fast the test machine refines: no refinement is counted in a rate
    monkeypatch.setattr("napari_pacseg.engine.preview.RATE_MIN_WORK", float("inf"))


@pytest.fixture(autouse=True)
def user_data_home(tmp_path_factory, monkeypatch):
    """napari-pacseg's user data folder (``platformdirs``: the widget's autosaved sessions) in
    a temporary folder: no test writes into the user's home."""
    home = tmp_path_factory.mktemp("data-home")
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home
