"""Synthetic brains on the fly (`training/synthbrain.py`): reproducible, their tissue labels match their images,
MRI-like contrasts order the tissues as the sequences do, and the images are normalised as the engine's."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from training_helpers import single_thread  # noqa: F401

from BrainDINOLib.training.config import SyntheticConfig
from BrainDINOLib.training.synthbrain import CONTRASTS, REGIONS, SyntheticBrains

COARSE = SyntheticConfig(spacing_mm=2.0)  # label maps on a 2-mm grid: built in about a second
CLEAN = replace(COARSE, texture=0.0, bias=0.0, noise=(0.0, 0.0), low_resolution_probability=0.0)


def draw(config: SyntheticConfig, seed: int, size: int = 96):
    return SyntheticBrains(config, size).slice(np.random.default_rng(seed))


def test_slices_are_a_pure_function_of_their_seed():
    first, again, other = draw(COARSE, 3), draw(COARSE, 3), draw(COARSE, 4)
    assert first.image.shape == (1, 96, 96) and first.image.dtype == torch.float32
    assert torch.equal(first.image, again.image) and np.array_equal(first.tissue, again.tissue)
    assert not torch.equal(first.image, other.image)
    assert first.contrast in CONTRASTS and set(np.unique(first.tissue)) <= {0, 1, 2, 3}


def test_tissue_labels_match_the_images():
    """Without texture, bias, noise or low resolution, a slice is its labels' signals mixed by partial volume:
    the mean signal of each (tissue, region) explains nearly all of the image."""
    explained = []
    for seed in range(8):
        generated = draw(CLEAN, seed)
        image = generated.image[0].numpy()
        groups = generated.tissue.astype(np.int64) * (len(REGIONS) + 8) + generated.regions
        means = np.bincount(groups.ravel(), weights=image.ravel()) / np.maximum(np.bincount(groups.ravel()), 1)
        residual = image - means[groups]
        explained.append(1 - residual.var() / image.var())
        assert (generated.raw[generated.tissue == 0] >= 0).all()  # no negative signal anywhere
    assert min(explained) > 0.85, explained


@pytest.mark.parametrize("contrast, darker_brighter", [
    ("T1", [("CSF", "GM"), ("GM", "WM")]), ("T2", [("WM", "GM"), ("GM", "CSF")]),
    ("FLAIR", [("CSF", "WM"), ("WM", "GM")]), ("PD", [("WM", "GM"), ("WM", "CSF")])])  # PD: CSF ~ GM
def test_mri_like_contrasts_order_the_tissues_as_the_sequence_does(contrast, darker_brighter):
    only = replace(COARSE, contrast_weights=tuple(float(c == contrast) for c in CONTRASTS))
    means = {name: [] for name in ("CSF", "GM", "WM")}
    for seed in range(6):
        generated = draw(only, seed, size=128)
        assert generated.contrast == contrast
        for label, name in enumerate(("CSF", "GM", "WM"), start=1):
            if (generated.tissue == label).sum() > 50:
                means[name].append(float(generated.image[0].numpy()[generated.tissue == label].mean()))
    average = {name: np.mean(values) for name, values in means.items()}
    assert all(average[darker] < average[brighter] for darker, brighter in darker_brighter), average


def test_images_are_normalised_like_the_engines_slices():
    """Clipped and z-scored with the statistics of the whole rendered volume: over many slices the head is
    centred near 0 with unit spread, the background sits at the low clip, and ranges are those of real shards."""
    head_values = []
    for seed in range(12):
        generated = draw(COARSE, seed)
        image = generated.image[0].numpy()
        air = generated.regions == 0
        head_values.append(image[~air])
        assert np.median(image[air]) <= np.percentile(image[~air], 10) + 0.05  # background: the darkest signal
        assert -4 < image.min() and image.max() < 5
    values = np.concatenate(head_values)
    assert abs(values.mean()) < 0.6 and 0.5 < values.std() < 1.5, (values.mean(), values.std())
