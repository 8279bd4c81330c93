"""Similarity to a point: cosine similarity between the feature at one physical point and every voxel's feature.

Voxel features are the bilinear in-plane interpolation of the (unit-normalised) patch tokens of each axial
slice, never materialised: the similarity at voxel v is

    cos(q, f(v)) = <q, f(v)> / (|q| |f(v)|),   f(v) = sum_p w_p(v) t_p,   q = f(seed)

The numerator is linear in the tokens, so it is the bilinear upsampling of one per-patch map (q against
every token): one upsampling per point. The denominator |f(v)| depends only on the features, so
`SimilarityIndex` computes it once (from each slice's token Gram matrix and the interpolation weights).
By Cauchy-Schwarz the map lies in [-1, 1] and equals 1 exactly at the seed voxel: the seed's own value is
the maximum. A new point then costs one matrix-vector product and one upsampling.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BrainDINOError
from ..features import VolumeFeatures
from ..volume import Geometry, Volume

# Float rounding allowed at the seed voxel, whose similarity is exactly 1 in exact arithmetic.
ROUNDING = 1e-5


def interpolation_matrix(size_in: int, size_out: int) -> Tensor:
    """Weights [size_out, size_in] of 1-D linear upsampling exactly as torch's bilinear (align_corners=False)."""
    identity = torch.eye(size_in)[None]  # channel c is the unit impulse at input sample c
    return F.interpolate(identity, size=size_out, mode="linear", align_corners=False)[0].T.contiguous()


def _describe(point_lps) -> str:
    return f"point (LPS mm) {tuple(round(float(v), 1) for v in point_lps)}"


def voxel_of_point(geometry: Geometry, point_lps: np.ndarray | tuple[float, float, float]) -> tuple[int, int, int]:
    """The canonical voxel (k, j, i) containing an LPS point; `BrainDINOError` if it is outside the grid."""
    kji = np.rint(geometry.lps_to_index(np.asarray(point_lps, dtype=np.float64)[None])[0])
    k, j, i = (int(v) for v in kji)
    width, height, depth = geometry.size
    if not (0 <= k < depth and 0 <= j < height and 0 <= i < width):
        raise BrainDINOError(_describe(point_lps), f"lies outside the volume (voxel {k, j, i} of a "
                                                   f"{depth}x{height}x{width} grid)")
    return k, j, i


