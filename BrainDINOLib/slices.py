"""`SliceStack`: a volume's axial slices made model-ready, and the geometry that maps patches back to voxels.

Steps, in order: foreground mask (Otsu threshold, largest connected component, holes filled) ->
robust intensity normalisation (clip to percentiles of the foreground, then z-score with the foreground's
mean and std, as BrainDINO's preprocessing) -> one in-plane crop box for the whole volume around the
foreground, square in millimetres, with a margin -> each axial slice resized to the model's input size ->
grey replicated to the model's channels. Slices with (almost) no foreground are skipped.

The crop box is shared by all slices, so patch (r, c) of every slice covers the same in-plane voxels and a
per-patch map upsamples to the volume with one resize per slice (`SliceGeometry.upsample`).
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
from .volume import Volume


@dataclass(frozen=True)
class PreprocessConfig:
    """How a volume becomes model input. Part of every feature-cache key."""

    image_size: int = 224
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    margin_mm: float = 8.0
    min_slice_foreground: float = 0.05  # skip slices whose foreground area is below this fraction of the largest
    min_foreground_voxels: int = 512  # less than this is noise, not a head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        data = dict(data)
        if "clip_percentiles" in data:
            data["clip_percentiles"] = tuple(data["clip_percentiles"])
        return cls(**data)


@dataclass(frozen=True)
class SliceGeometry:
    """Where each model input came from: slice indices k and the in-plane box (rows j, cols i) it covers.

    The box may extend past the volume (it is padded with background); `upsample` crops it back.
    """

    volume_shape: tuple[int, int, int]
    slice_indices: tuple[int, ...]
    box: tuple[int, int, int, int]  # row0, col0, rows, cols (voxels, canonical array axes j and i)
    image_size: int
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SliceGeometry:
        return cls(volume_shape=tuple(data["volume_shape"]), slice_indices=tuple(data["slice_indices"]),
                   box=tuple(data["box"]), image_size=int(data["image_size"]), patch_size=int(data["patch_size"]))

    def upsample(self, per_patch: Tensor | np.ndarray, mode: str = "bilinear", fill: float = 0.0,
                 chunk: int = 16) -> np.ndarray:
        """A per-patch map [S, h, w, K] (or [S, h, w]) -> float32 voxel array [Z, Y, X, K] (or [Z, Y, X]).

        Slices that were skipped get `fill`. Work is done `chunk` slices at a time to bound memory.
        """
        maps = per_patch if isinstance(per_patch, Tensor) else torch.from_numpy(np.array(per_patch, np.float32))
        squeeze = maps.ndim == 3
        if squeeze:
            maps = maps[..., None]
        if maps.shape[0] != len(self.slice_indices) or tuple(maps.shape[1:3]) != self.grid:
            raise ValueError(f"per-patch map of shape {tuple(maps.shape)} does not match "
                             f"{len(self.slice_indices)} slices of grid {self.grid}")
        depth, rows, cols = self.volume_shape
        out = np.full((depth, rows, cols, maps.shape[-1]), fill, dtype=np.float32)
        row0, col0, box_rows, box_cols = self.box
        # Part of the box inside the volume, in box coordinates and in volume coordinates.
        r_lo, c_lo = max(0, -row0), max(0, -col0)
        r_hi, c_hi = min(box_rows, rows - row0), min(box_cols, cols - col0)
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        indices = np.asarray(self.slice_indices)
        for start in range(0, len(indices), chunk):
            block = maps[start:start + chunk].permute(0, 3, 1, 2).float()
            resized = F.interpolate(block, size=(box_rows, box_cols), mode=mode, **kwargs)
            inside = resized[:, :, r_lo:r_hi, c_lo:c_hi].permute(0, 2, 3, 1).numpy()
            out[indices[start:start + chunk], row0 + r_lo:row0 + r_hi, col0 + c_lo:col0 + c_hi] = inside
        return out[..., 0] if squeeze else out


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


def _crop_box(mask: np.ndarray, spacing_ij: tuple[float, float], margin_mm: float) -> tuple[int, int, int, int]:
    """One square-in-millimetres in-plane box (row0, col0, rows, cols) around the foreground of all slices."""
    rows_any = np.flatnonzero(mask.any(axis=(0, 2)))
    cols_any = np.flatnonzero(mask.any(axis=(0, 1)))
    spacing_i, spacing_j = spacing_ij
    centre_r = (rows_any[0] + rows_any[-1] + 1) / 2
    centre_c = (cols_any[0] + cols_any[-1] + 1) / 2
    side_mm = max((rows_any[-1] + 1 - rows_any[0]) * spacing_j, (cols_any[-1] + 1 - cols_any[0]) * spacing_i)
    side_mm += 2 * margin_mm
    box_rows, box_cols = math.ceil(side_mm / spacing_j), math.ceil(side_mm / spacing_i)
    return (int(round(centre_r - box_rows / 2)), int(round(centre_c - box_cols / 2)), box_rows, box_cols)


@dataclass
class SliceStack:
    """Model-ready axial slices of one volume ([S, 1, H, W] float32) plus their `SliceGeometry`."""

    images: Tensor
    geometry: SliceGeometry
    foreground: np.ndarray  # bool [Z, Y, X] on the canonical grid
    config: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, start: int, stop: int, channels: int) -> Tensor:
        """Slices [start, stop) as [B, channels, H, W] (grey replicated: a view, no copy)."""
        return self.images[start:stop].expand(-1, channels, -1, -1)

    @classmethod
    def from_volume(cls, volume: Volume, patch_size: int, config: PreprocessConfig | None = None) -> SliceStack:
        config = config or PreprocessConfig()
        if config.image_size < patch_size or config.image_size % patch_size:
            raise BrainDINOError(f"image size {config.image_size}", f"must be a positive multiple of the model's "
                                                                    f"patch size {patch_size}")
        mask = foreground_mask(volume)
        if mask.sum() < config.min_foreground_voxels:
            raise BrainDINOError(volume.source or "volume", f"no usable foreground: only {int(mask.sum())} voxels "
                                                            "stand out from the background")
        area = mask.sum(axis=(1, 2))
        keep = np.flatnonzero(area >= config.min_slice_foreground * area.max())
        normalised = normalise_intensity(volume.array, mask, config.clip_percentiles)
        background = float(normalised[~mask].min()) if (~mask).any() else float(normalised.min())
        spacing_i, spacing_j = volume.geometry.spacing[:2]
        box = _crop_box(mask[keep], (spacing_i, spacing_j), config.margin_mm)
        images = _resample_box(normalised[keep], box, config.image_size, background)
        geometry = SliceGeometry(volume.shape, tuple(int(k) for k in keep), box, config.image_size, patch_size)
        return cls(images, geometry, mask, config)


def crop_box(slices: np.ndarray, box: tuple[int, int, int, int], background: float = 0.0) -> np.ndarray:
    """`box` (row0, col0, rows, cols) cut out of every slice [S, Y, X], padded with `background` past the edges."""
    row0, col0, box_rows, box_cols = box
    _, rows, cols = slices.shape
    pad = ((0, 0), (max(0, -row0), max(0, row0 + box_rows - rows)), (max(0, -col0), max(0, col0 + box_cols - cols)))
    padded = np.pad(slices, pad, constant_values=background)
    r, c = row0 + pad[1][0], col0 + pad[2][0]
    return np.ascontiguousarray(padded[:, r:r + box_rows, c:c + box_cols])


def _resample_box(slices: np.ndarray, box: tuple[int, int, int, int], size: int, background: float,
                  chunk: int = 32) -> Tensor:
    """Cut `box` out of each slice (padding with `background` past the edges) and resize it to size x size."""
    cropped = torch.from_numpy(crop_box(slices, box, background))[:, None]
    out = torch.empty((cropped.shape[0], 1, size, size), dtype=torch.float32)
    for start in range(0, cropped.shape[0], chunk):
        out[start:start + chunk] = F.interpolate(cropped[start:start + chunk], size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True)
    return out
