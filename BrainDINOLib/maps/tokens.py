"""Patch tokens as a flat matrix, and which of them lie on the head (shared by the PCA and cluster maps)."""
from __future__ import annotations

import numpy as np

from ..features import VolumeFeatures

# A patch counts as foreground when at least this fraction of its voxels is inside the head mask.
FOREGROUND_FRACTION = 0.5


def flat_tokens(features: VolumeFeatures) -> np.ndarray:
    """All patch tokens as float32 [S * h * w, D] (row order = `features.patches` order)."""
    return features.patches.float().reshape(-1, features.patches.shape[-1]).numpy()


def foreground_rows(features: VolumeFeatures) -> np.ndarray:
    """Indices into `flat_tokens` of the patches that are mostly inside the head mask."""
    return np.flatnonzero(features.patch_foreground().reshape(-1).numpy() >= FOREGROUND_FRACTION)


def subsample(rows: np.ndarray, most: int, seed: int) -> np.ndarray:
    """At most `most` of `rows`, drawn without replacement by a seeded generator, in ascending order."""
    if len(rows) <= most:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=most, replace=False))
