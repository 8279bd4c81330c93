"""`SliceStack`: a volume's axial slices made model-ready, and the geometry that maps patches back to voxels.

Steps, in order: foreground mask (Otsu threshold, largest connected component, holes filled) ->
robust intensity normalisation (clip to percentiles of the foreground, then z-score with the foreground's
mean and std, as BrainDINO's preprocessing) -> one in-plane crop box for the whole volume around the
foreground, square in millimetres, with a margin -> the axial slices chosen by the `ResolutionPolicy`
(every n-th slice of the head) resized to the model's input size -> grey replicated to the model's channels.

The box is a whole number of patches of a whole number of voxels each, so patch (r, c) of every slice covers
the same in-plane voxels exactly. With a resolution in millimetres, the patch is that many millimetres of
whole voxels and the input size follows from the box's size in patches; with a fixed input size (the old
behaviour), the box is the head's size rounded up to whole voxels per patch.

The stack also keeps the upsampling guide: the normalised intensities of every axial slice inside the box,
quantised to uint8 (`GUIDE_*`), which maps use to put sub-patch detail back (`upsample.py`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import BrainDINOError
from .preprocessing import PreprocessConfig
from .resolution import ResolutionPolicy
from .volume import Volume

# Normalised intensity z (foreground z-score) is kept as uint8 round((z - GUIDE_LOW) * GUIDE_SCALE).
GUIDE_LOW = -4.0
GUIDE_SCALE = 32.0


@dataclass(frozen=True)
class SliceGeometry:
    """Where the tokens came from: embedded axial slices k, the in-plane box (rows j, cols i) they cover,
    and the token grid over that box.

    The box may extend past the volume (it is padded with background). Grid cell (r, c) covers the box
    rows [origin + r * cell, origin + (r + 1) * cell) (and likewise for columns), in box voxels. With a
    shift ensemble of N, the grid is N times finer than the patches and starts a fraction of a patch in.
    """

    volume_shape: tuple[int, int, int]
    slice_indices: tuple[int, ...]
    box: tuple[int, int, int, int]  # row0, col0, rows, cols (voxels, canonical array axes j and i)
    image_size: int  # model input side in pixels (of each shifted window)
    patch_size: int
    shifts: int = 1

    @property
    def patches(self) -> int:
        """Patches along each side of one model input."""
        return self.image_size // self.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        side = self.patches * self.shifts
        return side, side

    @property
    def cell(self) -> tuple[float, float]:
        """Box voxels per grid cell (rows, cols)."""
        rows, cols = self.box[2:]
        side = self.patches * self.shifts
        return rows / side, cols / side

    def window(self) -> tuple[slice, slice, slice, slice]:
        """The part of the box inside the volume: (box rows, box cols, volume rows, volume cols) as slices."""
        return box_window(self.box, self.volume_shape[1:])

    def box_contains(self, j: int, i: int) -> bool:
        """Whether the volume's voxel column (j, i) lies inside the box (the region the model saw)."""
        _, _, rows, cols = self.window()
        return rows.start <= j < rows.stop and cols.start <= i < cols.stop

    @property
    def origin(self) -> tuple[float, float]:
        """Where the first grid cell starts, in box voxels (rows, cols): 0 without shifts."""
        rows, cols = self.box[2:]
        start = (1 - 1 / self.shifts) / 2 / self.patches
        return rows * start, cols * start

    @property
    def covered(self) -> range:
        """The voxel slices that have features: the embedded ones and every slice between them."""
        return range(self.slice_indices[0], self.slice_indices[-1] + 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SliceGeometry:
        return cls(volume_shape=tuple(data["volume_shape"]), slice_indices=tuple(data["slice_indices"]),
                   box=tuple(data["box"]), image_size=int(data["image_size"]), patch_size=int(data["patch_size"]),
                   shifts=int(data.get("shifts", 1)))


def foreground_mask(volume: Volume) -> np.ndarray:
    """Head/brain mask: Otsu threshold, largest connected component, holes filled (bool [Z, Y, X])."""
    image = sitk.GetImageFromArray(volume.array.astype(np.float32))
    mask = sitk.OtsuThreshold(image, 0, 1)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    largest = sitk.BinaryFillhole(components == 1)
    return sitk.GetArrayFromImage(largest).astype(bool)


def normalise_intensity(array: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Clip to the foreground's percentiles, z-score with the foreground's statistics (float32)."""
    values = array[mask]
    low, high = np.percentile(values, percentiles)
    clipped = np.clip(array, low, high)
    inside = clipped[mask]
    std = float(inside.std()) or 1.0
    return ((clipped - float(inside.mean())) / std).astype(np.float32)


def _foreground_extent(mask: np.ndarray) -> tuple[float, float, int, int]:
    """Centre (row, col) and extent (rows, cols) in voxels of the foreground of all slices of `mask`."""
    rows_any = np.flatnonzero(mask.any(axis=(0, 2)))
    cols_any = np.flatnonzero(mask.any(axis=(0, 1)))
    return ((rows_any[0] + rows_any[-1] + 1) / 2, (cols_any[0] + cols_any[-1] + 1) / 2,
            int(rows_any[-1] + 1 - rows_any[0]), int(cols_any[-1] + 1 - cols_any[0]))


def natural_box(mask: np.ndarray, spacing_ij: tuple[float, float], margin_mm: float,
                patches: int) -> tuple[int, int, int, int]:
    """One square-in-millimetres in-plane box (row0, col0, rows, cols) around the foreground of all slices, its
    sides rounded up to a whole number of voxels per patch (`patches` patches per side)."""
    centre_r, centre_c, extent_r, extent_c = _foreground_extent(mask)
    spacing_i, spacing_j = spacing_ij
    side_mm = max(extent_r * spacing_j, extent_c * spacing_i) + 2 * margin_mm
    box_rows = math.ceil(side_mm / spacing_j / patches) * patches
    box_cols = math.ceil(side_mm / spacing_i / patches) * patches
    return (int(round(centre_r - box_rows / 2)), int(round(centre_c - box_cols / 2)), box_rows, box_cols)


def patch_aligned_box(mask: np.ndarray, spacing_ij: tuple[float, float], margin_mm: float, patch_mm: float,
                      multiple: int = 1) -> tuple[tuple[int, int, int, int], int]:
    """The square box around the foreground as a whole number of patches of whole voxels: (box, patches per side).

    Each patch is `patch_mm` rounded to a whole number of voxels along rows and along columns, at least one
    and a multiple of `multiple` (a shift ensemble's N, so shifted windows move by whole voxels)."""
    centre_r, centre_c, extent_r, extent_c = _foreground_extent(mask)
    spacing_i, spacing_j = spacing_ij
    voxels_j, voxels_i = (max(1, round(patch_mm / spacing / multiple)) * multiple for spacing in spacing_ij[::-1])
    side_mm = max(extent_r * spacing_j, extent_c * spacing_i) + 2 * margin_mm
    patches = max(1, math.ceil(side_mm / (voxels_j * spacing_j)), math.ceil(side_mm / (voxels_i * spacing_i)))
    box_rows, box_cols = patches * voxels_j, patches * voxels_i
    return (int(round(centre_r - box_rows / 2)), int(round(centre_c - box_cols / 2)), box_rows, box_cols), patches


def box_window(box: tuple[int, int, int, int], shape: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
    """The part of an in-plane `box` (row0, col0, rows, cols) that lies inside an image of `shape` (rows, cols):
    (box rows, box cols, image rows, image cols) as slices, empty where the two do not overlap."""
    row0, col0, rows, cols = box
    height, width = shape
    r_lo, c_lo = max(0, -row0), max(0, -col0)
    r_hi, c_hi = max(r_lo, min(rows, height - row0)), max(c_lo, min(cols, width - col0))
    return slice(r_lo, r_hi), slice(c_lo, c_hi), slice(row0 + r_lo, row0 + r_hi), slice(col0 + c_lo, col0 + c_hi)


def crop_box(slices: np.ndarray, box: tuple[int, int, int, int], background: float = 0.0) -> np.ndarray:
    """`box` (row0, col0, rows, cols) cut out of every slice [S, Y, X], padded with `background` past the edges."""
    box_rows, box_cols, rows, cols = box_window(box, slices.shape[1:])
    cropped = np.full((len(slices), *box[2:]), background, dtype=slices.dtype)
    cropped[:, box_rows, box_cols] = slices[:, rows, cols]
    return cropped


def quantise_guide(normalised: np.ndarray) -> np.ndarray:
    """Normalised intensities -> the uint8 upsampling guide (see `GUIDE_LOW`, `GUIDE_SCALE`)."""
    return np.clip(np.rint((normalised - GUIDE_LOW) * GUIDE_SCALE), 0, 255).astype(np.uint8)


def embedded_slices(foreground_area: np.ndarray, min_fraction: float, step: int) -> list[int]:
    """Axial slices to embed: every `step`-th from the first to the last slice with at least `min_fraction`
    of the largest foreground area, always including the last (so interpolation covers the whole head)."""
    kept = np.flatnonzero(foreground_area >= min_fraction * foreground_area.max())
    first, last = int(kept[0]), int(kept[-1])
    chosen = list(range(first, last + 1, step))
    if chosen[-1] != last:
        chosen.append(last)
    return chosen


def check_resolution(policy: ResolutionPolicy, patch_size: int) -> None:
    """Raise `BrainDINOError` unless a model with `patch_size` can embed under `policy` (checked for every volume,
    and once up front by work that should not fail volume after volume)."""
    if policy.image_size is not None and policy.image_size % patch_size:
        raise BrainDINOError(f"image size {policy.image_size}",
                             f"must be a positive multiple of the model's patch size {patch_size}")
    if policy.shifts > 1 and patch_size % policy.shifts:
        raise BrainDINOError(f"{policy.shifts} shifts", f"do not divide the model's patch size {patch_size}")


@dataclass
class SliceStack:
    """Model-ready axial slices of one volume plus their `SliceGeometry` and the upsampling guide.

    `images` is [S, 1, H, W]; with a shift ensemble of N it covers the box extended by one patch at the
    bottom and right, and `batch` cuts the N x N shifted windows out of it.
    """

    images: Tensor
    geometry: SliceGeometry
    foreground: np.ndarray  # bool [Z, Y, X] on the canonical grid
    guide: np.ndarray  # uint8 [Z, rows, cols]: normalised intensities inside the box (see quantise_guide)
    config: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, start: int, stop: int, channels: int) -> Tensor:
        """Slices [start, stop) as model input [B * N^2, channels, H, W], windows in (slice, row shift, column
        shift) order (grey replicated: views, no copy, without shifts)."""
        shifts, size = self.geometry.shifts, self.geometry.image_size
        images = self.images[start:stop]
        if shifts > 1:
            step = self.geometry.patch_size // shifts
            images = torch.stack([images[:, :, a * step:a * step + size, b * step:b * step + size]
                                  for a in range(shifts) for b in range(shifts)], dim=1).flatten(0, 1)
        return images.expand(-1, channels, -1, -1)

    def interleave(self, tokens: Tensor) -> Tensor:
        """Per-window token grids [B * N^2, h, w, D] -> one grid per slice [B, h * N, w * N, D]."""
        shifts = self.geometry.shifts
        if shifts == 1:
            return tokens
        _, h, w, dim = tokens.shape
        grids = tokens.reshape(-1, shifts, shifts, h, w, dim).permute(0, 3, 1, 4, 2, 5)
        return grids.reshape(-1, h * shifts, w * shifts, dim)

    @classmethod
    def from_volume(cls, volume: Volume, patch_size: int, config: PreprocessConfig | None = None,
                    policy: ResolutionPolicy | None = None) -> SliceStack:
        config = config or PreprocessConfig()
        policy = policy or ResolutionPolicy()
        check_resolution(policy, patch_size)
        mask = foreground_mask(volume)
        if mask.sum() < config.min_foreground_voxels:
            raise BrainDINOError(volume.source or "volume", f"no usable foreground: only {int(mask.sum())} voxels "
                                                            "stand out from the background")
        spacing_i, spacing_j, spacing_k = volume.geometry.spacing
        indices = embedded_slices(mask.sum(axis=(1, 2)), config.min_slice_foreground, policy.slice_step(spacing_k))
        normalised = normalise_intensity(volume.array, mask, config.clip_percentiles)
        background = float(normalised[~mask].min()) if (~mask).any() else float(normalised.min())
        if policy.image_size is not None:
            image_size = policy.image_size
            box = natural_box(mask[indices], (spacing_i, spacing_j), config.margin_mm, image_size // patch_size)
        else:
            box, patches = patch_aligned_box(mask[indices], (spacing_i, spacing_j), config.margin_mm, policy.patch_mm,
                                             policy.shifts)
            image_size = patches * patch_size
        geometry = SliceGeometry(volume.shape, tuple(indices), box, image_size, patch_size, policy.shifts)
        guide = quantise_guide(crop_box(normalised, box, background))
        if policy.shifts > 1:  # one more patch at the bottom and right for the shifted windows
            row0, col0, rows, cols = box
            per_patch = rows // geometry.patches, cols // geometry.patches
            box, image_size = (row0, col0, rows + per_patch[0], cols + per_patch[1]), image_size + patch_size
        images = _resample_box(normalised[indices], box, image_size, background)
        return cls(images, geometry, mask, guide, config)


def _resample_box(slices: np.ndarray, box: tuple[int, int, int, int], size: int, background: float,
                  chunk: int = 32) -> Tensor:
    """Cut `box` out of each slice (padding with `background` past the edges) and resize it to size x size."""
    cropped = torch.from_numpy(crop_box(slices, box, background))[:, None]
    out = torch.empty((cropped.shape[0], 1, size, size), dtype=torch.float32)
    for start in range(0, cropped.shape[0], chunk):
        out[start:start + chunk] = F.interpolate(cropped[start:start + chunk], size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True)
    return out
