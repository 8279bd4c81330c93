"""Synthetic brain slices on the fly, SynthSeg-style: a training data source next to the slice shards.

Brain MRI has a known remedy for scarce training data: render images from label maps with random contrasts,
deformations, resolutions, bias fields and noise, so a network sees far more appearances of the same anatomy
than any set of scans holds. The label maps here are the bundled templates (`BrainDINOLib/data`), on the
MNI152 1-mm grid:

- brain tissue: the MNI152 2009a CSF / grey / white-matter fractions (the one rule in `tissue.py`), kept soft
  so partial volume is real;
- brain regions: every intracranial voxel takes the nearest Colin27 AAL region, grouped into cortical lobes,
  cerebellum and the four deep grey nuclei (`REGIONS`), so each structure gets its own signal;
- head: the Colin27 head outside the MNI152 intracranial mask, in three classes by the Colin27 T1 signal
  (dark: bone and air; intermediate: muscle and skin; bright: fat and marrow), with a 3-mm dark rim
  (skull, dura) against the brain.

One slice (`SyntheticBrains.slice`): a contrast (T1-, T2-, FLAIR-, PD-like with each structure's signal
jittered, or fully random per structure); an oblique plane through the template (tilt, in-plane rotation,
anisotropic scaling, a smooth elastic displacement), with a random slice thickness; optionally skull-stripped;
signals mixed by the tissue fractions, a little texture, an acquisition resolution (blur, then down- and
up-sampling), a bias field and Rician noise. The image is then normalised as the engine's `SliceStack` does
(clip to the 0.5/99.5th percentiles of the foreground, z-score with its statistics), with the statistics of
the whole rendered volume, computed from the structures' volumes and signals, and framed as `SliceStack`
frames a head (a square box around the foreground with an 8-mm margin). Its tissue classes come with it.

Everything random comes from the `numpy.random.Generator` passed in: a slice is a pure function of its seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..atlas import COLIN27_AAL, COLIN27_T1, LOBES, MNI152_GM, MNI152_WM, aal_names
from ..slices import PreprocessConfig, foreground_mask
from ..synthetic import add_rician_noise, bias_field
from ..tissue import SIGNALS, TISSUES, tissue_fractions, tissue_labels
from ..volume import Volume
from .config import SyntheticConfig

CONTRASTS = (*SIGNALS, "random")  # T1, T2, FLAIR, PD-like and fully random; weights in SyntheticConfig

# Brain regions (AAL name prefixes) and how far each one's grey-matter signal lies towards white matter's:
# the deep nuclei are partly myelinated (the pallidum most), so they are brighter than cortex on T1.
REGIONS: dict[str, tuple[tuple[str, ...], float]] = {
    **{lobe: (prefixes, 0.0) for lobe, prefixes in LOBES.items() if lobe != "deep grey matter"},
    "caudate": (("Caudate",), 0.10),
    "putamen": (("Putamen",), 0.15),
    "pallidum": (("Pallidum",), 0.55),
    "thalamus": (("Thalamus",), 0.40),
}
HEAD_CLASSES = ("dark head tissue", "intermediate head tissue", "bright head tissue")
# Relative signal of the head classes per sequence (bone dark everywhere; fat bright on T1 and on fast T2).
HEAD_SIGNALS = {"T1": (0.03, 0.35, 0.95), "T2": (0.03, 0.30, 0.75), "FLAIR": (0.03, 0.30, 0.70),
                "PD": (0.05, 0.55, 0.90)}
RIM_MM = 3.0  # head tissue this close to the brain is the dark class (skull, dura)


@dataclass(frozen=True)
class Frame:
    """One foreground of the label maps (the whole head, or the brain alone for skull-stripped images) as
    `SliceStack` would see it: the slices it keeps, its in-plane extent, and the volume of every signal level.

    `masses[i]` is the volume (voxels) of the structure whose signal is level `level_index[i]` of the
    concatenated [CSF per region, GM per region, WM per region, head per class] signals.
    """

    slices: np.ndarray  # z indices that `SliceStack` keeps (enough foreground)
    rows: tuple[int, int]  # first, last + 1
    cols: tuple[int, int]
    masses: np.ndarray
    level_index: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray, regions: np.ndarray, fractions: np.ndarray) -> Frame:
        area = mask.sum(axis=(1, 2))
        rows, cols = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
        brain_region, head_class = _split_regions(regions[mask].astype(np.int64))
        count = len(REGIONS) + 1
        indices = [brain_region, count + brain_region, 2 * count + brain_region, 3 * count + head_class]
        total = 3 * count + len(HEAD_CLASSES)
        masses = sum(np.bincount(index, weights=f[mask], minlength=total) for index, f in zip(indices, fractions))
        present = np.flatnonzero(masses > 0)
        kept = np.flatnonzero(area >= PreprocessConfig().min_slice_foreground * area.max())
        return cls(kept, (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1), masses[present], present)

    def statistics(self, signals: dict[str, np.ndarray], percentiles: tuple[float, float]) -> tuple[float, ...]:
        """(low, high, mean, std): the percentile clip bounds, then the mean and std of the clipped foreground, of
        the volume these signals render, as `SliceStack` measures a volume (from structure volumes, exactly)."""
        levels = np.concatenate([signals["csf"][:1].repeat(len(REGIONS) + 1), signals["gm"], signals["wm"],
                                 signals["head"]])
        value = levels[self.level_index]
        order = np.argsort(value)
        cumulative = np.cumsum(self.masses[order]) / self.masses.sum()
        low = float(value[order][np.searchsorted(cumulative, percentiles[0] / 100)])
        high = float(value[order][min(np.searchsorted(cumulative, percentiles[1] / 100), len(order) - 1)])
        clipped = np.clip(value, low, high)
        mean = float((self.masses * clipped).sum() / self.masses.sum())
        std = math.sqrt(float((self.masses * (clipped - mean) ** 2).sum() / self.masses.sum())) or 1.0
        return low, high, mean, std


def _split_regions(regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region ids -> (brain region, 0 outside the brain; head class, 0 inside the brain)."""
    brain_region = np.where(regions <= len(REGIONS), regions, 0)
    return brain_region, np.clip(regions - len(REGIONS) - 1, 0, len(HEAD_CLASSES) - 1)


