"""Warnings about where scribbles were painted (``scribble_checks``)."""

from __future__ import annotations

import numpy as np

from napari_pacseg.sample import load_sample
from napari_pacseg.training.scribble_checks import (
    coverage_warnings,
    intensity_warnings,
    sparsity_warnings,
)


def test_the_samples_scribbles_raise_no_warning():
    assert coverage_warnings([load_sample().scribbles], ["background", "nucleus"]) == []


def test_border_only_background_is_warned_about():
    marks = np.zeros((8, 100, 120), np.uint8)
    marks[4, 2, 10:90] = 1  # along the top edge
    marks[4, 10:90, 117] = 1  # and the right one
    marks[4, 50, 50:55] = 2
    warned = coverage_warnings([marks], ["background", "nucleus"])
    assert warned == [
        "the background scribbles are all on the image border: add some away from it (between "
        "objects), or the model learns the border's look as the class"
    ]
    # one stroke inside, in another image of the set, is enough
    other = np.zeros((4, 40, 40), np.uint8)
    other[1, 20, 15:25] = 1
    assert coverage_warnings([marks, other], ["background", "nucleus"]) == []
    # a class painted nowhere is not this check's business
    assert coverage_warnings([marks], ["background", "nucleus", "unused"]) == warned


def test_a_class_painted_in_one_shade_is_warned_about():
    sample = load_sample()
    image = sample.image[None]
    assert intensity_warnings([image], [sample.scribbles], ["background", "nucleus"]) == []
    # nucleus painted only where it has one shade (its median, +-2)
    marks = np.where(sample.scribbles == 2, 0, sample.scribbles).astype(np.uint8)
    middle = np.median(sample.image[sample.truth])
    marks[(np.abs(sample.image.astype(float) - middle) <= 2) & sample.truth] = 2
    warned = intensity_warnings([image], [marks], ["background", "nucleus"])
    assert len(warned) == 1 and warned[0].startswith("the nucleus scribbles cover")
    assert "where it looks different" in warned[0]
    # a flat image: every class's range is the whole (zero) range, nothing to say
    flat = np.zeros_like(image)
    assert intensity_warnings([flat], [sample.scribbles], ["background", "nucleus"]) == []
    # a black background painted where it is black: no other shade to miss
    dark = np.where(sample.truth, sample.image, 0)[None]
    assert intensity_warnings([dark], [sample.scribbles], ["background", "nucleus"]) == []


def test_a_class_marked_on_a_handful_of_voxels_is_warned_about():
    names = ["background", "membrane", "cell"]
    assert sparsity_warnings([load_sample().scribbles], ["background", "nucleus"]) == []
    marks = np.zeros((4, 32, 32), np.uint8)
    marks[1, 5:25, 5] = 1  # a stroke of 20 voxels
    marks[2, 10, 10:15] = 2  # a membrane touched on 5 voxels
    marks[3, 20:28, 20:28] = 3
    warned = sparsity_warnings([marks], names)
    assert len(warned) == 1 and "membrane scribbles mark only 5 voxels" in warned[0]
    other = np.zeros_like(marks)
    other[0, 3, 3:20] = 2  # more strokes of it in another image: 22 in all
    assert sparsity_warnings([marks, other], names) == []
    assert sparsity_warnings([np.zeros_like(marks)], names) == []  # unpainted: train's error
