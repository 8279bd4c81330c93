"""Evaluating a saved head on a manifest's cases, and the report folder it writes.

The report holds `metrics.json` + `metrics.csv`, `predictions.csv` (one row per case) and the PNG plots
that fit the task: learning curves (when fitting), ROC and confusion matrix (classification, kNN),
predicted vs true (regression), Kaplan-Meier curves of the median risk groups (survival).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import BrainDINOError
from ..features import VolumeFeatures
from ..session import FeatureSession
from . import plots
from .fitting import (FeatureSource, FitConfig, Manifest, SubjectData, read_labels, subject_bags, subject_metrics,
                      subject_targets)
from .head import Head
from .metrics import segmentation_metrics, write_metrics, write_predictions
from .segmentation import segment
from .subject import class_probabilities, interpret, regression_values
from .survival import risk_groups
from .training import History


@dataclass
class Evaluation:
    metrics: dict
    predictions: list[dict]
    arrays: dict = field(default_factory=dict)  # what the plots need: truth, outputs, ...


def segmentation_case_metrics(head: Head, features: VolumeFeatures, labels: np.ndarray) -> dict:
    """Dice and HD95 of `head` on one case (label values outside the head's classes count as missed)."""
    predicted = segment(head, features).array
    spacing = tuple(reversed(features.geometry.spacing))  # (k, j, i) order like the array
    return segmentation_metrics(predicted, labels, [c.value for c in head.card.classes], head.card.class_names,
                                spacing)


def _subject_image_columns(card, manifest: Manifest, config: FitConfig) -> list[str]:
    return list(config.image_columns or card.modalities) or manifest.image_columns()


def evaluation_rows(head: Head, manifest: Manifest, split: str | None = "test",
                    columns: FitConfig | None = None) -> list[int]:
    """The rows `evaluate` uses, after checking, before any features are computed, that the manifest suits this
    head: the split exists, every target is valid for the head's task and classes, every file exists."""
    card = head.card
    config = replace(columns, task=card.task) if columns else FitConfig(task=card.task)
    rows = manifest.rows_of_split(split)
    if card.task == "segmentation":
        manifest.require(config.label_column)
        manifest.image_paths(rows, [manifest.image_columns(config.image_columns)[0], config.label_column])
        return rows
    images = _subject_image_columns(card, manifest, config)
    manifest.require(*images)
    _refuse_label_volumes(manifest, rows, config.label_column, card.task)
    subject_targets(manifest, rows, config, card.class_names or None)
    manifest.image_paths(rows, images)
    return rows


def evaluate(head: Head, manifest: Manifest, session: FeatureSession, split: str | None = "test",
             columns: FitConfig | None = None, progress=None, cancel=None, store=None) -> Evaluation:
    """Metrics of `head` on the manifest rows of `split` (`test`; all rows when there is no split column).
    Column names come from `columns` (a `FitConfig`; the defaults otherwise); features from `store` (a
    `FeatureStore`) when given."""
    rows = evaluation_rows(head, manifest, split, columns)
    source = FeatureSource.for_head(head, session, progress=progress, cancel=cancel, store=store)
    card = head.card
    config = replace(columns, task=card.task) if columns else FitConfig(task=card.task)
    if card.task == "segmentation":
        column = manifest.image_columns(config.image_columns)[0]
        per_case, predictions = [], []
        for row in rows:
            features = source(manifest.resolve(manifest.rows[row][column]))
            labels = read_labels(manifest, row, config.label_column, features.slices.volume_shape)
            result = segmentation_case_metrics(head, features, labels)
            per_case.append(result)
            predictions.append({"case": manifest.case_id(row), "mean_dice": result["mean_dice"],
                                "mean_hd95_mm": result["mean_hd95_mm"],
                                **{f"dice[{name}]": m["dice"] for name, m in result["per_class"].items()}})
        names = card.class_names[1:] if card.classes and card.classes[0].value == 0 else card.class_names
        metrics = {"task": "segmentation", "cases": len(rows),
                   "mean_dice": float(np.nanmean([m["mean_dice"] for m in per_case])),
                   "mean_hd95_mm": float(np.nanmean([m["mean_hd95_mm"] for m in per_case])),
                   "dice_per_class": {n: float(np.nanmean([m["per_class"][n]["dice"] for m in per_case
                                                           if n in m["per_class"]] or [np.nan])) for n in names}}
        return Evaluation(metrics, predictions)
    y, event, _ = subject_targets(manifest, rows, config, card.class_names or None)
    images = _subject_image_columns(card, manifest, config)
    data = SubjectData(subject_bags(manifest, rows, images, source), y, event)
    metrics, outputs = subject_metrics(head, data)
    metrics = {"task": card.task, "subjects": len(rows), **metrics}
    arrays = {"truth": y, "outputs": outputs, "event": event}
    predictions = [{"case": manifest.case_id(row)} for row in rows]
    if card.task in ("classification", "knn"):
        arrays["probabilities"] = class_probabilities(card, outputs)
        for entry, truth, p in zip(predictions, y, arrays["probabilities"]):
            entry.update(truth=card.class_names[truth], predicted=card.class_names[int(np.argmax(p))],
                         **{f"p[{c}]": float(x) for c, x in zip(card.class_names, p)})
    elif card.task == "regression":
        arrays["predicted"] = regression_values(card, outputs)
        for entry, truth, value in zip(predictions, y, arrays["predicted"]):
            entry.update(truth=float(truth), predicted=float(value))
    else:
        for entry, time, observed, result in zip(predictions, y, event, interpret(card, outputs)):
            entry.update(time=float(time), event=int(observed), **result)
        groups = risk_groups(y, event, outputs[:, 0], card.extra["median_risk"])
        metrics.update(logrank_p=groups.logrank_p, logrank_statistic=groups.logrank_statistic,
                       high_risk_subjects=int(groups.high.sum()))
        arrays["groups"] = groups
    return Evaluation(metrics, predictions, arrays)


def _refuse_label_volumes(manifest: Manifest, rows: list[int], column: str, task: str) -> None:
    """A classification or kNN head evaluated on a segmentation manifest: say so, not "unknown classes"."""
    if task not in ("classification", "knn") or column not in manifest.columns:
        return
    if all(manifest.rows[i][column] and manifest.resolve(manifest.rows[i][column]).is_file() for i in rows):
        raise BrainDINOError(manifest.path, f"its {column} column holds label volumes (a segmentation manifest); "
                                            f"this is a {task} head, which needs class names there")


def write_report(folder: str | Path, evaluation: Evaluation, head: Head, history: History | None = None,
                 stem: str = "metrics") -> list[Path]:
    """Write metrics (JSON + CSV), predictions (CSV) and the task's plots (PNG) into `folder`."""
    folder = Path(folder)
    written = list(write_metrics(evaluation.metrics, folder, stem))
    if evaluation.predictions:
        name = stem.replace("metrics", "predictions") + ".csv"
        written.append(write_predictions(evaluation.predictions, folder / name))
    if history is not None and history.train_loss:
        written.append(plots.learning_curves(history.train_loss, history.val_loss, history.best_epoch,
                                             folder / "learning_curves.png"))
    arrays, task = evaluation.arrays, head.card.task
    if task in ("classification", "knn") and "probabilities" in arrays:
        written.append(plots.roc_curves(arrays["truth"], arrays["probabilities"], head.card.class_names,
                                        folder / "roc.png"))
        written.append(plots.confusion(evaluation.metrics["confusion_matrix"], head.card.class_names,
                                       folder / "confusion_matrix.png"))
    elif task == "regression" and "predicted" in arrays:
        written.append(plots.predicted_vs_true(arrays["truth"], arrays["predicted"], folder / "predicted_vs_true.png"))
    elif task == "survival" and "groups" in arrays:
        written.append(plots.kaplan_meier(arrays["groups"], folder / "kaplan_meier.png"))
    return written
