"""Multi-crop views of MRI slices for self-distillation: 2 global crops and N local crops, a whole batch at once.

Two halves, so that the augmentation can run wherever the training runs:

- `MultiCrop.draw` (CPU, in the loader): every random number of a step's crops, drawn from the step's
  `torch.Generator` into a `ViewParameters` of small tensors;
- `MultiCrop.render` (any device): the crops as batched tensor ops on the step's slices. Geometry (crop
  scale and aspect, left-right flip, small rotation and shear) is one `affine_grid` + `grid_sample` per
  crop size, so each crop is interpolated once; then gamma, a Legendre-polynomial bias field, contrast
  around the mean, Gaussian blur (a grouped convolution with each crop's own kernel) and Gaussian noise.
  There is no colour jitter: MRI is grey, and its contrast carries the anatomy.

The noise is counter-based: element i of a crop whose key is k gets a normal deviate from a hash of (k, i),
computed in 32-bit integer arithmetic, so the same parameters give the same crops on the CPU and on a GPU (up
to float rounding) and a view is a pure function of the slice and the step's seed: resume stays exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import CropConfig

BIAS_DEGREE = 3  # Legendre polynomials up to this total degree, without the constant
BIAS_TERMS = sum(1 for i in range(BIAS_DEGREE + 1) for j in range(BIAS_DEGREE + 1) if 1 <= i + j <= BIAS_DEGREE)
_MASK32 = 0xFFFFFFFF


def _uniform(generator: torch.Generator, low: float, high: float, count: int) -> Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


def _chosen(generator: torch.Generator, probability: float, count: int) -> Tensor:
    return torch.rand(count, generator=generator, dtype=torch.float64) < probability


def _sometimes(generator: torch.Generator, probability: float, value_range: tuple[float, float], count: int,
               off: float) -> Tensor:
    """Per crop: with `probability` a uniform value in `value_range`, else `off`."""
    chosen = _chosen(generator, probability, count)
    return torch.where(chosen, _uniform(generator, *value_range, count), off)


@dataclass
class CropParameters:
    """Everything random about `N` crops of one size. Identity values switch a step off for a crop."""

    source: Tensor  # [N] int64: the batch slice each crop is cut from
    theta: Tensor  # [N, 2, 3] float32: crop -> slice affine in normalised coordinates
    gamma: Tensor  # [N] float32 (1: off)
    bias: Tensor  # [N, BIAS_TERMS] float32 Legendre coefficients of the log bias field (0: off)
    contrast: Tensor  # [N] float32 factor around the crop mean (1: off)
    blur_sigma: Tensor  # [N] float32, output pixels (0: off)
    noise_std: Tensor  # [N] float32 (0: off)
    noise_key: Tensor  # [N] int64 keys of the counter-based noise

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropParameters:
        return CropParameters(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    def pin_memory(self) -> CropParameters:
        return CropParameters(*(getattr(self, f.name).pin_memory() for f in fields(self)))


@dataclass
class ViewParameters:
    """The parameters of a step's global and local crops."""

    globals_: CropParameters
    locals_: CropParameters

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewParameters:
        return ViewParameters(self.globals_.to(device, non_blocking), self.locals_.to(device, non_blocking))

    def pin_memory(self) -> ViewParameters:
        return ViewParameters(self.globals_.pin_memory(), self.locals_.pin_memory())


