"""Cluster map: k-means on a volume's patch tokens, an unsupervised parcellation of the head.

k-means (scikit-learn, seeded) runs on the unit-normalised foreground tokens (cosine geometry, as the
features are compared everywhere else). Every patch is then assigned to its nearest centre; labels are
numbered by cluster size (1 = the largest), so the numbering is the same from run to run. Boundaries are
drawn at voxel level by upsampling each cluster's indicator bilinearly and taking the largest, which gives
smooth borders instead of 16-voxel blocks; voxels outside the head mask are 0.
"""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from ..errors import BrainDINOError
from ..features import VolumeFeatures
from ..volume import Volume
from .tokens import flat_tokens, foreground_rows, subsample


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def cluster_map(features: VolumeFeatures, k: int = 8, seed: int = 0, sample: int = 20000) -> Volume:
    """k-means of the foreground patch tokens into `k` regions: uint8 labels 1..k on the head, 0 elsewhere."""
    if not 1 <= k <= 255:
        raise ValueError(f"k must be between 1 and 255, got {k}")
    tokens = _unit_rows(flat_tokens(features))
    rows = foreground_rows(features)
    if len(rows) < k:
        raise BrainDINOError(features.source or "features", f"only {len(rows)} foreground patches; too few for "
                                                            f"{k} clusters")
    kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(tokens[subsample(rows, sample, seed)])
    assigned = kmeans.predict(tokens)
    sizes = np.bincount(assigned[rows], minlength=k)
    label_of_cluster = np.empty(k, dtype=np.uint8)
    label_of_cluster[np.argsort(-sizes, kind="stable")] = np.arange(1, k + 1)
    per_patch = label_of_cluster[assigned].reshape(features.num_slices, *features.grid)

    labels = np.zeros(features.slices.volume_shape, dtype=np.uint8)
    best = np.zeros(features.slices.volume_shape, dtype=np.float32)
    for label in range(1, k + 1):
        share = features.to_volume((per_patch == label).astype(np.float32)).array
        wins = share > best
        labels[wins] = label
        best[wins] = share[wins]
    labels[~features.foreground] = 0
    return features.empty_volume(np.uint8).with_array(labels)
