"""Fitting subject heads (classification, regression, survival, kNN) on a manifest's training rows.

Each subject is a bag of slice tokens per modality (`sourcing.SubjectData`). Classification, regression and
survival train a `SubjectHead` (cross-entropy, MSE on the standardised target, Cox partial likelihood); kNN
stores the training subjects and picks k on the validation part. With `folds`, a k-fold estimate comes first;
the final head is fitted on all training rows less the validation part.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..manifest import Manifest
from ..session import FeatureSession
from .card import HeadCard, make_classes
from .cases import check_manifest, subject_targets
from .config import FitConfig
from .evaluation import subject_metrics
from .head import FitResult, Head
from .knn import KNNHead, subject_vector, sweep_k
from .sourcing import FeatureSource, SubjectData, subject_bags
from .splits import folds_of, label_subset, validation_split
from .subject import SubjectHead, subject_outputs
from .survival import cox_partial_likelihood_loss
from .tasks import CLASSIFICATION, KNN, REGRESSION, SURVIVAL
from .training import History, train_module

if TYPE_CHECKING:  # the cohort package imports its torch data loading; fitting needs the store's type only
    from ..cohort.store import FeatureStore

log = logging.getLogger(__name__)


def fit_subject(manifest: Manifest, session: FeatureSession, config: FitConfig, progress=None,
                cancel=None, store: FeatureStore | None = None) -> FitResult:
    """Fit a classification, regression, survival or kNN head on the manifest's training rows."""
    rows = check_manifest(manifest, config)
    columns = manifest.image_columns(config.image_columns)
    manifest.warn_shared_images(columns)
    y, event, class_names = subject_targets(manifest, rows, config)
    strata = y if class_names else None
    keep = label_subset(len(rows), config.label_fraction, config.seed, strata)
    rows, y = [rows[i] for i in keep], y[keep]
    event = None if event is None else event[keep]
    source = FeatureSource(session, (), progress, cancel, store)
    data = SubjectData(subject_bags(manifest, rows, columns, source), y, event)
    classes = make_classes(list(range(len(class_names))), class_names) if class_names else []
    card = HeadCard(task=config.task, kind="knn" if config.task == KNN else "subject-mlp",
                    encoder_id=session.encoder.model_id, classes=classes,
                    pooling="mean" if config.task == KNN else config.pooling,
                    modalities=tuple(columns), preprocessing=session.preprocessing,
                    extra={"fitted_on": str(manifest.path), "training_subjects": len(rows),
                           "resolution": session.policy.to_dict(),
                           "label_fraction": config.label_fraction, "training": config.training.to_dict()},
                    description=f"{config.task} head on {len(rows)} subjects of {manifest.path.name}")
    strata = y if class_names else None
    metrics: dict = {"task": config.task, "training_subjects": len(rows)}
    if config.folds > 1:
        metrics["cross_validation"] = _cross_validate(data, strata, config, card, cancel)
    train, val = validation_split(len(rows), config.val_fraction, config.seed, strata)
    head, history = _fit_subject_head(data.take(train), data.take(val), config, card, cancel=cancel)
    if len(val):
        metrics["validation"] = subject_metrics(head, data.take(val))[0]
    head.card.metrics = metrics
    return FitResult(head, history, metrics)


def _cross_validate(data: SubjectData, strata: np.ndarray | None, config: FitConfig, card: HeadCard,
                    cancel=None) -> dict:
    """Metrics of heads fitted on k - 1 folds and scored on the held-out fold: mean and std over folds."""
    fold_metrics = []
    for fold, (train, held) in enumerate(folds_of(len(data.bags), config.folds, config.seed, strata)):
        inner_train, inner_val = validation_split(len(train), config.val_fraction, config.seed,
                                                  None if strata is None else strata[train])
        part = data.take(train)
        head, _ = _fit_subject_head(part.take(inner_train), part.take(inner_val), config, card, cancel=cancel)
        fold_metrics.append(subject_metrics(head, data.take(held))[0])
        log.info("fold %d: %s", fold, {k: v for k, v in fold_metrics[-1].items() if isinstance(v, float)})
    return _summarise_folds(fold_metrics)


