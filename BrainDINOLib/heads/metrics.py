"""Metrics of fitted heads, and their JSON + CSV output.

Segmentation: Dice and 95th-percentile Hausdorff distance (mm) per class via MONAI. Classification:
accuracy, balanced accuracy, macro one-vs-rest AUC (scikit-learn). Regression: MAE, RMSE, R^2, Pearson r.
Survival: C-index (lifelines) and the log-rank test of the median risk groups.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score

from ..atomic import write_text_atomic


def segmentation_metrics(predicted: np.ndarray, truth: np.ndarray, class_values: Sequence[int],
                         class_names: Sequence[str], spacing: Sequence[float]) -> dict:
    """Dice and HD95 (mm) per foreground class, and their means. `spacing` in array (k, j, i) order.

    A class absent from both prediction and truth is skipped; HD95 is NaN where one side is empty."""
    per_class = {}
    for value, name in zip(class_values, class_names):
        if value == 0:
            continue
        p, t = predicted == value, truth == value
        if not p.any() and not t.any():
            continue
        y_pred = torch.from_numpy(np.stack([~p, p]))[None].float()
        y = torch.from_numpy(np.stack([~t, t]))[None].float()
        dice = float(compute_dice(y_pred, y, include_background=False)[0, 0])
        hd95 = float(compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95,
                                                spacing=list(spacing))[0, 0]) if p.any() and t.any() else math.nan
        per_class[name] = {"dice": dice, "hd95_mm": hd95}
    dices = [m["dice"] for m in per_class.values()]
    hds = [m["hd95_mm"] for m in per_class.values() if not math.isnan(m["hd95_mm"])]
    return {"mean_dice": float(np.mean(dices)) if dices else math.nan,
            "mean_hd95_mm": float(np.mean(hds)) if hds else math.nan, "per_class": per_class}


def dice_per_class(predicted: np.ndarray, truth: np.ndarray, class_values: Sequence[int]) -> dict[int, float]:
    """Plain Dice per foreground value (fast; for tests and benchmarks on slices)."""
    out = {}
    for value in class_values:
        if value == 0:
            continue
        p, t = predicted == value, truth == value
        total = p.sum() + t.sum()
        if total:
            out[int(value)] = float(2 * (p & t).sum() / total)
    return out


def classification_metrics(truth: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro one-vs-rest AUC (NaN if a class is missing) and the confusion matrix."""
    truth = np.asarray(truth, int)
    predicted = probabilities.argmax(axis=1)
    labels = list(range(len(class_names)))
    try:
        if len(class_names) == 2:
            auc = float(roc_auc_score(truth, probabilities[:, 1]))
        else:
            auc = float(roc_auc_score(truth, probabilities, multi_class="ovr", average="macro", labels=labels))
    except ValueError:  # a class absent from the truth
        auc = math.nan
    return {"accuracy": float(accuracy_score(truth, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)), "macro_auc": auc,
            "chance_accuracy": float(np.bincount(truth, minlength=len(labels)).max() / len(truth)),
            "confusion_matrix": confusion_matrix(truth, predicted, labels=labels).tolist(),
            "class_names": list(class_names)}


def regression_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict:
    truth, predicted = np.asarray(truth, float), np.asarray(predicted, float)
    error = predicted - truth
    total = ((truth - truth.mean()) ** 2).sum()
    r = float(np.corrcoef(truth, predicted)[0, 1]) if len(truth) > 1 and predicted.std() > 0 else math.nan
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
            "r2": float(1 - (error ** 2).sum() / total) if total > 0 else math.nan, "pearson_r": r,
            "mae_of_mean_predictor": float(np.abs(truth - truth.mean()).mean())}


def _flat_rows(metrics: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flat_rows(value, f"{name}.")
        elif not isinstance(value, list):
            rows.append((name, value))
    return rows


def write_metrics(metrics: dict, folder: str | Path, stem: str = "metrics") -> tuple[Path, Path]:
    """`<stem>.json` (everything) and `<stem>.csv` (scalar metrics as `metric,value` rows), atomically."""
    folder = Path(folder)
    json_path, csv_path = folder / f"{stem}.json", folder / f"{stem}.csv"
    write_text_atomic(json_path, json.dumps(metrics, indent=2, default=float) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["metric", "value"])
    writer.writerows(_flat_rows(metrics))
    write_text_atomic(csv_path, buffer.getvalue())
    return json_path, csv_path


def write_predictions(rows: list[dict], path: str | Path) -> Path:
    """Per-case predictions as CSV (columns from the first row)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["case"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
    return Path(path)
