"""Brain tissue, defined once: the classes, the rule that derives them from the MNI152 maps, and their MRI signal.

Used by the case generator (`synthetic.py`), the tissue probe (`training/probe.py`) and the synthetic
training brains (`training/synthbrain.py`), so that "CSF", "grey matter" and "a T2-like image" mean the same
thing everywhere.

The rule, from grey- and white-matter probability maps (0..1):
- the intracranial mask is (gm + wm > 0.1), closed with a 3-voxel ball (fills the sulci) and with its
  holes filled (the ventricles);
- CSF fraction = intracranial x clip(1 - gm - wm, 0, 1); grey and white matter fractions are the maps
  inside the mask; background is everything else;
- the tissue class of a voxel is argmax(background, CSF, GM, WM), background being what the three fractions
  leave (1 - CSF - GM - WM): 0 background, 1 CSF, 2 GM, 3 WM (`tissue_labels`, for the template, a generated
  case after its atrophy or lesion, or a synthetic training slice alike).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .volume import Volume

CLASS_NAMES = ("background", "CSF", "grey matter", "white matter")
TISSUES = ("csf", "gm", "wm")  # the fractions' keys, in class order 1, 2, 3
TISSUE_CLASSES = (1, 2, 3)  # the label values of CSF, GM and WM (0 is background)

# Relative signal of each tissue per sequence (background is 0). Orderings follow the textbook appearance of
# each sequence (T1: CSF < GM < WM; T2: CSF > GM > WM; FLAIR: CSF dark, GM > WM; PD: CSF >~ GM > WM); lesion
# tissues (oedema, tumour core) are used by the case generator. Absolute values are arbitrary: the engine
# z-scores every volume.
SIGNALS: dict[str, dict[str, float]] = {
    "T1": {"csf": 0.25, "gm": 0.60, "wm": 0.85, "oedema": 0.50, "core": 0.35},
    "T2": {"csf": 1.00, "gm": 0.65, "wm": 0.45, "oedema": 0.85, "core": 0.70},
    "FLAIR": {"csf": 0.10, "gm": 0.70, "wm": 0.50, "oedema": 1.00, "core": 0.60},
    "PD": {"csf": 0.85, "gm": 0.80, "wm": 0.65, "oedema": 0.90, "core": 0.80},
}


def intracranial_mask(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """bool [Z, Y, X]: brain tissue with its sulci closed and its ventricles filled (probabilities in 0..1)."""
    tissue = sitk.GetImageFromArray(((gm + wm) > 0.1).astype(np.uint8))
    closed = sitk.BinaryMorphologicalClosing(tissue, [3, 3, 3], sitk.sitkBall)
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(closed)).astype(bool)


def tissue_fractions(gm: np.ndarray, wm: np.ndarray) -> dict[str, np.ndarray]:
    """{"csf", "gm", "wm"}: float32 fractions (sum <= 1; background is the rest) from 0..1 GM/WM maps."""
    inside = intracranial_mask(gm, wm)
    return {"csf": (inside * np.clip(1.0 - gm - wm, 0.0, 1.0)).astype(np.float32),
            "gm": (gm * inside).astype(np.float32), "wm": (wm * inside).astype(np.float32)}


def tissue_labels(csf: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """uint8, the fractions' shape: 0 background, 1 CSF, 2 GM, 3 WM, whichever holds most of the voxel."""
    return np.stack([1 - csf - gm - wm, csf, gm, wm]).argmax(axis=0).astype(np.uint8)


def tissue_classes(gm_map: Volume, wm_map: Volume) -> np.ndarray:
    """uint8 [Z, Y, X]: the template's tissue labels (`tissue_labels`) from 0-255 GM/WM maps on one grid."""
    fractions = tissue_fractions(gm_map.array / 255.0, wm_map.array / 255.0)
    return tissue_labels(*(fractions[t] for t in TISSUES))
