"""Tissue classes and synthetic contrasts from the MNI152 grey/white-matter probability maps.

The rule (used by the demo model's synthetic training contrasts and by the tissue probe, `probe.py`):
- grey and white matter probabilities are the maps divided by 255;
- the intracranial mask is (gm + wm > 0.1), closed with a 3-voxel ball (fills the sulci) and with its
  holes filled (the ventricles);
- CSF-ish probability = intracranial x clip(1 - gm - wm, 0, 1); background probability = 1 outside the
  intracranial mask and 0 inside;
- the tissue class of a voxel is argmax(background, CSF, GM, WM): 0 background, 1 CSF, 2 GM, 3 WM.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..volume import Volume

CLASS_NAMES = ("background", "CSF", "GM", "WM")

# Relative signal of (CSF, GM, WM) in synthetic contrasts (brain only, background 0). Orderings follow the
# textbook appearance of each sequence; absolute values are arbitrary because slices are z-scored.
SYNTHETIC_CONTRASTS = {
    "t1like": (0.20, 0.55, 0.85),
    "t2like": (1.00, 0.60, 0.40),
    "flairlike": (0.15, 0.75, 0.55),
    "pdlike": (0.90, 0.80, 0.65),
}


def intracranial_mask(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """bool [Z, Y, X]: brain tissue with its sulci closed and its ventricles filled (probabilities in 0..1)."""
    tissue = sitk.GetImageFromArray(((gm + wm) > 0.1).astype(np.uint8))
    closed = sitk.BinaryMorphologicalClosing(tissue, [3, 3, 3], sitk.sitkBall)
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(closed)).astype(bool)


def tissue_probabilities(gm_map: Volume, wm_map: Volume) -> np.ndarray:
    """float32 [Z, Y, X, 4]: background, CSF, GM, WM probabilities from 0-255 GM/WM maps on one grid."""
    gm = gm_map.array / 255.0
    wm = wm_map.array / 255.0
    inside = intracranial_mask(gm, wm)
    csf = inside * np.clip(1.0 - gm - wm, 0.0, 1.0)
    background = (~inside).astype(np.float32)
    return np.stack([background, csf, gm * inside, wm * inside], axis=-1).astype(np.float32)


def tissue_classes(gm_map: Volume, wm_map: Volume) -> np.ndarray:
    """uint8 [Z, Y, X]: 0 background, 1 CSF, 2 GM, 3 WM (argmax of `tissue_probabilities`)."""
    return tissue_probabilities(gm_map, wm_map).argmax(axis=-1).astype(np.uint8)


def render_contrast(probabilities: np.ndarray, signals: tuple[float, float, float], seed: int = 0,
                    noise: float = 0.02, blur_mm: float = 0.6) -> np.ndarray:
    """A synthetic brain-only image: tissue signals mixed by probability, slightly blurred, with noise."""
    image = probabilities[..., 1:] @ np.asarray(signals, dtype=np.float32)
    image = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(image), blur_mm))
    rng = np.random.default_rng(seed)
    image = image + noise * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0.0, None).astype(np.float32) * (probabilities[..., 0] < 1)
