"""From the token grid of the embedded slices to every voxel: across slices, then within each slice.

Across slices, features are interpolated linearly between the two nearest embedded slices
(`slice_interpolation`); an embedded slice gets exactly its own tokens. Within a slice, a per-cell map
[K, grid rows, grid cols] becomes a voxel map in one of two ways (`InplaneUpsampler`):

- `bilinear`: torch's bilinear interpolation (align_corners=False) of the grid cell centres;
- `guided`: joint bilateral upsampling (Kopf et al. 2007, the training-free form of FeatUp's JBU). A voxel
  takes a weighted mean of the 3 x 3 nearest cells, weighted by distance (Gaussian, `sigma_cells`) times
  similarity between the voxel's own intensity and the cell's mean intensity (Gaussian, `sigma_intensity`,
  in units of the foreground's standard deviation). Boundaries in the map then follow edges in the image,
  which gives sub-patch detail: grey matter versus white matter inside a 6-mm patch, the brain's edge.

Both are normalised linear combinations of cell values with weights that depend only on the image, so
upsampling a linear map of the features (PCA scores, a linear head's logits) equals the map of upsampled
features, and values stay within the range of the cells'. Only reduced maps (a few channels) are ever
upsampled, never D-dimensional features (a 1-mm brain is ~7 M voxels).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .slices import GUIDE_SCALE, SliceGeometry


@dataclass(frozen=True)
class GuidedUpsampling:
    """Joint bilateral upsampling parameters: spatial sigma in grid cells, range sigma in foreground SDs, and
    how many of the nearest cells along each axis a voxel reads (taps x taps in all)."""

    sigma_cells: float = 0.75
    sigma_intensity: float = 0.35
    taps: int = 3


def slice_interpolation(geometry: SliceGeometry, targets: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """For voxel slices `targets` (inside `geometry.covered`): positions (lower, upper) of the embedded
    slices around each and the weight t of the upper one, so value = (1 - t) * lower + t * upper."""
    embedded = np.asarray(geometry.slice_indices)
    targets = np.asarray(targets)
    if len(embedded) == 1:
        zeros = torch.zeros(len(targets), dtype=torch.long)
        return zeros, zeros, torch.zeros(len(targets))
    lower = np.clip(np.searchsorted(embedded, targets, side="right") - 1, 0, len(embedded) - 2)
    t = (targets - embedded[lower]) / (embedded[lower + 1] - embedded[lower])
    return torch.from_numpy(lower), torch.from_numpy(lower + 1), torch.from_numpy(t).float()


def interpolate_slices(values: Tensor, geometry: SliceGeometry, targets: Sequence[int]) -> Tensor:
    """Per-embedded-slice values [S, ...] -> values at voxel slices `targets` [n, ...] (linear across slices;
    exactly the embedded slice's own values where a target is one)."""
    lower, upper, t = slice_interpolation(geometry, targets)
    low = values[lower].float()
    t = t.reshape(-1, *([1] * (values.ndim - 1)))
    exact = (t == 0)
    mixed = torch.lerp(low, values[upper].float(), t)
    return torch.where(exact, low, mixed)


def cell_means(values: Tensor, geometry: SliceGeometry, upscale: int = 1) -> Tensor:
    """Area means [n, C, gh * upscale, gw * upscale] of box-sized maps [n, C, rows, cols] over the grid's cells
    (cells past the box's edge average what they overlap of it)."""
    (origin_r, origin_c), (cell_r, cell_c) = geometry.origin, geometry.cell
    gh, gw = (side * upscale for side in geometry.grid)
    top, left = round(origin_r), round(origin_c)
    rows, cols = round(gh * cell_r / upscale), round(gw * cell_c / upscale)
    region = values[..., top:top + rows, left:left + cols]
    pad = (0, cols - region.shape[-1], 0, rows - region.shape[-2])
    if any(pad):
        region = F.pad(region, pad, mode="replicate")
    return F.adaptive_avg_pool2d(region, (gh, gw))


def _grid_coordinates(length: int, origin: float, cell: float) -> Tensor:
    """Continuous grid coordinate of each voxel centre 0..length-1 along one axis (cell centres are integers)."""
    return (torch.arange(length) + 0.5 - origin) / cell - 0.5


def linear_weights(length: int, size: int, origin: float, cell: float) -> Tensor:
    """Matrix [length, size] of 1-D linear interpolation from `size` cell centres to `length` voxels, with the
    edge cells extended (torch's bilinear with align_corners=False when the origin is 0)."""
    u = _grid_coordinates(length, origin, cell).clamp(0, size - 1)
    lower = u.floor().long().clamp_max(size - 1)
    upper = (lower + 1).clamp_max(size - 1)
    fraction = u - lower
    matrix = torch.zeros(length, size)
    matrix[torch.arange(length), lower] += 1 - fraction
    matrix[torch.arange(length), upper] += fraction
    return matrix


@dataclass(frozen=True)
class AxisTaps:
    """Joint bilateral taps along one axis, in blocks: `block` voxels span `cells` grid cells exactly (cells
    are a whole or rational number of voxels), so every block sees the same pattern of spatial weights.

    Voxel d of block j takes cells j * cells + first + t, t = 0..taps-1, with spatial weight `weights[d, t]`
    (0 for cells beyond its own nearest `params.taps`)."""

    block: int
    cells: int
    first: int
    weights: Tensor  # [block, taps]
    blocks: int

    @property
    def taps(self) -> int:
        return self.weights.shape[1]

    @classmethod
    def build(cls, length: int, size: int, origin: float, cell: float, params: GuidedUpsampling) -> AxisTaps:
        cells = next((q for q in range(1, 17) if abs(cell * q - round(cell * q)) < 1e-6), None)
        if cells is None:
            raise ValueError(f"grid cells of {cell} voxels are not a simple fraction of voxels")
        block = round(cell * cells)
        u = _grid_coordinates(block, origin, cell)  # coordinates of the first block's voxels
        start = torch.ceil(u - params.taps / 2).long()  # the nearest `taps` cells are start .. start + taps - 1
        first, last = int(start.min()), int(start.max()) + params.taps - 1
        offsets = torch.arange(first, last + 1)
        own = (offsets[None] >= start[:, None]) & (offsets[None] < start[:, None] + params.taps)
        weights = torch.exp(-(u[:, None] - offsets[None]) ** 2 / (2 * params.sigma_cells ** 2)) * own
        return cls(block, cells, first, weights, -(-length // block))

    def unfold(self, values: Tensor, dim: int) -> Tensor:
        """Per block, the cells it reads along `dim` of `values` (edge cells repeated): `dim` becomes the block
        index and a new last dimension of size `taps` the cells."""
        size = values.shape[dim]
        needed = torch.arange(self.first, (self.blocks - 1) * self.cells + self.first + self.taps)
        padded = values.index_select(dim, needed.clamp(0, size - 1))
        return padded.unfold(dim, self.taps, self.cells)


def _block_range(voxels: slice, block: int) -> slice:
    """The blocks of `block` voxels that cover the voxel range `voxels`."""
    return slice(voxels.start // block, -(-voxels.stop // block))


class GuidedWeights:
    """The joint bilateral weights of a volume's voxels: [n, blocks_r, blocks_c, block_r, block_c, taps_r, taps_c]
    per voxel slice, each voxel's taps summing to 1.

    Only the blocks that hold voxels of the volume (the box's `rows` x `cols`, in box voxels) are made: block
    indices are those of the whole box, these are `blocks_r` x `blocks_c` of them.

    They depend on the image (the guide) only, never on the map being upsampled, and cost several times more
    than applying them: with `keep_mib` > 0 the weights of whole slices are kept once computed (36 bytes per
    voxel; the first slices of `covered` that fit), so every later map of the same volume only applies them."""

    def __init__(self, geometry: SliceGeometry, guide: np.ndarray, row_taps: AxisTaps, col_taps: AxisTaps,
                 rows: slice, cols: slice, params: GuidedUpsampling, upscale: int = 1, keep_mib: float = 0.0):
        self.geometry, self.guide, self.params, self.upscale = geometry, guide, params, upscale
        self.row_taps, self.col_taps = row_taps, col_taps
        self.blocks_r, self.blocks_c = _block_range(rows, row_taps.block), _block_range(cols, col_taps.block)
        self.shape = (self.blocks_r.stop - self.blocks_r.start, self.blocks_c.stop - self.blocks_c.start,
                      row_taps.block, col_taps.block, row_taps.taps, col_taps.taps)
        slice_bytes = 4 * math.prod(self.shape)
        self.first = geometry.covered.start
        self.kept_slices = min(len(geometry.covered), int(keep_mib * 2**20 // slice_bytes))
        self._kept: Tensor | None = None  # [kept_slices, *shape], allocated on first use
        self._ready = np.zeros(self.kept_slices, dtype=bool)
        self._cell_guide: Tensor | None = None  # mean guide intensity of every cell of every slice [Z, gh, gw]

    @property
    def kept_count(self) -> int:
        """How many slices' weights are kept now."""
        return int(self._ready.sum())

    @property
    def kept_bytes(self) -> int:
        """Memory the kept weights take (once allocated)."""
        return 0 if self._kept is None else self._kept.numel() * self._kept.element_size()

    def __call__(self, slice_indices: Sequence[int], blocks_r: slice | None = None,
                 blocks_c: slice | None = None) -> Tensor:
        """The weights of voxel slices `slice_indices`: of all the volume's blocks, or of `blocks_r` x `blocks_c`.

        Whole slices are kept (when they fit); a request for some blocks of slices not kept yet computes just
        those blocks (one line of voxels across all slices is fast before the volume's weights are kept)."""
        whole = blocks_r is None and blocks_c is None
        blocks_r, blocks_c = blocks_r or self.blocks_r, blocks_c or self.blocks_c
        slice_indices = np.asarray(slice_indices)
        positions = slice_indices - self.first
        keepable = bool(len(positions)) and positions.min() >= 0 and positions.max() < self.kept_slices
        if not keepable:
            return self.compute(slice_indices, blocks_r, blocks_c)
        missing = positions[~self._ready[positions]]
        if len(missing) and not whole:
            return self.compute(slice_indices, blocks_r, blocks_c)
        if len(missing):
            if self._kept is None:
                self._kept = torch.empty(self.kept_slices, *self.shape)
            self._kept[torch.from_numpy(missing)] = self.compute(missing + self.first)
            self._ready[missing] = True
        run = np.array_equal(positions, np.arange(positions[0], positions[0] + len(positions)))
        kept = self._kept[positions[0]:positions[-1] + 1] if run else self._kept[torch.from_numpy(positions)]
        if whole:
            return kept
        (r0, c0), (r, c) = (self.blocks_r.start, self.blocks_c.start), (blocks_r, blocks_c)
        return kept[:, r.start - r0:r.stop - r0, c.start - c0:c.stop - c0]

    def compute(self, slice_indices: Sequence[int], blocks_r: slice | None = None,
                blocks_c: slice | None = None) -> Tensor:
        """The weights from the guide, contiguous float32 (see the class docstring for the layout)."""
        blocks_r, blocks_c = blocks_r or self.blocks_r, blocks_c or self.blocks_c
        rows_t, cols_t = self.row_taps, self.col_taps
        n = len(slice_indices)
        if self._cell_guide is None:  # small, and the whole slice's cells even for a few blocks
            self._cell_guide = cell_means(self._guide(slice(None))[:, None], self.geometry, self.upscale)[:, 0]
        cell_guide = self._cell_guide[torch.from_numpy(np.asarray(slice_indices))]  # [n, gh, gw]
        # The guide's voxels of the blocks, [n, blocks_r, blocks_c, block_r, block_c] (edge voxels repeated past
        # the box's last row and column).
        last_row, last_col = self.guide.shape[1] - 1, self.guide.shape[2] - 1
        rows = np.minimum(np.arange(blocks_r.start * rows_t.block, blocks_r.stop * rows_t.block), last_row)
        cols = np.minimum(np.arange(blocks_c.start * cols_t.block, blocks_c.stop * cols_t.block), last_col)
        voxels = self._guide(np.ix_(np.asarray(slice_indices), rows, cols))
        voxels = voxels.reshape(n, len(rows) // rows_t.block, rows_t.block, len(cols) // cols_t.block,
                                cols_t.block).permute(0, 1, 3, 2, 4)
        taps_guide = cols_t.unfold(rows_t.unfold(cell_guide, 1), 2)  # [n, blocks_r, blocks_c, taps_r, taps_c]
        taps_guide = taps_guide[:, blocks_r, blocks_c]
        spatial = rows_t.weights[:, None, :, None] * cols_t.weights[None, :, None, :]  # [block_r, block_c, t_r, t_c]
        weights = (voxels[..., None, None] - taps_guide[:, :, :, None, None]).contiguous()  # intensity differences:
        weights.square_().mul_(-0.5 / self.params.sigma_intensity ** 2).exp_().mul_(spatial)
        weights /= weights.sum(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return weights

    def _guide(self, index) -> Tensor:
        """Normalised intensities of the guide's voxels `guide[index]` (float32)."""
        return torch.from_numpy(self.guide[index]).float() / GUIDE_SCALE


class InplaneUpsampler:
    """Per-cell maps of voxel slices -> voxel maps on the window of the box inside the volume.

    `guide` is the stack's uint8 guide [Z, rows, cols]; `upscale` > 1 serves heads that predict on a grid
    finer than the tokens (the decoder head). Bilinear upsampling is two small matrix products per map;
    guided upsampling works in blocks of voxels that share their pattern of spatial weights (`AxisTaps`), with
    weights that an upsampler made for many maps of one volume keeps (`keep_weights_mib`, see `GuidedWeights`)."""

    def __init__(self, geometry: SliceGeometry, guide: np.ndarray | None, method: str = "guided",
                 upscale: int = 1, params: GuidedUpsampling = GuidedUpsampling(), keep_weights_mib: float = 0.0):
        if method == "guided" and guide is None:
            raise ValueError("guided upsampling needs the image guide")
        self.geometry, self.guide, self.method, self.params, self.upscale = geometry, guide, method, params, upscale
        self.grid = tuple(side * upscale for side in geometry.grid)
        (origin_r, origin_c), (cell_r, cell_c) = geometry.origin, geometry.cell
        self.cell = (cell_r / upscale, cell_c / upscale)
        self.origin = (origin_r, origin_c)
        self.rows, self.cols, _, _ = geometry.window()
        box_rows, box_cols = geometry.box[2:]
        if method == "bilinear":
            self.row_matrix = linear_weights(box_rows, self.grid[0], origin_r, self.cell[0])[self.rows]
            self.col_matrix = linear_weights(box_cols, self.grid[1], origin_c, self.cell[1])[self.cols]
        else:
            self.row_taps = AxisTaps.build(box_rows, self.grid[0], origin_r, self.cell[0], params)
            self.col_taps = AxisTaps.build(box_cols, self.grid[1], origin_c, self.cell[1], params)
            self.weights = GuidedWeights(geometry, guide, self.row_taps, self.col_taps, self.rows, self.cols, params,
                                         upscale, keep_weights_mib)

    def __call__(self, cells: Tensor, slice_indices: Sequence[int], rows: slice = slice(None),
                 cols: slice = slice(None)) -> Tensor:
        """Maps [n, K, gh, gw] of voxel slices `slice_indices` -> [n, K, window rows, window cols] float32, or
        only the window's voxel rows `rows` and columns `cols` (one row or column: a plane of the volume)."""
        cells = cells.float()
        if tuple(cells.shape[-2:]) != self.grid:
            raise ValueError(f"cell map of shape {tuple(cells.shape)} does not match the grid {self.grid}")
        if self.method == "bilinear":
            return self.row_matrix[rows] @ cells @ self.col_matrix[cols].T
        return self._guided(cells, slice_indices, rows, cols)

    def _guided(self, cells: Tensor, slice_indices: Sequence[int], rows: slice, cols: slice) -> Tensor:
        # Window rows and columns -> box voxels -> the blocks that hold them.
        box_rows = slice(*(self.rows.start + v for v in rows.indices(self.rows.stop - self.rows.start)[:2]))
        box_cols = slice(*(self.cols.start + v for v in cols.indices(self.cols.stop - self.cols.start)[:2]))
        rows_t, cols_t = self.row_taps, self.col_taps
        blocks_r, blocks_c = _block_range(box_rows, rows_t.block), _block_range(box_cols, cols_t.block)
        whole = box_rows == self.rows and box_cols == self.cols
        weights = self.weights(slice_indices) if whole else self.weights(slice_indices, blocks_r, blocks_c)
        taps_cells = cols_t.unfold(rows_t.unfold(cells, 2), 3)[:, :, blocks_r, blocks_c]  # [n, K, a, b, t_r, t_c]
        n, a, b, block_r, block_c, taps_r, taps_c = weights.shape
        channels = cells.shape[1]
        # Per block, voxels x taps times taps x channels: one batched matrix product.
        out = torch.bmm(weights.reshape(n * a * b, block_r * block_c, taps_r * taps_c),
                        taps_cells.permute(0, 2, 3, 4, 5, 1).reshape(n * a * b, taps_r * taps_c, channels))
        out = out.reshape(n, a, b, block_r, block_c, channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(n, channels, a * block_r, b * block_c)
        top, left = blocks_r.start * block_r, blocks_c.start * block_c
        return out[:, :, box_rows.start - top:box_rows.stop - top, box_cols.start - left:box_cols.stop - left]
