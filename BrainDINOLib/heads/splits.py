"""How fitting divides labelled items (subjects or cases): a labelled share, a validation part, k folds.

Every split is seeded and stratified by class where every class has members enough (scikit-learn).
"""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from ..errors import BrainDINOError


def _stratify(labels: np.ndarray | None) -> np.ndarray | None:
    """Stratify only when every class has at least two members."""
    if labels is None:
        return None
    _, counts = np.unique(labels, return_counts=True)
    return labels if counts.min() >= 2 else None


def label_subset(count: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Indices of `fraction` of `count` items (at least 2; stratified by `labels` where possible)."""
    if not 0 < fraction <= 1:
        raise BrainDINOError("label fraction", f"must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(count)
    keep = max(2, int(round(fraction * count)))
    if labels is not None:
        keep = max(keep, len(np.unique(labels)))
    chosen, _ = train_test_split(np.arange(count), train_size=keep, random_state=seed, stratify=_stratify(labels))
    return np.sort(chosen)


def validation_split(count: int, fraction: float, seed: int, labels: np.ndarray | None = None):
    """(train, validation) index arrays; no validation part when `fraction` is 0 or there are < 4 items."""
    if fraction <= 0 or count < 4:
        return np.arange(count), np.arange(0)
    val = max(1, int(round(fraction * count)))
    if labels is not None:
        val = max(val, len(np.unique(labels)))
    train, held = train_test_split(np.arange(count), test_size=val, random_state=seed, stratify=_stratify(labels))
    return np.sort(train), np.sort(held)


def folds_of(count: int, folds: int, seed: int, labels: np.ndarray | None = None):
    """(train, held-out) index arrays of `folds` shuffled folds (stratified when every class fills every fold)."""
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed) if _stratify(labels) is not None and \
        np.unique(labels, return_counts=True)[1].min() >= folds else KFold(folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(count), labels))
