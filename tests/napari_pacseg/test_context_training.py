"""train(context=...): the context encoder/decoder trained with the head from scribbles."""

import numpy as np
import pytest
import torch

import napari_pacseg.training.context as context_training
from napari_pacseg import (
    ClassInfo,
    ContextConfig,
    FeatureSpec,
    ModelConfig,
    PacSegModel,
    SegmentationCancelled,
    load_model,
    save_model,
    segment,
    train,
)

from .test_pipeline import _blobs

CONTEXT = ContextConfig((4, 4))
SETTINGS = dict(spacing=(2.0, 1.0, 1.0), features=FeatureSpec(sigmas=(1.0, 2.0)), steps=100)


@pytest.fixture(scope="module")
def trained():
    image, scribbles, truth = _blobs()
    return image, scribbles, truth, train(image, scribbles, context=CONTEXT, seed=3, **SETTINGS)


def _dice(pred, truth):
    return 2 * (pred & truth).sum() / (pred.sum() + truth.sum())


def test_the_context_net_is_trained_and_used(trained):
    image, _, truth, model = trained
    assert model.config.context == CONTEXT and model.context is not None
    n_feat = model.config.n_features - CONTEXT.channels[0]
    # the head starts with zero weights on the context channels: training gave them weight
    assert model.head.layers[0].weight[:, n_feat:].abs().max() > 1e-3
    with torch.no_grad():
        ctx = model.context(torch.rand(1, 1, 8, 12, 12))
    assert ctx.abs().max() > 0  # not a dead (all-ReLU-zero) net
    # trained channels-last, handed back in torch's default layout
    assert all(p.is_contiguous() for p in model.parameters())
    assert _dice(segment(image, model).labels == 2, truth) > 0.6  # quality: bench_quality


def test_deterministic_per_seed(trained):
    image, scribbles, _, model = trained
    again = train(image, scribbles, context=CONTEXT, seed=3, **SETTINGS)
    other = train(image, scribbles, context=CONTEXT, seed=4, **SETTINGS)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(model.context.enc[0].weight, other.context.enc[0].weight)


def test_tiled_equals_untiled(trained):
    image, _, _, model = trained
    whole = segment(image, model, return_probabilities=True)
    tiled = segment(image, model, tile_shape=(5, 13, 17), return_probabilities=True)
    assert np.array_equal(whole.labels, tiled.labels)
    np.testing.assert_allclose(whole.probabilities, tiled.probabilities, atol=1e-5)


def test_the_saved_model_carries_it(trained, tmp_path):
    image, _, _, model = trained
    loaded = load_model(save_model(model, tmp_path / "ctx.safetensors"))
    assert loaded.config.context == CONTEXT
    a = segment(image, model, return_probabilities=True).probabilities
    np.testing.assert_array_equal(
        a, segment(image, loaded, return_probabilities=True).probabilities
    )


def test_progress_and_cancel_in_the_context_phase():
    image, scribbles, _ = _blobs()
    calls = []
    train(image, scribbles, context=True, steps=10, progress=lambda d, t: calls.append((d, t)))
    total = 10 + context_training.CONTEXT_STEPS
    assert calls[-1] == (total, total) and all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    seen = []
    with pytest.raises(SegmentationCancelled, match="no model was produced"):
        train(image, scribbles, context=True, steps=10, progress=lambda d, t: seen.append(d),
              should_cancel=lambda: bool(seen) and seen[-1] > 20)  # fmt: skip
    assert 20 < seen[-1] < total


def test_bad_context_argument():
    image, scribbles, _ = _blobs()
    with pytest.raises(TypeError, match="context must be None, True or a ContextConfig"):
        train(image, scribbles, context="yes")


def test_sites_of_different_shapes_train_together():
    image, scribbles, _ = _blobs()
    small, small_marks = image[:, :30, :30], scribbles[:, :30, :30]
    model = train([image, small], [scribbles, small_marks], context=CONTEXT, steps=20)
    assert model.context is not None


# --- the context net against an independent float64 reference -------------------------------


def _conv(x, w, b):
    """``(C, D, H, W)`` -> ``(O, D, H, W)``: zero-padded 'same' convolution, float64."""
    k = w.shape[-1]
    r = k // 2
    xp = np.pad(x, ((0, 0), (r, r), (r, r), (r, r)))
    d, h, wd = x.shape[1:]
    out = np.broadcast_to(b[:, None, None, None], (w.shape[0], d, h, wd)).copy()
    for dz in range(k):
        for dy in range(k):
            for dx in range(k):
                patch = xp[:, dz : dz + d, dy : dy + h, dx : dx + wd]
                out += np.einsum("oc,czyx->ozyx", w[:, :, dz, dy, dx], patch)
    return out


