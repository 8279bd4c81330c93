"""Cluster map: k-means on a volume's patch tokens, an unsupervised parcellation of the head.

k-means (scikit-learn, seeded) runs on the unit-normalised foreground tokens (cosine geometry, as the
features are compared everywhere else). Every patch is then assigned to its nearest centre; labels are
numbered by cluster size (1 = the largest), so the numbering is the same from run to run. Every voxel slice's
features (interpolated between embedded slices) are scored by closeness to the centres, the k scores are upsampled
to the voxels (guided by the image or bilinear) and the closest centre wins, which gives borders that follow
the anatomy instead of patch blocks; voxels outside the head mask are 0.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

from ..errors import BrainDINOError
from ..features import VolumeFeatures
from ..map_defaults import MAP_DEFAULTS
from ..volume import Volume
from .tokens import flat_tokens, foreground_rows, subsample


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def cluster_map(features: VolumeFeatures, k: int = MAP_DEFAULTS.clusters, seed: int = MAP_DEFAULTS.seed,
                sample: int = MAP_DEFAULTS.sample) -> Volume:
    """k-means of the foreground patch tokens into `k` regions: uint8 labels 1..k on the head, 0 elsewhere."""
    if not 1 <= k <= 255:
        raise ValueError(f"k must be between 1 and 255, got {k}")
    tokens = _unit_rows(flat_tokens(features))
    rows = foreground_rows(features)
    if len(rows) < k:
        raise BrainDINOError(features.source or "features", f"only {len(rows)} foreground patches; too few for "
                                                            f"{k} clusters")
    kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(tokens[subsample(rows, sample, seed)])
    sizes = np.bincount(kmeans.predict(tokens[rows]), minlength=k)
    order = np.argsort(-sizes, kind="stable")  # label 1 = the largest cluster
    centres = torch.from_numpy(kmeans.cluster_centers_[order].astype(np.float32))  # [k, D]
    offsets = (centres ** 2).sum(dim=1)[None, :, None, None]

    def closeness(slice_indices) -> torch.Tensor:
        """-(squared distance to each centre) + |x|^2 of every cell's unit feature: [n, k, h, w]."""
        unit = torch.nn.functional.normalize(features.tokens_at(slice_indices), dim=-1)
        return 2 * torch.einsum("nhwd,kd->nkhw", unit, centres) - offsets

    labels = features.map_volume(closeness, reduce=lambda scores: (scores.argmax(dim=1) + 1).to(torch.uint8))
    labels.array[~features.foreground] = 0
    return labels
