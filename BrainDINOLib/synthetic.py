"""A documented generator of labelled brain-MRI cases from the real templates bundled in BrainDINOLib/data.

There is no labelled clinical cohort here, so heads are tested and benchmarked on cases generated from real
anatomy, with every target computed, never drawn by hand:

- Anatomy: the MNI152 2009a tissue fractions (CSF, grey and white matter by the rule in `tissue.py`) and the
  Colin27 single-subject T1 with its AAL parcellation.
- Per case, one random spatial transform (rotation, anisotropic scaling, translation, and a smooth elastic
  displacement from smoothed random control points) is applied to the image and its labels alike.
- Lesions: a tumour-like core with surrounding oedema (irregular nested ellipsoids, radius 3-15 mm,
  centred in white matter) replace the tissue they cover.
- Simulated atrophy: a fraction `a` of grey matter becomes CSF (partial-volume thinning of the cortex).
- Contrast rendering: an image is the tissue fractions times per-tissue signals of a T1-, T2-,
  FLAIR- or PD-like sequence (`tissue.SIGNALS`, each jittered per case), smoothed by a small point-spread
  function, multiplied by a smooth random bias field, with Rician noise. Colin27 cases keep the real T1
  and get a random gamma curve, bias field and noise.
- Survival: the time to event is exponential with a hazard growing with lesion volume,
  `h = h0 * exp(beta * (V - 20 ml) / 15 ml)`; an independent uniform censoring time hides some events.

Tasks (`TASKS`): `tissue` (segment background/CSF/GM/WM), `lobes` (segment AAL merged into lobes),
`aal` (all 116 AAL regions), `lesion` (segment oedema = 1, core = 2), `sequence` (classify T1/T2/FLAIR/PD),
`atrophy` (regress the atrophy fraction), `survival` (lesion cases with time and event).

Every case draws its own random numbers from `SeedSequence([seed, task, index])`, so cases are
reproducible one by one and distinct; `make_cases` writes training and test cases with disjoint indices
and checks that no two images are identical. All cases share the template's anatomy: the variation
between cases is synthetic (deformation, lesions, contrast), which is what these tests can honestly show.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .atlas import COLIN27_AAL, COLIN27_T1, LOBES, MNI152_GM, MNI152_WM, aal_names, merge_aal_into_lobes
from .atomic import write_text_atomic
from .errors import BrainDINOError
from .tissue import CLASS_NAMES, SIGNALS, TISSUES, tissue_fractions, tissue_labels
from .volume import Volume, write_volume

log = logging.getLogger(__name__)

TASKS = ("tissue", "lobes", "aal", "lesion", "sequence", "atrophy", "survival")
SEQUENCES = tuple(SIGNALS)
LESION_CLASSES = ("background", "oedema", "core")
RENDERED = (*TISSUES, "oedema", "core")  # the fractions a case may hold, in the order of their signals


@dataclass(frozen=True)
class CaseConfig:
    """How strongly cases vary. Defaults give realistic but clearly different cases."""

    spacing_mm: float = 2.0
    rotation_deg: float = 8.0
    scaling: float = 0.06  # relative, per axis
    translation_mm: float = 5.0
    elastic_mm: float = 2.5  # std of the elastic control-point displacements
    bias: float = 0.25  # amplitude of the log bias field
    noise: float = 0.03  # noise std relative to the brightest tissue
    contrast_jitter: float = 0.08  # relative jitter of each tissue intensity
    lesion_radius_mm: tuple[float, float] = (3.0, 15.0)
    atrophy_range: tuple[float, float] = (0.0, 0.8)
    baseline_hazard: float = 0.05  # events per time unit at a 20 ml lesion
    hazard_beta: float = 1.0
    max_censoring: float = 40.0


@dataclass
class Case:
    """One generated case: images per sequence (canonical `Volume`s), a label map if any, and targets."""

    case_id: str
    images: dict[str, Volume]
    labels: Volume | None = None
    targets: dict[str, float | str | int] = field(default_factory=dict)


# ---- templates -------------------------------------------------------------------------------------------

def _read(path: Path) -> sitk.Image:
    if not path.exists():
        raise BrainDINOError(path, "bundled template missing (see BrainDINOLib/data/README.md for where it comes from)")
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


def _downsample(image: sitk.Image, spacing: float, interpolator: int) -> sitk.Image:
    size = [int(round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), [spacing] * 3,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


@lru_cache(maxsize=4)
def mni_tissue(spacing: float) -> dict[str, sitk.Image]:
    """MNI152 2009a fractions of CSF, GM and WM (`tissue.tissue_fractions`), at `spacing` mm."""
    gm = _read(MNI152_GM)
    fractions = tissue_fractions(sitk.GetArrayFromImage(gm) / 255.0, sitk.GetArrayFromImage(_read(MNI152_WM)) / 255.0)
    out = {}
    for name in TISSUES:
        image = sitk.GetImageFromArray(fractions[name])
        image.CopyInformation(gm)
        out[name] = _downsample(image, spacing, sitk.sitkLinear)
    return out


@lru_cache(maxsize=4)
def colin27(spacing: float) -> tuple[sitk.Image, sitk.Image]:
    """Colin27 T1 (with skull) and its AAL labels at `spacing` mm."""
    t1 = _read(COLIN27_T1)
    aal = _read(COLIN27_AAL)
    return _downsample(t1, spacing, sitk.sitkLinear), _downsample(aal, spacing, sitk.sitkNearestNeighbor)


# ---- random spatial and intensity changes -----------------------------------------------------------------

def random_warp(shape: tuple[int, int, int], rng: np.random.Generator, config: CaseConfig) -> np.ndarray:
    """Sampling coordinates [3, *shape] (voxel indices) of one random spatial transform: a rotation and
    anisotropic scaling about the volume centre, a translation, plus a smooth elastic displacement
    (smoothed Gaussian control-point displacements on a coarse grid, interpolated linearly)."""
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, np.float32) - 1) / 2
    angles = rng.uniform(-config.rotation_deg, config.rotation_deg, 3)
    matrix = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    matrix = matrix @ np.diag(1 + rng.uniform(-config.scaling, config.scaling, 3))
    shift = rng.uniform(-config.translation_mm, config.translation_mm, 3) / config.spacing_mm
    offset = (centre - matrix @ centre + shift).astype(np.float32)
    coords = np.einsum("ij,j...->i...", matrix.astype(np.float32), grid) + offset[:, None, None, None]
    coarse = tuple(max(2, n // 10) for n in shape)
    for axis in range(3):
        control = ndimage.gaussian_filter(rng.normal(size=coarse), 1.0)
        control *= config.elastic_mm / config.spacing_mm / (control.std() + 1e-8)
        coords[axis] += ndimage.zoom(control, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True,
                                     mode="nearest")
    return coords


def warp(array: np.ndarray, coords: np.ndarray, labels: bool = False) -> np.ndarray:
    """Resample `array` at `coords` (linear; nearest for label maps), zero outside."""
    return ndimage.map_coordinates(array, coords, order=0 if labels else 1, mode="constant", cval=0.0)


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, scale_voxels: float) -> np.ndarray:
    """A smooth random field with zero mean and unit std (Gaussian-filtered white noise)."""
    field_ = ndimage.gaussian_filter(rng.normal(size=shape), scale_voxels)
    return (field_ - field_.mean()) / (field_.std() + 1e-8)


def bias_field(shape: tuple[int, ...], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A multiplicative, slowly varying intensity non-uniformity: exp(amplitude * smooth field)."""
    coarse = tuple(max(2, n // 8) for n in shape)
    small = _smooth_field(coarse, rng, 1.5)
    return np.exp(amplitude * ndimage.zoom(small, [n / c for n, c in zip(shape, coarse)], order=1))


def add_rician_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise (the noise of magnitude MRI)."""
    return np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)


# ---- content -----------------------------------------------------------------------------------------------

def insert_lesion(fractions: dict[str, np.ndarray], rng: np.random.Generator, spacing: float,
                  radius_mm: float) -> np.ndarray:
    """Put a core + oedema lesion in white matter; update `fractions` in place; return labels (1 oedema, 2 core)."""
    wm = fractions["wm"]
    candidates = np.argwhere(wm > 0.9)
    centre = candidates[rng.integers(len(candidates))]
    grid = np.indices(wm.shape).astype(np.float32)
    axes = radius_mm / spacing * rng.uniform(0.75, 1.25, 3)  # an ellipsoid, in voxels
    distance = np.sqrt(sum(((grid[a] - centre[a]) / axes[a]) ** 2 for a in range(3)))
    distance *= 1 + 0.15 * _smooth_field(wm.shape, rng, 3.0)  # irregular outline
    brain = (fractions["csf"] + fractions["gm"] + wm) > 0.5
    core = (distance < 1.0) & brain
    oedema = (distance < rng.uniform(1.6, 2.3)) & brain & ~core
    for name in TISSUES:
        fractions[name] = np.where(core | oedema, 0.0, fractions[name])
    fractions["core"], fractions["oedema"] = core.astype(np.float32), oedema.astype(np.float32)
    labels = np.zeros(wm.shape, np.uint8)
    labels[oedema], labels[core] = 1, 2
    return labels


def render(fractions: dict[str, np.ndarray], sequence: str, rng: np.random.Generator, config: CaseConfig) -> np.ndarray:
    """A `sequence`-like image from tissue fractions (see module docstring), scaled to 0..~1000."""
    levels = np.array([SIGNALS[sequence][name] for name in RENDERED])
    levels *= 1 + rng.uniform(-config.contrast_jitter, config.contrast_jitter, len(levels))
    image = np.zeros_like(fractions["wm"])
    for level, name in zip(levels, RENDERED):
        if name in fractions:
            image += level * fractions[name]
    image = ndimage.gaussian_filter(image, 0.5)
    image *= bias_field(image.shape, rng, config.bias)
    image = add_rician_noise(image, rng, config.noise * levels.max())
    return (1000 * image).astype(np.float32)


def _volume(array: np.ndarray, reference: sitk.Image, name: str) -> Volume:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return Volume.from_image(image, source=name)


def generate_case(task: str, index: int, seed: int = 0, config: CaseConfig = CaseConfig(),
                  sequences: tuple[str, ...] | None = None) -> Case:
    """Case `index` of `task` (reproducible: its random numbers come from (seed, task, index) alone)."""
    if task not in TASKS:
        raise BrainDINOError(task, f"unknown case task; use one of {', '.join(TASKS)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, TASKS.index(task), index]))
    case_id = f"{task}-{seed}-{index:04d}"
    if task in ("lobes", "aal"):
        return _colin_case(task, case_id, rng, config)
    templates = mni_tissue(config.spacing_mm)
    reference = templates["wm"]
    arrays = {name: sitk.GetArrayFromImage(image) for name, image in templates.items()}
    coords = random_warp(arrays["wm"].shape, rng, config)
    fractions = {name: warp(array, coords) for name, array in arrays.items()}
    case = Case(case_id, {})
    labels = None
    if task in ("lesion", "survival"):
        radius = rng.uniform(*config.lesion_radius_mm)
        labels = insert_lesion(fractions, rng, config.spacing_mm, radius)
        volume_ml = float((labels > 0).sum() * config.spacing_mm ** 3 / 1000)
        case.targets["lesion_ml"] = round(volume_ml, 3)
        if task == "survival":
            hazard = config.baseline_hazard * np.exp(config.hazard_beta * (volume_ml - 20.0) / 15.0)
            event_time, censor_time = rng.exponential(1 / hazard), rng.uniform(0, config.max_censoring)
            case.targets.update(time=round(float(min(event_time, censor_time)), 3),
                                event=int(event_time <= censor_time))
    if task == "atrophy":
        atrophy = float(rng.uniform(*config.atrophy_range))
        fractions["csf"] = fractions["csf"] + atrophy * fractions["gm"]
        fractions["gm"] = (1 - atrophy) * fractions["gm"]
        case.targets["atrophy"] = round(atrophy, 4)
    if task == "tissue":
        labels = tissue_labels(*(fractions[t] for t in TISSUES))
    if task == "sequence":
        chosen = (SEQUENCES[index % len(SEQUENCES)],)  # balanced classes; everything else is random
        case.targets["sequence"] = chosen[0]
    else:
        chosen = sequences or (("FLAIR",) if task in ("lesion", "survival") else ("T1",))
    case.images = {s: _volume(render(fractions, s, rng, config), reference, f"{case_id}_{s}") for s in chosen}
    if labels is not None:
        case.labels = _volume(labels, reference, f"{case_id}_labels")
    return case


def _colin_case(task: str, case_id: str, rng: np.random.Generator, config: CaseConfig) -> Case:
    t1, aal = colin27(config.spacing_mm)
    t1_array = sitk.GetArrayFromImage(t1)
    coords = random_warp(t1_array.shape, rng, config)
    image = np.clip(warp(t1_array, coords), 0, None) / 255.0
    labels = warp(sitk.GetArrayFromImage(aal), coords, labels=True).astype(np.uint8)
    image = image ** rng.uniform(0.7, 1.4)  # contrast change
    image *= bias_field(image.shape, rng, config.bias)
    image = add_rician_noise(image, rng, config.noise)
    if task == "lobes":
        labels, _ = merge_aal_into_lobes(labels)
    return Case(case_id, {"T1": _volume((1000 * image).astype(np.float32), t1, f"{case_id}_T1")},
                _volume(labels, t1, f"{case_id}_labels"))


def class_names_for(task: str) -> list[str] | None:
    """Names of the label values of a segmentation task (index = label value)."""
    if task == "tissue":
        return list(CLASS_NAMES)
    if task in ("lesion", "survival"):
        return list(LESION_CLASSES)
    if task == "lobes":
        return ["background", *LOBES]
    if task == "aal":
        regions = aal_names()
        return ["background"] + [regions.get(value, "") for value in range(1, max(regions) + 1)]
    return None


# ---- writing a cohort ------------------------------------------------------------------------------------

def make_cases(task: str, folder: str | Path, num_train: int, num_test: int, seed: int = 0,
               config: CaseConfig = CaseConfig(), sequences: tuple[str, ...] | None = None,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `num_train + num_test` cases of `task` as NIfTI under `folder` and a manifest `cases.csv`.

    Columns: `case`, `split` (train/test), one `image` column per sequence (`image` when there is one,
    else `image_<sequence>`), `label` (label volume) for segmentation tasks, and the task's targets
    (`sequence`, `atrophy`, `lesion_ml`, `time`, `event`). Paths are relative to the manifest. Training
    and test cases have disjoint indices; identical images anywhere in the cohort are refused.
    """
    folder = Path(folder)
    total = num_train + num_test
    rows, digests = [], {}
    for index in range(total):
        case = generate_case(task, index, seed, config, sequences)
        row: dict[str, object] = {"case": case.case_id, "split": "train" if index < num_train else "test"}
        for sequence, image in case.images.items():
            column = "image" if len(case.images) == 1 else f"image_{sequence.lower()}"
            name = f"{case.case_id}_{sequence}.nii.gz"
            digest = hashlib.sha256(image.array.tobytes()).hexdigest()
            if digest in digests:
                raise AssertionError(f"{case.case_id} repeats the image of {digests[digest]}")
            digests[digest] = case.case_id
            write_volume(image, folder / name)
            row[column] = name
        if case.labels is not None:
            write_volume(case.labels, folder / f"{case.case_id}_labels.nii.gz")
            row["label"] = f"{case.case_id}_labels.nii.gz"
        row.update(case.targets)
        rows.append(row)
        if progress:
            progress(index + 1, total)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    manifest = folder / "cases.csv"
    write_text_atomic(manifest, buffer.getvalue())
    names = class_names_for(task)
    if names:
        write_text_atomic(folder / "classes.txt", "\n".join(names) + "\n")
    log.info("wrote %d %s cases and %s", total, task, manifest)
    return manifest
