"""PCA map: the main directions of variation of a volume's patch tokens, as RGB colours and float components.

PCA is fitted on (a seeded subsample of) the foreground patch tokens, so the head's anatomy, not the empty
background, sets the colours. Signs are fixed by a rule (each component's scores are skewed positively:
its long tail is the bright end), so the same volume and model always give the same colours whatever sign
the SVD solver returns. Each of the first three components is scaled robustly (its 1st to 99th foreground
percentile onto 0-255) to make the RGB image. Scores are computed on the tokens of the embedded slices and
upsampled to the voxels (a projection is linear, so this equals projecting upsampled features), then coloured.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

from ..errors import BrainDINOError
from ..features import VolumeFeatures
from ..map_defaults import MAP_DEFAULTS
from ..volume import Volume
from .tokens import flat_tokens, foreground_rows, subsample

log = logging.getLogger(__name__)

RGB_PERCENTILES = (1.0, 99.0)


@dataclass
class PCAMap:
    """`rgb`: uint8 [Z, Y, X, 3] (first three components as colours); `components`: float32 [Z, Y, X, k]."""

    rgb: Volume
    components: Volume
    explained_variance_ratio: np.ndarray  # [k]


def _orient_signs(scores: np.ndarray) -> np.ndarray:
    """+1/-1 per component so that the component's scores have non-negative skewness."""
    centred = scores - scores.mean(axis=0)
    return np.where((centred ** 3).mean(axis=0) < 0, -1.0, 1.0)


def _to_rgb(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Scores [..., 3] -> floats in [0, 255], each channel scaled by the percentiles of `reference` [M, 3]."""
    low, high = np.percentile(reference, RGB_PERCENTILES, axis=0)
    return np.clip((scores - low) / np.maximum(high - low, 1e-12), 0.0, 1.0) * 255.0


def pca_map(features: VolumeFeatures, components: int = MAP_DEFAULTS.components, remove_background: bool = True,
            sample: int = MAP_DEFAULTS.sample, seed: int = MAP_DEFAULTS.seed) -> PCAMap:
    """PCA of the patch tokens of `features`, upsampled once to the input's grid.

    `remove_background`: fit on the head's patches only and set voxels outside the head mask to 0 in both
    outputs. `sample`: at most this many tokens are used for the fit (seeded by `seed`).
    """
    if components < 1:
        raise ValueError(f"components must be at least 1, got {components}")
    tokens = flat_tokens(features)
    fit_rows = foreground_rows(features) if remove_background else np.arange(len(tokens))
    fitted = max(3, components)
    if len(fit_rows) <= fitted:
        raise BrainDINOError(features.source or "features", f"only {len(fit_rows)} foreground patches; "
                                                            f"too few for {fitted} principal components")
    fit_rows = subsample(fit_rows, sample, seed)
    pca = PCA(n_components=fitted, svd_solver="covariance_eigh", random_state=seed).fit(tokens[fit_rows])
    scores = pca.transform(tokens)
    scores *= _orient_signs(scores[fit_rows])
    log.info("PCA on %d tokens: explained variance %s", len(fit_rows), np.round(pca.explained_variance_ratio_, 3))

    grid = (features.num_slices, *features.grid)
    upsampled = features.to_volume(scores.reshape(*grid, fitted).astype(np.float32))
    component_volume = upsampled.with_array(np.ascontiguousarray(upsampled.array[..., :components]))
    rgb = upsampled.with_array(np.rint(_to_rgb(upsampled.array[..., :3], scores[fit_rows, :3])).astype(np.uint8))
    if remove_background:
        rgb.array[~features.foreground] = 0
        component_volume.array[~features.foreground] = 0
    return PCAMap(rgb=rgb, components=component_volume,
                  explained_variance_ratio=pca.explained_variance_ratio_[:components].copy())
