"""pac_crf3d and PacCRF3d (torch path) against the float64 reference."""

import math

import pytest
import torch

import pacseg_kernels.crf_numba as crf_numba
import pacseg_kernels.crf_torch as crf_torch
import pacseg_kernels.pac_torch as pac_torch
from pacseg_kernels import PacCRF3d, pac_crf3d
from tests.kernels.reference import crf_reference

# N, K (classes), F (guide channels), spatial, kernel, dilation, spatial_sigma, compat, iterations
CASES = [
    (1, 2, 1, (6, 7, 8), 3, 1, None, 1.0, 1),
    (2, 3, 3, (5, 9, 6), (1, 5, 3), (1, 1, 2), 1.5, 2.5, 3),
    (1, 4, 2, (7, 5, 5), 5, 1, (0.8, 1.2, 2.0), 0.7, 5),
    (1, 1, 1, (4, 4, 4), 3, 2, None, 1.0, 2),  # one class: messages are all 1
    (2, 2, 8, (1, 11, 10), (1, 3, 3), 1, None, 3.0, 4),  # depth 1
    (1, 3, 2, (11, 6, 7), (5, 3, 3), (2, 1, 1), 1.0, 1.5, 4),  # z reach 4: wavefront lag 4
    (1, 2, 1, (2, 6, 7), (7, 3, 3), 1, None, 2.0, 6),  # z reach 3 > depth: taps wholly outside
]


def _tensors(case, gen, dtype=torch.float32):
    n, k, f, spatial = case[:4]
    unary = 2 * torch.randn(n, k, *spatial, generator=gen, dtype=dtype)
    guide = 0.8 * torch.randn(n, f, *spatial, generator=gen, dtype=dtype)
    return unary, guide


# How the torch path runs the steps: the wavefront that keeps the weights, over z or over y
# (slabs of one plane, of two planes with a shorter last slab where the axis is odd, of the
# whole volume; each step's message summed tap by tap or in one call over the taps, as the
# slab's size picks on the CPU), or the steps recomputing them (with pac_torch's default tiles,
# or tiny ones). The fused engines run each wavefront step and the weights as numba loops
# (``crf_numba``, what ``backend="auto"`` takes on the CPU when numba imports).
Z, Y = dict(WAVEFRONT_AXES=(0,)), dict(WAVEFRONT_AXES=(1,))
PER_TAP, ONE_CALL = dict(PER_TAP_VOXELS=0), dict(PER_TAP_VOXELS=1 << 40)
ENGINES = {
    "wavefront-z-1": dict(RING_BUDGET=math.inf, SLAB_VOXELS=1, **Z, **PER_TAP),
    "wavefront-z-2": dict(RING_BUDGET=math.inf, SLAB_VOXELS="two planes", **Z, **ONE_CALL),
    "wavefront-z-all": dict(RING_BUDGET=math.inf, SLAB_VOXELS=1 << 30, **Z, **PER_TAP),
    "wavefront-y-1": dict(RING_BUDGET=math.inf, SLAB_VOXELS=1, **Y, **ONE_CALL),
    "wavefront-y-2": dict(RING_BUDGET=math.inf, SLAB_VOXELS="two planes", **Y, **PER_TAP),
    "wavefront-y-all": dict(RING_BUDGET=math.inf, SLAB_VOXELS=1 << 30, **Y, **ONE_CALL),
    "fused-z-1": dict(RING_BUDGET=math.inf, SLAB_VOXELS=1, **Z, FUSED=True),
    "fused-z-2": dict(RING_BUDGET=math.inf, SLAB_VOXELS="two planes", **Z, FUSED=True),
    "fused-y-1": dict(RING_BUDGET=math.inf, SLAB_VOXELS=1, **Y, FUSED=True),
    "fused-y-all": dict(RING_BUDGET=math.inf, SLAB_VOXELS=1 << 30, **Y, FUSED=True),
    "recompute": dict(RING_BUDGET=0.0, RING_FLOOR_BYTES=0),
    "recompute-tile29": dict(RING_BUDGET=0.0, RING_FLOOR_BYTES=0, TILE_VOXELS=29),
}


