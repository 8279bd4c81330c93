"""Multi-crop views of an MRI slice for self-distillation: 2 global crops and N local crops.

Geometry (crop scale and aspect, left-right flip, small rotation and shear) is one affine resampling per
crop (`torch.nn.functional.affine_grid` + `grid_sample`), so each crop is interpolated once. Intensity
augmentation uses MONAI transforms that fit MRI: gamma, bias field, contrast around the mean, Gaussian
blur and noise. There is no colour jitter: MRI is grey, and its contrast carries the anatomy.

All randomness comes from the `torch.Generator` passed in (MONAI's transforms are re-seeded from it),
so a view is a pure function of the slice and the generator's seed: that is what makes resume exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.transforms import (Compose, RandAdjustContrast, RandBiasField, RandGaussianNoise, RandGaussianSmooth,
                              RandScaleIntensityFixedMean)
from monai.utils import convert_to_tensor
from torch import Tensor

from .config import CropConfig


def _uniform(generator: torch.Generator, low: float, high: float, count: int) -> Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


class MultiCrop:
    """`MultiCrop(config)(image[1, H, W], generator) -> (globals [2, 1, G, G], locals [N, 1, L, L])`."""

    def __init__(self, config: CropConfig):
        self.config = config
        c = config
        self.intensity = Compose([
            RandAdjustContrast(prob=c.gamma_probability, gamma=c.gamma_range),
            RandBiasField(prob=c.bias_field_probability, coeff_range=c.bias_field_coefficients),
            RandScaleIntensityFixedMean(prob=c.contrast_probability,
                                        factors=(c.contrast_range[0] - 1, c.contrast_range[1] - 1)),
            RandGaussianSmooth(prob=c.blur_probability, sigma_x=c.blur_sigma, sigma_y=c.blur_sigma),
            RandGaussianNoise(prob=c.noise_probability, std=c.noise_std),
        ])

    def __call__(self, image: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        c = self.config
        globals_ = self._crops(image, 2, c.global_size, c.global_scale, generator)
        locals_ = self._crops(image, c.local_count, c.local_size, c.local_scale, generator)
        return globals_, locals_

    def _crops(self, image: Tensor, count: int, size: int, scale: tuple[float, float],
               generator: torch.Generator) -> Tensor:
        if count == 0:
            return image.new_zeros((0, 1, size, size))
        background = image.min()
        theta = self._affines(count, scale, generator).to(image.dtype)
        grid = F.affine_grid(theta, [count, 1, size, size], align_corners=False)
        # Sample (image - background) with zero padding, so space outside the slice reads as background.
        crops = F.grid_sample((image - background).expand(count, 1, -1, -1), grid, mode="bilinear",
                              padding_mode="zeros", align_corners=False)
        return torch.stack([self._intensity(crop, generator) for crop in crops]) + background

    def _intensity(self, crop: Tensor, generator: torch.Generator) -> Tensor:
        self.intensity.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        # A plain tensor, not MONAI's MetaTensor: metadata tracking would slow every later op on the batch.
        return convert_to_tensor(self.intensity(crop), dtype=torch.float32, track_meta=False)

    def _affines(self, count: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
        """[count, 2, 3] maps from crop coordinates to slice coordinates (both normalised to [-1, 1])."""
        c = self.config
        area = _uniform(generator, scale[0], scale[1], count)
        log_aspect = _uniform(generator, -c.max_aspect_change, c.max_aspect_change, count)
        half_w = torch.sqrt(area * torch.exp(log_aspect))  # half-extent in normalised units: side / 2 * 2
        half_h = torch.sqrt(area / torch.exp(log_aspect))
        angle = torch.deg2rad(_uniform(generator, -c.max_rotation_deg, c.max_rotation_deg, count))
        shear = _uniform(generator, -c.max_shear, c.max_shear, count)
        flip = torch.where(torch.rand(count, generator=generator, dtype=torch.float64) < c.flip_probability, -1.0, 1.0)
        # Crop centres: anywhere the crop stays (mostly) inside the slice.
        centre_x = _uniform(generator, -1, 1, count) * (1 - half_w).clamp(min=0)
        centre_y = _uniform(generator, -1, 1, count) * (1 - half_h).clamp(min=0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(count, 2, 3, dtype=torch.float64)
        # rotation @ shear @ diag(flip * half_w, half_h)
        theta[:, 0, 0] = cos * flip * half_w
        theta[:, 0, 1] = (cos * shear - sin) * half_h
        theta[:, 1, 0] = sin * flip * half_w
        theta[:, 1, 1] = (sin * shear + cos) * half_h
        theta[:, 0, 2] = centre_x
        theta[:, 1, 2] = centre_y
        return theta


def block_mask(rows: int, cols: int, ratio: float, generator: torch.Generator, min_block: int = 4,
               max_aspect: float = 3.0) -> Tensor:
    """iBOT block-wise masking: a bool [rows, cols] mask of about `ratio` of the patches, made of rectangles.

    Random rectangles (area from `min_block` patches up to what is still missing, log-uniform aspect) are
    added until the target count is reached; at least one patch is masked.
    """
    target = max(1, round(ratio * rows * cols))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for _ in range(100):
        missing = target - int(mask.sum())
        if missing <= 0:
            break
        area = float(_uniform(generator, min(min_block, missing), missing, 1))
        aspect = math.exp(float(_uniform(generator, -math.log(max_aspect), math.log(max_aspect), 1)))
        height = max(1, min(rows, round(math.sqrt(area * aspect))))
        width = max(1, min(cols, round(math.sqrt(area / aspect))))
        top = int(torch.randint(0, rows - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, cols - width + 1, (1,), generator=generator))
        mask[top:top + height, left:left + width] = True
    return mask
