"""How finely a volume is embedded, in physical units: `ResolutionPolicy`.

A ViT sees a slice as a grid of patches. What a user sees in a map is as fine as those patches are in
millimetres, so the policy is stated physically: `patch_mm` is the in-plane size of one patch, from which the
model input size follows for each volume's field of view (the crop box around the head), and
`slice_step_mm` is the distance between embedded axial slices (never finer than the voxel slices). Features
between embedded slices are interpolated in 3-D, and maps are upsampled to the voxels guided by the image
(`upsample.py`), so every map and head gets sub-patch detail without materialising features per voxel.

The defaults depend on the device (finer on a GPU, coarser on a CPU), and the policy that was used travels
with the features (part of the cache key and of every features file). `LEGACY` is the behaviour before
physical resolution: a fixed 224-px input for every axial slice and plain bilinear upsampling.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .errors import BrainDINOError

UPSAMPLING_METHODS = ("guided", "bilinear")


@dataclass(frozen=True)
class ResolutionPolicy:
    """How finely to embed: in-plane patch size and slice step in mm, upsampling method, shift ensemble.

    `image_size` (pixels), when set, fixes the model input size instead of deriving it from `patch_mm`
    (the old behaviour). `slice_step_mm` of None follows the in-plane patch size; 0 embeds every slice.
    `shifts` = N embeds each slice N x N times, shifted by 1/N of a patch, and interleaves the tokens into
    a grid N times finer (N^2 the cost: for GPUs).
    """

    patch_mm: float = 5.0
    slice_step_mm: float | None = None
    image_size: int | None = None
    upsampling: str = "guided"
    shifts: int = 1

    def __post_init__(self) -> None:
        if self.image_size is None and not (self.patch_mm > 0 and math.isfinite(self.patch_mm)):
            raise BrainDINOError(f"patch size {self.patch_mm}", "must be a positive number of millimetres")
        if self.image_size is not None and self.image_size < 1:
            raise BrainDINOError(f"image size {self.image_size}", "must be a positive number of pixels")
        if self.slice_step_mm is not None and not (self.slice_step_mm >= 0 and math.isfinite(self.slice_step_mm)):
            raise BrainDINOError(f"slice step {self.slice_step_mm}", "must be a non-negative number of millimetres")
        if self.upsampling not in UPSAMPLING_METHODS:
            raise BrainDINOError(f"upsampling {self.upsampling!r}", f"is unknown; use {', '.join(UPSAMPLING_METHODS)}")
        if self.shifts < 1:
            raise BrainDINOError(f"shifts {self.shifts}", "must be at least 1")
        if self.shifts > 1 and self.image_size is not None:
            raise BrainDINOError(f"shifts {self.shifts}", "need a resolution in millimetres (patch_mm), not a fixed "
                                                          "image size")

    @property
    def step_mm(self) -> float:
        """Distance between embedded slices in mm (0: every slice)."""
        if self.slice_step_mm is not None:
            return self.slice_step_mm
        return 0.0 if self.image_size is not None else self.patch_mm

    def slice_step(self, slice_spacing_mm: float) -> int:
        """Embed every n-th voxel slice: the step in mm rounded to whole slices, at least 1."""
        return max(1, round(self.step_mm / slice_spacing_mm))

    def describe(self) -> str:
        inplane = f"{self.image_size} px input" if self.image_size else f"{self.patch_mm:g} mm patches"
        step = "every slice" if self.step_mm == 0 else f"slices every {self.step_mm:g} mm"
        shifts = f", {self.shifts}x{self.shifts} shift ensemble" if self.shifts > 1 else ""
        return f"{inplane}, {step}, {self.upsampling} upsampling{shifts}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ResolutionPolicy:
        return cls(**data)

    def at_least_as_fine_as(self, other: ResolutionPolicy) -> bool:
        """Whether features under this policy can serve a request for `other` (same method, finer or equal)."""
        if self.upsampling != other.upsampling or (self.image_size is None) != (other.image_size is None):
            return False
        if self.image_size is not None:
            finer_inplane = self.image_size >= other.image_size
        else:
            finer_inplane = self.patch_mm <= other.patch_mm
        return finer_inplane and self.step_mm <= other.step_mm and self.shifts >= other.shifts


LEGACY = ResolutionPolicy(image_size=224, upsampling="bilinear")
# Defaults per device type: finer where compute is cheap. Chosen with benchmarks/resolution.py.
DEFAULTS = {
    "cpu": ResolutionPolicy(patch_mm=6.0),
    "mps": ResolutionPolicy(patch_mm=4.0),
    "cuda": ResolutionPolicy(patch_mm=3.0),
}
PRESETS = {"legacy": LEGACY, "fine": ResolutionPolicy(patch_mm=3.0), **DEFAULTS}


def default_policy(device_type: str) -> ResolutionPolicy:
    """The default resolution for a device type ("cpu", "cuda", "mps"; others get the CPU's)."""
    return DEFAULTS.get(device_type, DEFAULTS["cpu"])


def with_overrides(policy: ResolutionPolicy, **changes) -> ResolutionPolicy:
    """`policy` with the given fields replaced (None values are ignored)."""
    return replace(policy, **{k: v for k, v in changes.items() if v is not None})