def use_engine(name: str, spatial, monkeypatch) -> str:
    """Set up engine ``name``; returns the ``backend`` argument that takes it."""
    engine = dict(ENGINES[name])
    fused = engine.pop("FUSED", False)
    if fused and not crf_numba.available():
        pytest.skip("numba is not installed")
    for attr, value in engine.items():
        if value == "two planes":
            d, h, w = spatial
            value = 2 * (d if engine["WAVEFRONT_AXES"] == (1,) else h) * w
        module = pac_torch if attr == "TILE_VOXELS" else crf_torch
        monkeypatch.setattr(module, attr, value)
    return "auto" if fused else "torch"


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_matches_reference(case, engine, monkeypatch):
    backend = use_engine(engine, case[3], monkeypatch)
    *_, kernel, dilation, sigma, compat, iterations = case
    gen = torch.Generator().manual_seed(hash(case[3]) % 2**31)
    unary, guide = _tensors(case, gen)
    out = pac_crf3d(unary, guide, iterations, kernel, dilation, compat, sigma, backend=backend)
    ref = crf_reference(unary, guide, iterations, kernel, dilation, compat, sigma)
    assert out.shape == unary.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def _keeps(spatial, gen) -> list:
    """Sub-boxes of ``spatial``: one plane at each end and the middle of each axis, and two
    random boxes."""
    keeps = []
    for axis, n in enumerate(spatial):
        for a in sorted({0, n // 2, n - 1}):
            keeps.append(tuple((a, a + 1) if i == axis else (0, m) for i, m in enumerate(spatial)))
    for _ in range(2):
        box = []
        for n in spatial:
            a = int(torch.randint(0, n, (1,), generator=gen))
            box.append((a, int(torch.randint(a + 1, n + 1, (1,), generator=gen))))
        keeps.append(tuple(box))
    return keeps


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_keep_equals_the_whole_result_cropped(case, engine, monkeypatch):
    backend = use_engine(engine, case[3], monkeypatch)
    *_, kernel, dilation, sigma, compat, iterations = case
    gen = torch.Generator().manual_seed(hash(case[3]) % 2**31 + 1)
    unary, guide = _tensors(case, gen)
    args = (unary, guide, iterations, kernel, dilation, compat, sigma)
    whole = pac_crf3d(*args, backend=backend)
    for keep in _keeps(case[3], gen):
        crop = (slice(None), slice(None), *(slice(a, b) for a, b in keep))
        part = pac_crf3d(*args, backend=backend, keep=keep)
        assert part.shape == whole[crop].shape, keep
        torch.testing.assert_close(part, whole[crop], rtol=0, atol=0, msg=f"keep {keep}")


def test_keep_skips_the_planes_the_box_does_not_depend_on(monkeypatch):
    """A one-plane box of a 21-plane volume, 5 steps of z reach 1, slabs of one plane: the
    wavefront computes the weights of 9 planes and runs 9 + 7 + 5 + 3 + 1 plane steps (step s
    on the planes within 5 - s of the box), instead of 21 and 5 x 21."""
    windows = []
    real = crf_torch._windows

    def counting(t, z, n_planes, *args):
        windows.append(n_planes)  # one per weights slab and per step on a slab (K=2, F=1)
        return real(t, z, n_planes, *args)

    use_engine("wavefront-z-1", (21, 6, 6), monkeypatch)
    monkeypatch.setattr(crf_torch, "_windows", counting)
    unary, guide = torch.randn(1, 2, 21, 6, 6), torch.randn(1, 1, 21, 6, 6)
    pac_crf3d(unary, guide, 5, (3, 3, 3), backend="torch")
    assert len(windows) == 21 + 5 * 21
    windows.clear()
    pac_crf3d(unary, guide, 5, (3, 3, 3), backend="torch", keep=((10, 11), (0, 6), (0, 6)))
    assert len(windows) == 9 + (9 + 7 + 5 + 3 + 1)


def test_a_thin_region_takes_the_z_wavefront_within_the_floor():
    """A live preview's region (3 planes and 5 planes of reach each side) on 256 x 256 planes:
    its z weights (~100 MiB) exceed twice the inputs, but a region this thin takes the z
    wavefront (whole planes per slab; the one ``keep`` lets skip planes) within
    ``RING_FLOOR_BYTES``; 32 such planes keep the y one (the rule of twice the inputs)."""
    args = (5, (3, 5, 5), (1, 1, 1))
    thin = torch.empty(1, 2, 13, 256, 256), torch.empty(1, 1, 13, 256, 256)
    axis, planes = crf_torch.wavefront_plan(*thin, *args)
    assert axis == 0
    ring = crf_torch._ring_slabs(*args, planes, thin[0].shape[2]) * (75 + 2) * planes * 256 * 256
    assert 2 * 4 * (2 * thin[0].numel() + thin[1].numel()) < ring * 4 <= crf_torch.RING_FLOOR_BYTES
    deep = torch.empty(1, 2, 32, 256, 256), torch.empty(1, 1, 32, 256, 256)
    assert crf_torch.wavefront_plan(*deep, *args)[0] == 1


def test_a_region_thinner_than_the_steps_in_flight_keeps_all_its_weights(monkeypatch):
    """3 planes under 50 steps: the wavefront would keep 49 + 1 slabs in flight, but the region
    has 3, so it keeps those 3 (within the thin-region floor) instead of recomputing the
    weights every step; the result is the reference's."""
    args = (50, (3, 5, 5), (1, 1, 1))
    unary, guide = torch.empty(1, 2, 3, 256, 256), torch.empty(1, 1, 3, 256, 256)
    assert crf_torch._ring_slabs(*args, 1, 3) == 3 < crf_torch._ring_slabs(*args, 1, 100)
    assert crf_torch.wavefront_plan(unary, guide, *args) == (0, 1)
    gen = torch.Generator().manual_seed(5)
    unary, guide = 2 * torch.randn(1, 2, 3, 9, 8, generator=gen), torch.randn(1, 1, 3, 9, 8)
    # weights room for exactly the region's 3 one-plane slabs (27 taps + 2 sums per voxel)
    monkeypatch.setattr(crf_torch, "RING_BUDGET", 0.0)
    monkeypatch.setattr(crf_torch, "RING_FLOOR_BYTES", 3 * (27 + 2) * 9 * 8 * 4)
    monkeypatch.setattr(crf_torch, "SLAB_VOXELS", 1)
    monkeypatch.setattr(crf_torch, "WAVEFRONT_AXES", (0,))
    assert crf_torch.wavefront_plan(unary, guide, 12, (3, 3, 3), (1, 1, 1)) == (0, 1)
    out = pac_crf3d(unary, guide, 12, (3, 3, 3), compat=2.0, backend="torch")
    ref = crf_reference(unary, guide, 12, (3, 3, 3), 1, 2.0, None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "keep", [((0, 5), (0, 4)), ((0, 4), (0, 4), (0, 5)), ((2, 2), (0, 4), (0, 4)), "all", 3]
)
def test_bad_keep(keep):
    with pytest.raises(ValueError, match=r"keep must be None or 3 \(start, stop\) int ranges"):
        pac_crf3d(torch.randn(1, 2, 4, 4, 4), torch.randn(1, 1, 4, 4, 4), keep=keep)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(9)
    unary = torch.randn(6, 5, 1, 4, 3, generator=gen).permute(2, 4, 0, 3, 1)  # (1, 3, 6, 4, 5)
    guide = torch.randn(1, 2, 12, 4, 5, generator=gen)[:, :, ::2]
    for backend in ("torch", "auto"):
        out = pac_crf3d(unary, guide, iterations=2, kernel_size=3, backend=backend)
        torch.testing.assert_close(
            out.double(), crf_reference(unary, guide, 2, 3), rtol=1e-4, atol=1e-4
        )


def test_zero_iterations_returns_unary():
    unary, guide = torch.randn(1, 3, 4, 5, 6), torch.randn(1, 1, 4, 5, 6)
    assert torch.equal(pac_crf3d(unary, guide, iterations=0), unary)


@pytest.mark.parametrize("engine", ["wavefront-z-1", "wavefront-y-1", "fused-y-1", "recompute"])
def test_isolated_voxels_keep_their_unary(engine, monkeypatch):
    """A voxel whose guide is far from all neighbours gets no message: its probabilities stay."""
    backend = use_engine(engine, (5, 5, 5), monkeypatch)
    unary = torch.randn(1, 2, 5, 5, 5)
    guide = torch.zeros(1, 1, 5, 5, 5)
    guide[0, 0, 2, 2, 2] = 1e4  # every weight to or from it underflows to 0
    out = pac_crf3d(unary, guide, iterations=3, kernel_size=3, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :, 2, 2, 2].softmax(0), unary[0, :, 2, 2, 2].softmax(0))
    huge = pac_crf3d(
        unary, torch.arange(125.0).view(1, 1, 5, 5, 5) * 1e3, iterations=2, kernel_size=3,
        backend=backend,
    )  # fmt: skip
    torch.testing.assert_close(huge.softmax(1), unary.softmax(1))


def test_refinement_removes_isolated_label_noise():
    """Flat guide inside two regions: mean field flips noisy voxels to their region's class."""
    gen = torch.Generator().manual_seed(0)
    truth = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    truth[:, :, :, 6:] = 1
    unary = torch.nn.functional.one_hot(truth, 2).permute(0, 4, 1, 2, 3).float() * 2 - 1
    flips = torch.rand(1, 1, 12, 12, 12, generator=gen) < 0.1
    noisy = torch.where(flips, -unary, unary)
    guide = truth[:, None].float() * 10  # the boundary is in the guide
    out = pac_crf3d(noisy, guide, iterations=5, kernel_size=3, compat=4.0)
    assert (noisy.argmax(1) != truth).sum() > 50
    assert (out.argmax(1) != truth).sum() == 0


def test_gradcheck():
    gen = torch.Generator().manual_seed(6)
    unary = torch.randn(1, 3, 3, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    guide = (0.7 * torch.randn(1, 2, 3, 4, 3, generator=gen, dtype=torch.float64)).requires_grad_()

    def f(unary, guide):
        return pac_crf3d(unary, guide, iterations=2, kernel_size=3, compat=1.3, spatial_sigma=1.0)

    assert torch.autograd.gradcheck(f, (unary, guide))


@pytest.mark.parametrize("engine", ["wavefront-z-1", "wavefront-y-2", "fused-z-2", "recompute"])
def test_module_and_float64(engine, monkeypatch):
    backend = use_engine(engine, CASES[1][3], monkeypatch)
    unary, guide = _tensors(CASES[1], torch.Generator().manual_seed(1), torch.float64)
    layer = PacCRF3d(
        iterations=3, kernel_size=(1, 5, 3), dilation=(1, 1, 2), compat=2.5, spatial_sigma=1.5,
        backend=backend,
    )  # fmt: skip
    out = layer(unary, guide)
    assert out.dtype == torch.float64
    ref = crf_reference(unary, guide, 3, (1, 5, 3), (1, 1, 2), 2.5, 1.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert "iterations=3" in repr(layer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kernel_size=4), r"odd.*\(4, 4, 4\)"),
        (dict(iterations=-1), r"iterations must be an int >= 0, got -1"),
        (dict(dilation=0), r"dilation must be >= 1"),
        (dict(spatial_sigma=0.0), r"spatial_sigma must be positive"),
        (dict(spatial_sigma=(1.0, 2.0)), r"spatial_sigma must be None, a number or 3 numbers"),
        (dict(compat=float("nan")), r"compat must be a finite number"),
        (dict(backend="cuda"), r"backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pac_crf3d(torch.randn(1, 2, 4, 4, 4), torch.randn(1, 1, 4, 4, 4), **kwargs)


def test_bad_tensors():
    with pytest.raises(ValueError, match=r"guide has shape \(1, 1, 4, 4, 3\) but unary"):
        pac_crf3d(torch.randn(1, 2, 4, 4, 4), torch.randn(1, 1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"unary has dtype torch.int64"):
        pac_crf3d(torch.zeros(1, 2, 4, 4, 4, dtype=torch.long), torch.randn(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"unary must be \(N, C, D, H, W\)"):
        pac_crf3d(torch.randn(2, 4, 4, 4), torch.randn(1, 4, 4, 4))


class Stop(Exception):
    pass


@pytest.mark.parametrize(
    "engine", ["wavefront-z-1", "wavefront-y-2", "fused-z-1", "recompute", "autograd"]
)
def test_progress_reports_every_unit_and_can_abandon_the_call(engine, monkeypatch):
    case = CASES[5]
    backend = "auto" if engine == "autograd" else use_engine(engine, case[3], monkeypatch)
    *_, kernel, dilation, sigma, compat, iterations = case
    unary, guide = _tensors(case, torch.Generator().manual_seed(3))
    unary.requires_grad_(engine == "autograd")
    calls = []
    out = pac_crf3d(unary, guide, iterations, kernel, dilation, compat, sigma, backend=backend,
                    progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    plain = pac_crf3d(
        unary.detach(), guide, iterations, kernel, dilation, compat, sigma, backend=backend
    )
    torch.testing.assert_close(out.detach(), plain, rtol=1e-5, atol=1e-5)  # the same result
    totals = {t for _, t in calls}
    assert len(totals) == 1 and [d for d, _ in calls] == list(range(1, totals.pop() + 1))
    assert len(calls) >= iterations

    def stop(done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        pac_crf3d(
            unary, guide, iterations, kernel, dilation, compat, sigma, backend=backend,
            progress=stop,
        )  # fmt: skip


def test_progress_must_be_callable():
    with pytest.raises(ValueError, match="progress must be None or a callable"):
        pac_crf3d(torch.randn(1, 2, 4, 4, 4), torch.randn(1, 1, 4, 4, 4), progress=3)