class SimilarityIndex:
    """Normalised tokens and per-voxel feature norms of one volume, precomputed for fast `map(point)` calls.

    Upsampling is separable: per slice, `rows @ per_patch_map @ cols.T` with the interpolation weights
    restricted to the voxels inside both the crop box and the volume (`window`). This is the same bilinear
    map as `VolumeFeatures.to_volume`, as two small matrix products, which keeps a new point interactive.
    """

    def __init__(self, features: VolumeFeatures, chunk: int = 8):
        self.features = features
        self.chunk = chunk
        self.tokens = F.normalize(features.patches.float(), dim=-1)  # [S, h, w, D]
        slices = features.slices
        _, height, width = slices.volume_shape
        row0, col0, box_rows, box_cols = slices.box
        h, w = features.grid
        # Rows/cols of the box that lie inside the volume, in box coordinates.
        self.box_window = (max(0, -row0), min(box_rows, height - row0), max(0, -col0), min(box_cols, width - col0))
        r_lo, r_hi, c_lo, c_hi = self.box_window
        self.row_weights = interpolation_matrix(h, box_rows)[r_lo:r_hi]  # [rows in window, h]
        self.col_weights = interpolation_matrix(w, box_cols)[c_lo:c_hi]  # [cols in window, w]
        self.slice_indices = np.asarray(slices.slice_indices)
        # The same window in volume coordinates (rows j, columns i).
        self.window_rows = slice(row0 + r_lo, row0 + r_hi)
        self.window_cols = slice(col0 + c_lo, col0 + c_hi)

    def upsample(self, per_patch: Tensor) -> Tensor:
        """Per-patch map [S, h, w] -> values on the voxels of the window [S, rows, cols] (bilinear)."""
        return self.row_weights @ (per_patch @ self.col_weights.T)

    def new_volume(self) -> tuple[Volume, Tensor, bool]:
        """A zero float32 volume on the input grid, a writable [S, rows, cols] tensor for its window voxels,
        and whether that tensor is a view into the volume.

        When the embedded slices are consecutive (the usual case) it is a view, so results written into it
        land in the volume without a copy; otherwise `store` copies them in.
        """
        array = np.zeros(self.features.slices.volume_shape, dtype=np.float32)
        volume = self.features.empty_volume().with_array(array)
        first, last = int(self.slice_indices[0]), int(self.slice_indices[-1])
        if last - first + 1 == len(self.slice_indices):
            return volume, torch.from_numpy(array)[first:last + 1, self.window_rows, self.window_cols], True
        r_lo, r_hi, c_lo, c_hi = self.box_window
        return volume, torch.empty((len(self.slice_indices), r_hi - r_lo, c_hi - c_lo)), False

    def store(self, volume: Volume, window: Tensor) -> None:
        """Copy window values [S, rows, cols] into their voxels of `volume`."""
        volume.array[self.slice_indices, self.window_rows, self.window_cols] = window.numpy()

    @cached_property
    def inverse_voxel_norm(self) -> Tensor:
        """1 / |f(v)| on the window [S, rows, cols], from per-slice token Gram matrices and the weights.

        Computed on first use (a query from this volume against another one never needs it).
        """
        rows, cols = self.row_weights, self.col_weights
        parts = []
        for start in range(0, self.tokens.shape[0], self.chunk):
            t = self.tokens[start:start + self.chunk]
            gram = torch.einsum("srcd,sRCd->srcRC", t, t)
            along_rows = torch.einsum("yr,srcRC->sycRC", rows, gram)
            along_rows = torch.einsum("yR,sycRC->sycC", rows, along_rows)
            parts.append(torch.einsum("xc,xC,sycC->syx", cols, cols, along_rows).clamp_min(0).sqrt())
        return 1.0 / torch.cat(parts).clamp_min(torch.finfo(torch.float32).tiny)

    def seed_voxel(self, point_lps: np.ndarray | tuple[float, float, float]) -> tuple[int, int, int]:
        """The voxel (k, j, i) containing an LPS point; refuses points outside the embedded slices or box."""
        k, j, i = voxel_of_point(self.features.geometry, point_lps)
        where = _describe(point_lps)
        if k not in self.features.slices.slice_indices:
            raise BrainDINOError(where, f"lies on axial slice {k}, which has no foreground and was not embedded")
        row0, col0, _, _ = self.features.slices.box
        r_lo, r_hi, c_lo, c_hi = self.box_window
        if not (r_lo <= j - row0 < r_hi and c_lo <= i - col0 < c_hi):
            raise BrainDINOError(where, "lies outside the region the model saw (the crop around the head)")
        return k, j, i

    def query(self, point_lps: np.ndarray | tuple[float, float, float]) -> Tensor:
        """The unit feature vector [D] at a physical point (the interpolated feature of its voxel)."""
        k, j, i = self.seed_voxel(point_lps)
        row0, col0, _, _ = self.features.slices.box
        r_lo, _, c_lo, _ = self.box_window
        s = self.features.slices.slice_indices.index(k)
        weights_r, weights_c = self.row_weights[j - row0 - r_lo], self.col_weights[i - col0 - c_lo]
        feature = torch.einsum("r,c,rcd->d", weights_r, weights_c, self.tokens[s])
        return F.normalize(feature, dim=0)

    def map_query(self, query: Tensor) -> Volume:
        """Cosine similarity [-1, 1] between a unit feature vector and every voxel of this volume (float32).

        Voxels of slices that were not embedded, and outside the crop box, are 0.
        """
        volume, window, is_view = self.new_volume()
        numerator = self.upsample(self.tokens @ query)  # <q, f(v)>
        torch.mul(numerator, self.inverse_voxel_norm, out=window).clamp_(-1.0, 1.0)  # / |f(v)|
        if not is_view:
            self.store(volume, window)
        return volume

    def map(self, point_lps: np.ndarray | tuple[float, float, float]) -> Volume:
        """Similarity of every voxel to the feature at `point_lps` (LPS mm); exactly 1.0, the maximum, at the
        point's voxel (where it is 1 in exact arithmetic; float rounding is at most ~1e-6)."""
        similarity = self.map_query(self.query(point_lps))
        seed = self.seed_voxel(point_lps)
        if similarity.array[seed] < 1.0 - ROUNDING:  # cannot happen unless the features are degenerate
            raise AssertionError(f"similarity at the seed voxel is {similarity.array[seed]}, not 1")
        similarity.array[seed] = 1.0
        return similarity


def similarity_map(features: VolumeFeatures, point_lps: np.ndarray | tuple[float, float, float],
                   target: VolumeFeatures | None = None) -> Volume:
    """Cosine similarity between the feature at `point_lps` (LPS mm) in `features` and every voxel of
    `features` (or of `target`: "find this structure in another scan"), as a float32 volume in [-1, 1].

    For repeated points on the same features, build one `SimilarityIndex` and call `.map(point)`.
    """
    if target is not None and target.model_id != features.model_id:
        raise BrainDINOError(target.source or "target features", f"were computed with {target.model_id}, not with "
                                                                 f"{features.model_id}: their features do not compare")
    source = SimilarityIndex(features)
    query = source.query(point_lps)
    destination = source if target is None else SimilarityIndex(target)
    return destination.map_query(query)