def _summarise_folds(fold_metrics: list[dict]) -> dict:
    """Mean and std over folds of every scalar metric."""
    keys = [k for k, v in fold_metrics[0].items() if isinstance(v, (int, float))]
    summary = {"folds": len(fold_metrics)}
    for key in keys:
        values = np.asarray([m[key] for m in fold_metrics], float)
        summary[key] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}
    return summary


def _fit_subject_head(data: SubjectData, val: SubjectData | None, config: FitConfig, card: HeadCard,
                      progress=None, cancel=None) -> tuple[Head, History]:
    """Fit one subject head (kNN: remember the training subjects and pick k on `val`)."""
    task = config.task
    if task == KNN:
        return _fit_knn_head(data, val, config, card), History()
    extra = dict(card.extra)
    if task == REGRESSION:
        extra.update(target_mean=float(data.y.mean()), target_std=float(data.y.std() or 1.0))
    out_dim = len(card.classes) if task == CLASSIFICATION else 1
    module, history, arguments = _fit_subject_module(data, val, config, out_dim, extra, progress, cancel)
    head = Head(replace(card, module=arguments, extra=extra), module)
    if task == SURVIVAL:
        risks = subject_outputs(head, data.bags)[:, 0]
        head.card.extra["median_risk"] = float(np.median(risks))
    return head, history


def _fit_knn_head(data: SubjectData, val: SubjectData | None, config: FitConfig, card: HeadCard) -> Head:
    """A kNN head remembering the subjects `data`, with the k that scores best on `val` (5 without one)."""
    vectors = torch.stack([subject_vector(b) for b in data.bags])
    sweep = {}
    k = 5
    if val is not None and len(val.bags):
        probe = KNNHead(vectors.shape[1], len(data.bags), len(card.classes))
        probe.remember(vectors, torch.as_tensor(data.y))
        sweep = sweep_k(probe, torch.stack([subject_vector(b) for b in val.bags]), val.y, config.k_values)
        k = max(sweep, key=lambda kk: (sweep[kk], kk)) if sweep else k
    arguments = {"feature_dim": vectors.shape[1], "num_items": len(data.bags), "num_classes": len(card.classes),
                 "k": int(min(k, len(data.bags)))}
    module = KNNHead(**arguments)
    module.remember(vectors, torch.as_tensor(data.y))
    card = replace(card, module=arguments, extra={**card.extra, "k_sweep": sweep})
    return Head(card, module.eval())


def _subject_loss(task: str, extra: dict):
    def loss(outputs: torch.Tensor, data: SubjectData, index: np.ndarray) -> torch.Tensor:
        if task == CLASSIFICATION:
            return F.cross_entropy(outputs, torch.as_tensor(data.y[index]))
        if task == REGRESSION:
            target = (torch.as_tensor(data.y[index], dtype=torch.float32) - extra["target_mean"]) / extra["target_std"]
            return F.mse_loss(outputs[:, 0], target)
        return cox_partial_likelihood_loss(outputs[:, 0], torch.as_tensor(data.y[index], dtype=torch.float32),
                                           torch.as_tensor(data.event[index]))
    return loss


def _fit_subject_module(data: SubjectData, val: SubjectData | None, config: FitConfig, out_dim: int,
                        extra: dict, progress=None, cancel=None) -> tuple[SubjectHead, History, dict]:
    torch.manual_seed(config.seed)
    arguments = {"token_dim": data.bags[0][0].shape[1], "out_dim": out_dim, "modalities": len(data.bags[0]),
                 "pooling": config.pooling, "hidden": config.hidden}
    module = SubjectHead(**arguments)
    module.set_standardisation(torch.cat([t for bag in data.bags for t in bag]))
    loss = _subject_loss(config.task, extra)
    training = config.training
    if config.task == SURVIVAL:  # the partial likelihood compares each subject with everyone at risk
        training = replace(training, batch_size=0)

    def batch_loss(m, index):
        index = index.numpy()
        return loss(m([data.bags[i] for i in index]), data, index)

    def val_loss(m):
        return float(loss(m(val.bags), val, np.arange(len(val.bags))))

    use_val = val is not None and len(val.bags) >= (2 if config.task == SURVIVAL else 1)
    history = train_module(module, batch_loss, len(data.bags), training, val_loss if use_val else None,
                           progress=progress, cancel=cancel)
    return module.eval(), history, arguments
