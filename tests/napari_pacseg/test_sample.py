"""The bundled sample: present, the promised size and content, and its demo model loads."""

import numpy as np

from napari_pacseg.sample import DATA, load_demo_model, load_sample


def test_sample_volume_truth_and_scribbles():
    sample = load_sample()
    assert sample.image.shape == (64, 256, 256) and sample.image.dtype == np.uint16
    assert sample.truth.shape == sample.image.shape and sample.truth.dtype == bool
    assert sample.scribbles.shape == sample.image.shape
    assert set(np.unique(sample.scribbles)) == {0, 1, 2}
    assert np.count_nonzero(sample.scribbles) / sample.scribbles.size <= 0.005
    assert sample.spacing == (1.0, 0.4, 0.4)
    # the scribbles agree with the truth (2 = nucleus, 1 = background)
    assert sample.truth[sample.scribbles == 2].all()
    assert not sample.truth[sample.scribbles == 1].any()
    assert 0.01 < sample.truth.mean() < 0.2


def test_demo_model_and_size_budget():
    model = load_demo_model()
    assert [c.name for c in model.config.classes] == ["background", "nucleus"]
    assert model.config.spacing == (1.0, 0.4, 0.4)
    assert sum(f.stat().st_size for f in DATA.iterdir()) < 20 * 2**20
