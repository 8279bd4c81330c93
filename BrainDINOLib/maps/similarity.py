"""Similarity to a point: cosine similarity between the feature at one physical point and the features everywhere.

Features live on the token grid of every voxel slice (interpolated linearly between embedded slices), so
the similarity is computed exactly there, one channel, and only then upsampled to the voxels (guided by the
image or bilinear, as the features' policy says). Interpolation across slices is cheap to do exactly:
with f = (1 - t) a + t b between embedded tokens a and b,

    <q, f> = (1 - t) <q, a> + t <q, b>,      |f|^2 = (1 - t)^2 |a|^2 + 2 t (1 - t) <a, b> + t^2 |b|^2

so `SimilarityIndex` keeps |a|^2 and <a, b> of neighbouring embedded slices, and a new point costs one
matrix-vector product over the embedded tokens plus one upsampling of a one-channel map. The query is the
feature at the point's voxel (across slices as above, bilinear between the four nearest cells in-plane).
The map lies in [-1, 1], and near 1 around the point.

The index also keeps the guided upsampling's weights (they depend on the image only), and maps the planes a
viewer shows (`map_planes`) in a small part of the whole volume's time: a click's map is on screen first.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BrainDINOError
from ..features import Planes, VolumeFeatures
from ..upsample import slice_interpolation
from ..volume import Geometry, Volume


# Memory a `SimilarityIndex` may keep guided upsampling weights in: 36 bytes per voxel of the slices with
# features inside the crop box (Colin27 at the CPU default: 242 MiB); slices beyond it are weighted per map.
KEEP_WEIGHTS_MIB = 512


def _describe(point_lps) -> str:
    return f"point (LPS mm) {tuple(round(float(v), 1) for v in point_lps)}"


def voxel_of_point(geometry: Geometry, point_lps: np.ndarray | tuple[float, float, float]) -> tuple[int, int, int]:
    """The canonical voxel (k, j, i) containing an LPS point; `BrainDINOError` if it is outside the grid."""
    point = np.asarray(point_lps, dtype=np.float64)
    if not np.isfinite(point).all():
        raise BrainDINOError(_describe(point_lps), "is not a finite point")
    kji = np.rint(geometry.lps_to_index(point[None])[0])
    k, j, i = (int(v) for v in kji)
    width, height, depth = geometry.size
    if not (0 <= k < depth and 0 <= j < height and 0 <= i < width):
        raise BrainDINOError(_describe(point_lps), f"lies outside the volume (voxel {k, j, i} of a "
                                                   f"{depth}x{height}x{width} grid)")
    return k, j, i


class SimilarityIndex:
    """The tokens of one volume with their norms and neighbouring-slice products, and an upsampler that keeps its
    weights (up to `keep_weights_mib`), for fast `map(point)` calls."""

    def __init__(self, features: VolumeFeatures, keep_weights_mib: float = KEEP_WEIGHTS_MIB):
        self.features = features
        self.upsampler = features.mapping.upsampler(keep_weights_mib=keep_weights_mib)
        self.tokens = features.patches.float()  # [S, h, w, D]
        self.square_norms = (self.tokens ** 2).sum(dim=-1)  # |a|^2, [S, h, w]
        self.next_products = (self.tokens[:-1] * self.tokens[1:]).sum(dim=-1)  # <a_s, a_s+1>, [S - 1, h, w]

    def seed_voxel(self, point_lps: np.ndarray | tuple[float, float, float]) -> tuple[int, int, int]:
        """The voxel (k, j, i) containing an LPS point; refuses points where there are no features."""
        k, j, i = voxel_of_point(self.features.geometry, point_lps)
        where = _describe(point_lps)
        covered = self.features.covered
        if k not in covered:
            raise BrainDINOError(where, f"lies on axial slice {k}, outside the slices with features "
                                        f"({covered.start}..{covered.stop - 1})")
        if not self.features.slices.box_contains(j, i):
            raise BrainDINOError(where, "lies outside the region the model saw (the crop around the head)")
        return k, j, i

    def query(self, point_lps: np.ndarray | tuple[float, float, float]) -> Tensor:
        """The unit feature vector [D] at a physical point."""
        k, j, i = self.seed_voxel(point_lps)
        slice_tokens = self.features.tokens_at([k])[0]  # [h, w, D]
        geometry = self.features.slices
        (origin_r, origin_c), (cell_r, cell_c) = geometry.origin, geometry.cell
        row0, col0, _, _ = geometry.box
        u = torch.tensor([(j - row0 + 0.5 - origin_r) / cell_r - 0.5, (i - col0 + 0.5 - origin_c) / cell_c - 0.5])
        image = slice_tokens.permute(2, 0, 1)[None]  # [1, D, h, w]
        h, w = geometry.grid
        # grid_sample's normalised coordinates with align_corners=False: -1 and 1 are the grid's outer edges.
        where = torch.stack([(u[1] + 0.5) / w * 2 - 1, (u[0] + 0.5) / h * 2 - 1])[None, None, None]
        feature = F.grid_sample(image, where, mode="bilinear", padding_mode="border", align_corners=False)
        return F.normalize(feature.reshape(-1), dim=0)

    def cosine_cells(self, query: Tensor, slice_indices) -> Tensor:
        """Cosine similarity [n, 1, h, w] between `query` and the features of voxel slices `slice_indices`."""
        return self._cosine_cells(self.tokens @ query, slice_indices)

    def _cosine_cells(self, products: Tensor, slice_indices) -> Tensor:
        """`cosine_cells` from the products <q, a> [S, h, w] of the query with the embedded tokens."""
        lower, upper, t = slice_interpolation(self.features.slices, slice_indices)
        t = t[:, None, None]
        numerator = (1 - t) * products[lower] + t * products[upper]
        between = self.next_products[lower.clamp_max(len(self.next_products) - 1)] if len(self.next_products) \
            else self.square_norms[lower]
        square = (1 - t) ** 2 * self.square_norms[lower] + 2 * t * (1 - t) * between + t ** 2 * self.square_norms[upper]
        cosine = numerator / square.clamp_min(torch.finfo(torch.float32).tiny).sqrt()
        return cosine.clamp(-1.0, 1.0)[:, None]

    def map_query(self, query: Tensor, cancel: Callable[[], bool] | None = None) -> Volume:
        """Cosine similarity [-1, 1] between a unit feature vector and every voxel of this volume (float32).

        Voxels of slices without features, and outside the crop box, are 0. `CancelledError` once `cancel()`.
        """
        products = self.tokens @ query
        return self.features.map_volume(lambda ks: self._cosine_cells(products, ks), squeeze=True,
                                        upsampler=self.upsampler, cancel=cancel)

    def map(self, point_lps: np.ndarray | tuple[float, float, float],
            cancel: Callable[[], bool] | None = None) -> Volume:
        """Similarity of every voxel to the feature at `point_lps` (LPS mm)."""
        return self.map_query(self.query(point_lps), cancel)

    def map_planes(self, point_lps: np.ndarray | tuple[float, float, float], planes: Planes) -> Volume:
        """`map(point_lps)` on `planes` only (equal there), 0 elsewhere: what three slice views show of it."""
        products = self.tokens @ self.query(point_lps)
        return self.features.map_planes(lambda ks: self._cosine_cells(products, ks), planes, self.upsampler)


def similarity_map(features: VolumeFeatures, point_lps: np.ndarray | tuple[float, float, float],
                   target: VolumeFeatures | None = None) -> Volume:
    """Cosine similarity between the feature at `point_lps` (LPS mm) in `features` and every voxel of
    `features` (or of `target`: "find this structure in another scan"), as a float32 volume in [-1, 1].

    For repeated points on the same features, build one `SimilarityIndex` and call `.map(point)`.
    """
    if target is not None and target.model_id != features.model_id:
        raise BrainDINOError(target.source or "target features", f"were computed with {target.model_id}, not with "
                                                                 f"{features.model_id}: their features do not compare")
    source = SimilarityIndex(features, keep_weights_mib=0)
    query = source.query(point_lps)
    destination = source if target is None else SimilarityIndex(target, keep_weights_mib=0)
    return destination.map_query(query)
