"""Evaluating a head: its metrics on prepared cases (used by fitting for the validation part too), on a manifest's
cases (`evaluate`), and the report folder it writes.

The report holds `metrics.json` + `metrics.csv`, `predictions.csv` (one row per case) and the PNG plots
that fit the task: learning curves (when fitting), ROC and confusion matrix (classification, kNN),
predicted vs true (regression), Kaplan-Meier curves of the median risk groups (survival).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..features import VolumeFeatures
from ..manifest import Manifest
from ..session import FeatureSession
from . import plots
from .cases import evaluation_config, evaluation_rows, read_labels, subject_image_columns, subject_targets
from .config import FitConfig
from .head import Head
from .metrics import (classification_metrics, regression_metrics, segmentation_metrics, write_metrics,
                      write_predictions)
from .segmentation import segment
from .sourcing import FeatureSource, SubjectData, subject_bags
from .subject import class_probabilities, interpret, regression_values, subject_outputs
from .survival import c_index, risk_groups
from .tasks import CLASS_TASKS, REGRESSION, SEGMENTATION, SURVIVAL
from .training import History


@dataclass
class Evaluation:
    metrics: dict
    predictions: list[dict]
    arrays: dict = field(default_factory=dict)  # what the plots need: truth, outputs, ...


# ---- metrics of prepared cases --------------------------------------------------------------------------------

def segmentation_case_metrics(head: Head, features: VolumeFeatures, labels: np.ndarray) -> dict:
    """Dice and HD95 of `head` on one case (label values outside the head's classes count as missed)."""
    predicted = segment(head, features).array
    spacing = tuple(reversed(features.geometry.spacing))  # (k, j, i) order like the array
    return segmentation_metrics(predicted, labels, [c.value for c in head.card.classes], head.card.class_names,
                                spacing)


def mean_over_cases(per_case: Sequence[dict]) -> dict:
    """Mean Dice and mean HD95 over cases (of `segmentation_case_metrics`), ignoring NaN."""
    return {"mean_dice": float(np.nanmean([m["mean_dice"] for m in per_case])),
            "mean_hd95_mm": float(np.nanmean([m["mean_hd95_mm"] for m in per_case]))}


def subject_metrics(head: Head, data: SubjectData) -> tuple[dict, np.ndarray]:
    """Metrics of `head` on subjects `data`, and its raw outputs."""
    outputs = subject_outputs(head, data.bags)
    card = head.card
    if card.task in CLASS_TASKS:
        return classification_metrics(data.y, class_probabilities(card, outputs), card.class_names), outputs
    if card.task == REGRESSION:
        return regression_metrics(data.y, regression_values(card, outputs)), outputs
    return {"c_index": c_index(data.y, outputs[:, 0], data.event), "events": int(data.event.sum()),
            "subjects": len(data.y)}, outputs


# ---- a manifest's cases ---------------------------------------------------------------------------------------

def evaluate(head: Head, manifest: Manifest, session: FeatureSession, split: str | None = "test",
             columns: FitConfig | None = None, progress=None, cancel=None, store=None) -> Evaluation:
    """Metrics of `head` on the manifest rows of `split` (`test`; all rows when there is no split column).
    Column names come from `columns` (a `FitConfig`; the defaults otherwise); features from `store` (a
    `FeatureStore`) when given."""
    card = head.card
    rows = evaluation_rows(card, manifest, split, columns)
    source = FeatureSource.for_head(head, session, progress=progress, cancel=cancel, store=store)
    config = evaluation_config(card, columns)
    if card.task == SEGMENTATION:
        return _evaluate_segmentation(head, manifest, rows, config, source)
    y, event, _ = subject_targets(manifest, rows, config, card.class_names or None)
    images = subject_image_columns(card, manifest, config)
    data = SubjectData(subject_bags(manifest, rows, images, source), y, event)
    metrics, outputs = subject_metrics(head, data)
    metrics = {"task": card.task, "subjects": len(rows), **metrics}
    arrays = {"truth": y, "outputs": outputs, "event": event}
    predictions = [{"case": manifest.case_id(row)} for row in rows]
    if card.task in CLASS_TASKS:
        arrays["probabilities"] = class_probabilities(card, outputs)
        for entry, truth, p in zip(predictions, y, arrays["probabilities"]):
            entry.update(truth=card.class_names[truth], predicted=card.class_names[int(np.argmax(p))],
                         **{f"p[{c}]": float(x) for c, x in zip(card.class_names, p)})
    elif card.task == REGRESSION:
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


def _evaluate_segmentation(head: Head, manifest: Manifest, rows: list[int], config: FitConfig,
                           source: FeatureSource) -> Evaluation:
    card = head.card
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
    metrics = {"task": SEGMENTATION, "cases": len(rows), **mean_over_cases(per_case),
               "dice_per_class": {n: float(np.nanmean([m["per_class"][n]["dice"] for m in per_case
                                                       if n in m["per_class"]] or [np.nan])) for n in names}}
    return Evaluation(metrics, predictions)


# ---- the report -----------------------------------------------------------------------------------------------

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
    if task in CLASS_TASKS and "probabilities" in arrays:
        written.append(plots.roc_curves(arrays["truth"], arrays["probabilities"], head.card.class_names,
                                        folder / "roc.png"))
        written.append(plots.confusion(evaluation.metrics["confusion_matrix"], head.card.class_names,
                                       folder / "confusion_matrix.png"))
    elif task == REGRESSION and "predicted" in arrays:
        written.append(plots.predicted_vs_true(arrays["truth"], arrays["predicted"], folder / "predicted_vs_true.png"))
    elif task == SURVIVAL and "groups" in arrays:
        written.append(plots.kaplan_meier(arrays["groups"], folder / "kaplan_meier.png"))
    return written