class MultiCrop:
    """`draw(B, generator)` -> parameters; `render(slices [B, 1, H, W], parameters)` -> (globals [2B, 1, G, G],
    locals [N B, 1, L, L]), view-major (all first views, then all second views, ...)."""

    def __init__(self, config: CropConfig):
        self.config = config
        self.blur_radius = max(1, math.ceil(3 * config.blur_sigma[1]))

    def draw(self, slices: int, generator: torch.Generator) -> ViewParameters:
        c = self.config
        return ViewParameters(self._draw(slices, 2, c.global_scale, generator),
                              self._draw(slices, c.local_count, c.local_scale, generator))

    def render(self, slices: Tensor, parameters: ViewParameters) -> tuple[Tensor, Tensor]:
        c = self.config
        return (self._render(slices, parameters.globals_, c.global_size),
                self._render(slices, parameters.locals_, c.local_size))

    # ---- drawing (CPU) -----------------------------------------------------------------------------------

    def _draw(self, slices: int, views: int, scale: tuple[float, float], generator: torch.Generator) -> CropParameters:
        c, count = self.config, slices * views
        theta = self._affines(count, scale, generator)
        gamma = _sometimes(generator, c.gamma_probability, c.gamma_range, count, 1.0)
        signs = torch.where(torch.rand(count, BIAS_TERMS, generator=generator) < 0.5, -1.0, 1.0)
        magnitudes = _uniform(generator, *c.bias_field_coefficients, count * BIAS_TERMS).view(count, -1)
        bias = signs * magnitudes * _chosen(generator, c.bias_field_probability, count)[:, None]
        contrast = _sometimes(generator, c.contrast_probability, c.contrast_range, count, 1.0)
        blur = _sometimes(generator, c.blur_probability, c.blur_sigma, count, 0.0)
        noise = _sometimes(generator, c.noise_probability, (0.0, c.noise_std), count, 0.0)
        keys = torch.randint(0, 2**62, (count,), generator=generator)
        return CropParameters(torch.arange(slices).repeat(views), theta.float(), gamma.float(), bias.float(),
                              contrast.float(), blur.float(), noise.float(), keys)

    def _affines(self, count: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
        """[count, 2, 3] maps from crop coordinates to slice coordinates (both normalised to [-1, 1])."""
        c = self.config
        area = _uniform(generator, scale[0], scale[1], count)
        log_aspect = _uniform(generator, -c.max_aspect_change, c.max_aspect_change, count)
        half_w = torch.sqrt(area * torch.exp(log_aspect))  # half-extent in normalised units: side / 2 * 2
        half_h = torch.sqrt(area / torch.exp(log_aspect))
        angle = torch.deg2rad(_uniform(generator, -c.max_rotation_deg, c.max_rotation_deg, count))
        shear = _uniform(generator, -c.max_shear, c.max_shear, count)
        flip = torch.where(_chosen(generator, c.flip_probability, count), -1.0, 1.0)
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

    # ---- rendering (any device) ----------------------------------------------------------------------------

    def _render(self, slices: Tensor, p: CropParameters, size: int) -> Tensor:
        count = len(p.source)
        if count == 0:
            return slices.new_zeros((0, 1, size, size))
        background = slices.amin(dim=(1, 2, 3))[p.source].view(-1, 1, 1, 1)
        grid = F.affine_grid(p.theta, [count, 1, size, size], align_corners=False)
        # Sample (slice - background) with zero padding, so space outside the slice reads as background.
        crops = F.grid_sample(slices[p.source] - background, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)
        crops = _where_on(p.gamma != 1, crops, lambda x, i: adjust_gamma(x, p.gamma[i]))
        crops = _where_on(p.bias.abs().sum(dim=1) > 0, crops, lambda x, i: x * bias_fields(p.bias[i], size))
        crops = _where_on(p.contrast != 1, crops, lambda x, i: scale_contrast(x, p.contrast[i]))
        crops = _where_on(p.blur_sigma > 0, crops, lambda x, i: gaussian_blur(x, p.blur_sigma[i], self.blur_radius))
        crops = _where_on(p.noise_std > 0, crops,
                          lambda x, i: x + p.noise_std[i].view(-1, 1, 1, 1) * hashed_normal(p.noise_key[i], size))
        return crops + background


def _where_on(selected: Tensor, crops: Tensor, change) -> Tensor:
    """`crops` with `change(crops[i], i)` written (in place) into the selected crops i; the others untouched."""
    index = selected.nonzero().flatten()
    if len(index):
        crops[index] = change(crops[index], index)
    return crops


def adjust_gamma(crops: Tensor, gamma: Tensor) -> Tensor:
    """Each crop's intensities mapped through x^gamma on its own [min, max] (as MONAI's RandAdjustContrast)."""
    low = crops.amin(dim=(1, 2, 3), keepdim=True)
    span = crops.amax(dim=(1, 2, 3), keepdim=True) - low
    return ((crops - low) / (span + 1e-7)).pow(gamma.view(-1, 1, 1, 1)) * span + low


def bias_fields(coefficients: Tensor, size: int) -> Tensor:
    """Multiplicative fields exp(sum_k c_k P_i(x) P_j(y)) [N, 1, S, S] over Legendre products of degree
    1..BIAS_DEGREE (MONAI's RandBiasField, with signed coefficients)."""
    return torch.exp(torch.einsum("nk,khw->nhw", coefficients, legendre_basis(size, coefficients.device)))[:, None]


def legendre_basis(size: int, device: torch.device) -> Tensor:
    """[BIAS_TERMS, S, S]: P_i(y) P_j(x) for 1 <= i + j <= BIAS_DEGREE on pixel centres in [-1, 1]."""
    t = torch.linspace(-1, 1, size, device=device)
    p = [torch.ones_like(t), t, (3 * t**2 - 1) / 2, (5 * t**3 - 3 * t) / 2]
    return torch.stack([p[i][:, None] * p[j][None, :] for i in range(BIAS_DEGREE + 1) for j in range(BIAS_DEGREE + 1)
                        if 1 <= i + j <= BIAS_DEGREE])


def scale_contrast(crops: Tensor, factor: Tensor) -> Tensor:
    """(x - mean) * factor + mean per crop (MONAI's RandScaleIntensityFixedMean)."""
    mean = crops.mean(dim=(1, 2, 3), keepdim=True)
    return (crops - mean) * factor.view(-1, 1, 1, 1) + mean


def gaussian_blur(crops: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Each crop blurred with its own Gaussian (separable, one grouped convolution per axis, edges replicated)."""
    offsets = torch.arange(-radius, radius + 1, device=crops.device, dtype=crops.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma[:, None].clamp(min=1e-3)) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    count = len(crops)
    x = F.pad(crops.transpose(0, 1), (radius, radius, radius, radius), mode="replicate")  # [1, N, H, W]
    x = F.conv2d(x, kernels.view(count, 1, -1, 1), groups=count)
    x = F.conv2d(x, kernels.view(count, 1, 1, -1), groups=count)
    return x.transpose(0, 1)


def _mul32_(x: Tensor, constant: int, scratch: Tensor) -> Tensor:
    """x <- (x * constant) mod 2^32, in place, for 0 <= x < 2^32 without int64 overflow (the constant is split
    into 16-bit halves); `scratch` is a work tensor of x's shape."""
    torch.mul(x, constant >> 16, out=scratch)
    scratch.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(constant & 0xFFFF).add_(scratch).bitwise_and_(_MASK32)


def _hash32_(x: Tensor, scratch: Tensor) -> Tensor:
    """x <- a 32-bit integer mix of x, in place (Wellons' lowbias32: every input bit flips about half the
    output bits)."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x7FEB352D, scratch)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, 0x846CA68B, scratch)
    return x.bitwise_xor_(x >> 16)


def hashed_normal(keys: Tensor, size: int) -> Tensor:
    """Standard normal noise [N, 1, S, S] as a pure function of each crop's int64 key and the pixel index
    (Box-Muller on two hashed 24-bit uniforms): the same numbers on every device."""
    index = torch.arange(size * size, device=keys.device, dtype=torch.int64)[None]
    low, high = (keys & _MASK32)[:, None], ((keys >> 32) & _MASK32)[:, None]
    uniforms = []
    for offset in (0, 1):  # hash(hash((2 i + offset) ^ low) ^ high)
        x = (2 * index + offset) ^ low
        scratch = torch.empty_like(x)
        _hash32_(_hash32_(x, scratch).bitwise_xor_(high), scratch)
        uniforms.append((x >> 8).float() / 2**24)
    u1, u2 = uniforms[0] + 0.5 / 2**24, uniforms[1]
    normal = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return normal.view(-1, 1, size, size)


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