def _pool_unpool_pairs(x, p):
    """Max pooling by ``p`` (floor mode): values ``(C, D//p, H//p, W//p)`` and, per window, the
    flat index of its (first) maximum in ``x``'s spatial volume."""
    c, d, h, w = x.shape
    dp, hp, wp = d // p, h // p, w // p
    win = x[:, : dp * p, : hp * p, : wp * p].reshape(c, dp, p, hp, p, wp, p)
    win = win.transpose(0, 1, 3, 5, 2, 4, 6).reshape(c, dp, hp, wp, p**3)
    arg = win.argmax(-1)
    oz, oy, ox = np.unravel_index(arg, (p, p, p))
    zz, yy, xx = np.meshgrid(np.arange(dp), np.arange(hp), np.arange(wp), indexing="ij")
    flat = ((zz * p + oz) * h + yy * p + oy) * w + xx * p + ox
    return np.take_along_axis(win, arg[..., None], -1)[..., 0], flat


def _unpool(values, flat, shape):
    out = np.zeros((values.shape[0], int(np.prod(shape))))
    for ch in range(values.shape[0]):
        out[ch, flat[ch].ravel()] = values[ch].ravel()
    return out.reshape(values.shape[0], *shape)


def context_reference(x, model: PacSegModel):
    """The context net of ``model`` on one normalised image ``(C, D, H, W)``, in float64 numpy."""
    net, p = model.context, model.config.context.pool
    params = [(c.weight.detach().double().numpy(), c.bias.detach().double().numpy())
              for c in (*net.enc, *net.dec)]  # fmt: skip
    enc, dec = params[: len(net.enc)], params[len(net.enc) :]
    skips, pooled = [], []
    for w, b in enc:
        h = np.maximum(_conv(x, w, b), 0)
        skips.append(h)
        x, flat = _pool_unpool_pairs(h, p)
        pooled.append(flat)
    for level in reversed(range(len(enc))):
        x = _unpool(x, pooled[level], skips[level].shape[1:]) + skips[level]
        x = np.maximum(_conv(x, *dec[level]), 0)
    return x


@pytest.mark.parametrize(
    "shape, config",
    [
        ((1, 9, 13, 11), ContextConfig((3,), kernel_size=3, pool=2)),
        ((2, 12, 10, 14), ContextConfig((4, 5), kernel_size=3, pool=2)),
        ((1, 10, 11, 9), ContextConfig((2, 3), kernel_size=5, pool=3)),
        ((1, 17, 16, 18), ContextConfig((3, 2, 2), kernel_size=1, pool=2)),
    ],
)
def test_context_features_match_a_float64_reference(shape, config):
    """What the model computes (``crop_features``, segment's tile function) for the context
    channels, on random weights and images, against the reference above."""
    gen = torch.Generator().manual_seed(sum(shape))
    classes = (ClassInfo("bg", (0, 0, 0, 0)), ClassInfo("fg", (1, 0, 0, 1)))
    model = PacSegModel(ModelConfig(in_channels=shape[0], classes=classes,
                                    features=FeatureSpec(sigmas=(1.0,)), context=config))  # fmt: skip
    context_training.init_context(model, gen)
    with torch.no_grad():
        for conv in (*model.context.enc, *model.context.dec):
            conv.bias.uniform_(-0.1, 0.3, generator=gen)
        x = torch.rand((1, *shape), generator=gen)
        got = model.crop_features(x)[0, -config.channels[0] :].double().numpy()
    want = context_reference(x[0].double().numpy(), model)
    assert want.max() > 0.1  # the case is not trivially zero
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_trained_model_matches_the_reference(trained):
    model = trained[3]
    x = torch.rand((1, 1, 12, 20, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.crop_features(x)[0, -CONTEXT.channels[0] :].double().numpy()
    np.testing.assert_allclose(got, context_reference(x[0].double().numpy(), model), atol=1e-5)


# --- gradients of the training step -------------------------------------------------------------


def test_gradcheck_through_the_training_loss():
    """The loss of a training step (context net with max pooling and ``max_unpool3d``, then the
    head's ``voxel_mlp``) in float64: autograd's gradients with respect to the crop image and
    the features against finite differences."""
    gen = torch.Generator().manual_seed(0)
    classes = tuple(ClassInfo(n, (i / 2, 0, 0, 1)) for i, n in enumerate(("bg", "fg", "third")))
    config = ModelConfig(in_channels=1, classes=classes, features=FeatureSpec(sigmas=(1.0,)),
                         context=ContextConfig((2, 3)))  # fmt: skip
    model = PacSegModel(config)
    context_training.init_context(model, gen)
    model = model.double()
    n_feat = config.n_features - 2
    image = torch.rand((1, 6, 8, 8), generator=gen, dtype=torch.float64)
    feats = torch.randn((5, n_feat), generator=gen, dtype=torch.float64)
    where = tuple(torch.randint(n, (5,), generator=gen) for n in (6, 8, 8))
    labels = torch.tensor([0, 1, 2, 1, 0])
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
    std = torch.ones(n_feat, dtype=torch.float64)

    def loss(image, feats):
        site = context_training.Site(image, feats, labels, where)
        batch = [site, site]  # two copies: a batch as in training, each with its own flips
        step_gen = torch.Generator().manual_seed(1)
        return context_training.batch_loss(model, batch, std, loss_fn, step_gen, "cpu")

    image.requires_grad_(True)
    feats.requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (image, feats))
    grads = torch.autograd.grad(loss(image, feats), list(model.context.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
