"""PNG plots of fitted heads: learning curves, ROC, confusion matrix, predicted vs true, Kaplan-Meier.

matplotlib with the non-interactive Agg backend (no display needed); every file is written atomically.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ..atomic import atomic_path  # noqa: E402
from .survival import RiskGroups  # noqa: E402


def _save(figure, path: str | Path) -> Path:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110)
    plt.close(figure)
    return Path(path)


def learning_curves(train_loss: Sequence[float], val_loss: Sequence[float], best_epoch: int, path: str | Path) -> Path:
    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.plot(range(1, len(train_loss) + 1), train_loss, label="training")
    if len(val_loss):
        axes.plot(range(1, len(val_loss) + 1), val_loss, label="validation")
    if best_epoch >= 0:
        axes.axvline(best_epoch + 1, color="grey", linestyle=":", label="kept")
    axes.set(xlabel="epoch", ylabel="loss", title="learning curves")
    axes.legend()
    return _save(figure, path)


def roc_curves(truth: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
    """One-vs-rest ROC curve per class present in `truth`."""
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    for index, name in enumerate(class_names):
        positive = np.asarray(truth) == index
        if positive.any() and (~positive).any():
            fpr, tpr, _ = roc_curve(positive, probabilities[:, index])
            axes.plot(fpr, tpr, label=name)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one vs rest)")
    axes.legend(fontsize=8)
    return _save(figure, path)


def confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path) -> Path:
    matrix = np.asarray(matrix)
    figure, axes = plt.subplots(figsize=(1.2 + 0.6 * len(class_names), 1 + 0.6 * len(class_names)))
    axes.imshow(matrix, cmap="Blues")
    for (r, c), count in np.ndenumerate(matrix):
        axes.text(c, r, str(count), ha="center", va="center")
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    return _save(figure, path)


def predicted_vs_true(truth: np.ndarray, predicted: np.ndarray, path: str | Path, label: str = "target") -> Path:
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.scatter(truth, predicted, s=14)
    low, high = float(min(np.min(truth), np.min(predicted))), float(max(np.max(truth), np.max(predicted)))
    axes.plot([low, high], [low, high], color="grey", linestyle=":")
    axes.set(xlabel=f"true {label}", ylabel=f"predicted {label}", title="predicted vs true")
    return _save(figure, path)


def kaplan_meier(groups: RiskGroups, path: str | Path) -> Path:
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for name, (times, survival) in groups.curves.items():
        axes.step(times, survival, where="post", label=name)
    axes.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.05),
             title=f"Kaplan-Meier (log-rank p = {groups.logrank_p:.3g})")
    axes.legend()
    return _save(figure, path)