@dataclass(frozen=True)
class Anatomy:
    """The label maps, canonical LPS arrays on one isotropic grid of `spacing` mm.

    `fractions` [1, 4, Z, Y, X] float32: CSF, GM, WM and head tissue; `regions` [1, 1, Z, Y, X]: 0 air,
    1..len(REGIONS) brain regions, then the head classes; `brain`, `head`: the frames of a skull-stripped and
    of a whole-head image.
    """

    spacing: float
    fractions: torch.Tensor
    regions: torch.Tensor
    brain: Frame
    head: Frame

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.regions.shape[2:])


def _canonical(image: sitk.Image) -> np.ndarray:
    return Volume.from_image(image).array


@lru_cache(maxsize=2)
def load_anatomy(spacing: float = 1.0) -> Anatomy:
    """The bundled label maps at `spacing` mm (built once per process: about 10 s at 1 mm, 1 s at 2 mm)."""
    gm_image = sitk.ReadImage(str(MNI152_GM), sitk.sitkFloat32)
    size = [int(round(n * s / spacing)) for n, s in zip(gm_image.GetSize(), gm_image.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetOrigin(gm_image.GetOrigin()), grid.SetDirection(gm_image.GetDirection()), grid.SetSpacing([spacing] * 3)

    def on_grid(path, interpolator, pixel=sitk.sitkFloat32) -> np.ndarray:
        image = sitk.Resample(sitk.ReadImage(str(path), pixel), grid, sitk.Transform(), interpolator, 0.0, pixel)
        return _canonical(image)

    gm, wm = (on_grid(path, sitk.sitkLinear) / 255.0 for path in (MNI152_GM, MNI152_WM))
    fractions = tissue_fractions(gm, wm)
    brain = sum(fractions.values()) > 0  # the intracranial mask: CSF fills whatever GM and WM leave inside it
    aal = on_grid(COLIN27_AAL, sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    colin = on_grid(COLIN27_T1, sitk.sitkLinear)
    head = foreground_mask(Volume.from_image(sitk.GetImageFromArray(colin))) | brain

    # Brain regions: the nearest AAL region group of every intracranial voxel.
    names = aal_names()
    lookup = np.zeros(max(int(aal.max()), max(names)) + 1, np.uint8)
    for value, name in names.items():
        for number, (prefixes, _) in enumerate(REGIONS.values(), start=1):
            if name.startswith(prefixes):
                lookup[value] = number
    grouped = lookup[aal]
    nearest = ndimage.distance_transform_edt(grouped == 0, return_distances=False, return_indices=True)
    regions = np.where(brain, grouped[tuple(nearest)], 0).astype(np.uint8)

    # Head classes outside the brain: Colin27 T1 signal in three Otsu classes, a dark rim against the brain.
    outside = head & ~brain
    low, high = _otsu_thresholds(colin[outside])
    head_class = np.digitize(colin, [low, high])
    rim = ndimage.binary_dilation(brain, ndimage.generate_binary_structure(3, 1), iterations=round(RIM_MM / spacing))
    head_class[rim] = 0
    regions[outside] = len(REGIONS) + 1 + head_class[outside]
    stacked = np.stack([*(fractions[t] for t in TISSUES), outside.astype(np.float32)])
    # Channels last: the four fractions of a voxel sit together, which makes sampling a plane faster.
    fractions_tensor = torch.from_numpy(stacked)[None].contiguous(memory_format=torch.channels_last_3d)
    return Anatomy(spacing, fractions_tensor, torch.from_numpy(regions.astype(np.float32))[None, None],
                   Frame.of(brain, regions, stacked), Frame.of(head, regions, stacked))


def _otsu_thresholds(values: np.ndarray) -> tuple[float, float]:
    """Two Otsu thresholds splitting `values` into three classes."""
    image = sitk.GetImageFromArray(values.astype(np.float32)[None, None])
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(2)
    otsu.Execute(image)
    low, high = otsu.GetThresholds()
    return float(low), float(high)


@dataclass
class SyntheticSlice:
    """One generated slice: `image` [1, S, S] float32 (normalised as `SliceStack` does), `tissue` [S, S] uint8
    (0 background, 1 CSF, 2 GM, 3 WM, argmax of the fractions at the plane), `regions` [S, S] uint8, the
    `contrast` it was rendered with, and `raw` [S, S] (the signal before normalisation, 0 = no signal)."""

    image: torch.Tensor
    tissue: np.ndarray
    regions: np.ndarray
    contrast: str
    raw: np.ndarray


class SyntheticBrains:
    """`SyntheticBrains(config, image_size).slice(rng)`: a random synthetic axial slice (see the module doc)."""

    def __init__(self, config: SyntheticConfig, image_size: int, preprocessing: PreprocessConfig | None = None):
        if len(config.contrast_weights) != len(CONTRASTS) or sum(config.contrast_weights) <= 0:
            raise ValueError(f"synthetic.contrast_weights needs {len(CONTRASTS)} weights ({', '.join(CONTRASTS)}) "
                             "with a positive sum")
        self.config, self.image_size = config, image_size
        self.preprocessing = preprocessing or PreprocessConfig()
        self.contrast_p = np.asarray(config.contrast_weights, float) / sum(config.contrast_weights)

    @property
    def anatomy(self) -> Anatomy:
        return load_anatomy(self.config.spacing_mm)

    def slice(self, rng: np.random.Generator) -> SyntheticSlice:
        c, anatomy = self.config, self.anatomy
        contrast = CONTRASTS[rng.choice(len(CONTRASTS), p=self.contrast_p)]
        signals = self._signals(contrast, rng)
        stripped = rng.random() < c.skull_strip_probability
        if stripped:
            signals["head"][:] = 0.0
        frame = anatomy.brain if stripped else anatomy.head
        low_resolution = rng.random() < c.low_resolution_probability
        fractions, regions, pixel_mm = self._plane(frame, low_resolution, rng)
        raw = self._render(fractions, regions, signals, pixel_mm, low_resolution, rng)
        low, high, mean, std = frame.statistics(signals, self.preprocessing.clip_percentiles)
        image = (np.clip(raw, low, high) - mean) / std
        return SyntheticSlice(torch.from_numpy(image.astype(np.float32))[None], tissue_labels(*fractions[:3]),
                              regions.astype(np.uint8), contrast, raw)

    # ---- contrast ----------------------------------------------------------------------------------------

    def _signals(self, contrast: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Per-region signals: "csf" [1], "gm" and "wm" [regions + 1], "head" [3] (relative units, 0..~1).

        Grey matter has one signal per region; white matter two, cerebral and cerebellar (white matter has no
        lobe boundaries)."""
        count = len(REGIONS) + 1  # index 0 (air) is never brain
        cerebellum = np.arange(count) == list(REGIONS).index("cerebellum") + 1
        if contrast == "random":  # SynthSeg: every structure its own uniform intensity
            cerebral_wm, cerebellar_wm = rng.uniform(0, 1, 2)
            return {"csf": rng.uniform(0, 1, 1), "gm": rng.uniform(0, 1, count),
                    "wm": np.where(cerebellum, cerebellar_wm, cerebral_wm),
                    "head": rng.uniform(0, 1, len(HEAD_CLASSES))}
        base = SIGNALS[contrast]
        towards_wm = np.array([0.0, *(mix for _, mix in REGIONS.values())])
        jitter = lambda n: 1 + rng.uniform(-self.config.structure_jitter, self.config.structure_jitter, n)
        gm = (base["gm"] + towards_wm * (base["wm"] - base["gm"])) * jitter(count)
        cerebral_wm, cerebellar_wm = base["wm"] * jitter(2)
        return {"csf": base["csf"] * jitter(1), "gm": gm, "wm": np.where(cerebellum, cerebellar_wm, cerebral_wm),
                "head": np.asarray(HEAD_SIGNALS[contrast]) * jitter(len(HEAD_CLASSES))}

    # ---- geometry ------------------------------------------------------------------------------------------

    def _plane(self, frame: Frame, low_resolution: bool,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
        """Fractions [4, S, S], regions [S, S] and the pixel size (mm) of a random oblique plane, framed as
        `SliceStack` frames the foreground."""
        c, anatomy, size = self.config, self.anatomy, self.image_size
        (row0, row1), (col0, col1) = frame.rows, frame.cols
        centre = np.array([rng.choice(frame.slices) + rng.uniform(-0.5, 0.5), (row0 + row1 - 1) / 2,
                           (col0 + col1 - 1) / 2])  # voxels (z, y, x)
        side_mm = max(row1 - row0, col1 - col0) * anatomy.spacing + 2 * self.preprocessing.margin_mm

        pixel = side_mm / size
        offsets = (np.arange(size) + 0.5 - size / 2) * pixel
        v, u = np.meshgrid(offsets, offsets, indexing="ij")  # v along rows (y), u along columns (x), mm
        scale = 1 + rng.uniform(-c.scaling, c.scaling, 2)
        thickness = rng.uniform(1.0, c.max_spacing_mm) if low_resolution else 1.0
        depths = np.linspace(-thickness / 3, thickness / 3, 3) if thickness > 2 else np.zeros(1)
        rotation = _rotation(np.deg2rad(rng.uniform(-c.tilt_deg, c.tilt_deg, 2)),
                             np.deg2rad(rng.uniform(-c.rotation_deg, c.rotation_deg)))
        elastic = _smooth_displacement(size, rng) * c.elastic_mm  # [3 (z, y, x), S, S] mm
        points = []
        for depth in depths:
            local = np.stack([np.full_like(u, depth), v * scale[0], u * scale[1]])  # (z, y, x) mm in the plane
            points.append(np.einsum("ij,jrc->irc", rotation, local) + elastic)
        mm = np.stack(points)  # [depths, 3, S, S]
        voxels = centre[None, :, None, None] + mm / anatomy.spacing
        fractions = _sample(anatomy.fractions, voxels, anatomy.shape, "bilinear").mean(axis=1)
        regions = _sample(anatomy.regions, voxels[len(depths) // 2:len(depths) // 2 + 1], anatomy.shape, "nearest")
        return fractions, regions[0, 0], pixel

    # ---- rendering -----------------------------------------------------------------------------------------

    def _render(self, fractions: np.ndarray, regions: np.ndarray, signals: dict[str, np.ndarray], pixel_mm: float,
                low_resolution: bool, rng: np.random.Generator) -> np.ndarray:
        """Signals mixed by fractions, texture, resolution, bias field, Rician noise: a raw image [S, S]."""
        c = self.config
        brain_region, head_class = _split_regions(regions.astype(np.int64))
        image = (fractions[0] * signals["csf"][0] + fractions[1] * signals["gm"][brain_region]
                 + fractions[2] * signals["wm"][brain_region] + fractions[3] * signals["head"][head_class])
        peak = max(float(image.max()), 1e-6)
        image = image * (1 + c.texture * rng.standard_normal(image.shape))
        image = self._resolution(image, pixel_mm, rng) if low_resolution else ndimage.gaussian_filter(image, 0.5)
        # A bias field varies over the whole head: a few control points per axis (a 1/8-size field, upsampled).
        coarse = bias_field((image.shape[0] // 8, image.shape[1] // 8), rng, rng.uniform(0, c.bias))
        image = image * ndimage.zoom(coarse, [n / m for n, m in zip(image.shape, coarse.shape)], order=1)
        return add_rician_noise(image, rng, rng.uniform(*c.noise) * peak).astype(np.float32)

    def _resolution(self, image: np.ndarray, pixel_mm: float, rng: np.random.Generator) -> np.ndarray:
        """An acquisition's in-plane resolution: blur to each axis' voxel size, sample there, interpolate back."""
        c, size = self.config, image.shape[0]
        spacing = np.array([rng.uniform(1.0, c.max_spacing_mm), rng.uniform(1.0, 1.5)])[rng.permutation(2)]
        factors = np.maximum(spacing / pixel_mm, 1.0)
        blurred = ndimage.gaussian_filter(image, 0.42 * factors)  # FWHM = the voxel size
        small = ndimage.zoom(blurred, 1 / factors, order=1)
        return ndimage.zoom(small, [size / n for n in small.shape], order=1)[:size, :size]


def _rotation(tilt: np.ndarray, spin: float) -> np.ndarray:
    """3x3 rotation in (z, y, x) voxel axes: tilts about the x and y axes, then a spin about z."""
    a, b = tilt
    about_x = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_y = np.array([[math.cos(b), 0, -math.sin(b)], [0, 1, 0], [math.sin(b), 0, math.cos(b)]])
    about_z = np.array([[1, 0, 0], [0, math.cos(spin), -math.sin(spin)], [0, math.sin(spin), math.cos(spin)]])
    return about_x @ about_y @ about_z


def _smooth_displacement(size: int, rng: np.random.Generator, control: int = 6) -> np.ndarray:
    """A smooth random displacement [3, S, S] with unit std per component: Gaussian control points, interpolated."""
    coarse = torch.from_numpy(rng.standard_normal((1, 3, control, control)))
    field = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0].numpy()
    return field / (field.std(axis=(1, 2), keepdims=True) + 1e-8)


def _sample(volume: torch.Tensor, voxels: np.ndarray, shape: tuple[int, int, int], mode: str) -> np.ndarray:
    """`volume` [1, C, Z, Y, X] at voxel coordinates [D, 3 (z, y, x), S, S] -> [C, D, S, S] (zero outside)."""
    extent = np.asarray(shape, float)[None, :, None, None] - 1
    normalised = 2 * voxels / extent - 1  # align_corners=True
    grid = torch.from_numpy(normalised[:, ::-1].transpose(0, 2, 3, 1).copy()).float()[None]  # (x, y, z) last
    sampled = F.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return sampled[0].numpy()
