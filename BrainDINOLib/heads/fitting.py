"""Fitting heads on labelled cases listed in a CSV manifest (`BrainDINOLib.manifest` reads and checks it).

Features come from a `FeatureSession` (with its caches), so refitting a head costs seconds. Fitting
holds out a validation part (`val_fraction`, fixed seed) for early stopping and reporting, or runs
k-fold cross-validation (`folds`) for the estimate and then fits the final head on all training rows. A
`label_fraction` below 1 trains on that share of the labelled rows (stratified for classes).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from ..errors import BrainDINOError
from ..features import VolumeFeatures
from ..manifest import Manifest
from ..session import FeatureSession
from ..volume import read_volume
from .card import HeadCard, make_classes, names_for_values
from .head import Head
from .knn import DEFAULT_K_SWEEP, KNNHead, subject_vector, sweep_k
from .metrics import classification_metrics, regression_metrics
from .segmentation import head_inputs, make_segmentation_module, segmentation_loss, soft_targets
from .subject import Bag, SubjectHead, class_probabilities, regression_values, slice_tokens, subject_outputs
from .survival import admissible_pairs, c_index, cox_partial_likelihood_loss
from .training import History, TrainConfig, train_module

if TYPE_CHECKING:
    from ..cohort.store import FeatureStore

log = logging.getLogger(__name__)

SUBJECT_TASKS = ("classification", "regression", "survival", "knn")
UNKNOWN_TASK = "unknown task; use segmentation, classification, regression, survival or knn"


# ---- configuration -------------------------------------------------------------------------------------------

@dataclass
class FitConfig:
    task: str
    kind: str = ""  # segmentation: "linear" (default) or "decoder"
    pooling: str = "mean"  # subject heads: "mean" or "attention"
    hidden: int = 256  # subject heads: MLP width (0: linear)
    layers: tuple[int, ...] | None = None  # segmentation: blocks to concatenate (None: the session's rule)
    image_columns: tuple[str, ...] = ()
    label_column: str = "label"
    target_column: str = "target"
    time_column: str = "time"
    event_column: str = "event"
    class_names: list[str] | None = None  # segmentation: names by label value
    val_fraction: float = 0.2
    folds: int = 0
    label_fraction: float = 1.0
    seed: int = 0
    k_values: tuple[int, ...] = DEFAULT_K_SWEEP
    training: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FitResult:
    head: Head
    history: History
    metrics: dict  # validation (or cross-validation) metrics


# ---- features ----------------------------------------------------------------------------------------------

@dataclass
class FeatureSource:
    """Features of manifest images from one `FeatureSession`, with the encoder blocks a head reads; with `store`
    (made by `embed-cohort`), read from it instead of embedded (it must hold the session's model, preprocessing,
    resolution and those blocks)."""

    session: FeatureSession
    layers: tuple[int, ...] = ()
    progress: Callable[[int, int], None] | None = None
    cancel: Callable[[], bool] | None = None
    store: FeatureStore | None = None

    def __post_init__(self) -> None:
        if self.store is not None:
            self.store.check_serves(self.session, self.layers)

    @classmethod
    def for_head(cls, head: Head, session: FeatureSession, **kwargs) -> FeatureSource:
        """The features a saved head reads: its encoder (checked) and blocks."""
        head.card.check_encoder(session.encoder.model_id, session.encoder.checkpoint.path)
        return cls(session, tuple(head.card.layers), **kwargs)

    def __call__(self, path: str | Path) -> VolumeFeatures:
        if self.store is not None:
            return self.store.features(path, self.layers)
        return self.session.features(read_volume(path), self.layers, cancel=self.cancel)


def subject_bags(manifest: Manifest, rows: Sequence[int], columns: Sequence[str], source: FeatureSource) -> list[Bag]:
    bags = []
    for n, i in enumerate(rows):
        bags.append([slice_tokens(source(manifest.resolve(manifest.rows[i][c]))) for c in columns])
        if source.progress:
            source.progress(n + 1, len(rows))
    return bags


# ---- splits ---------------------------------------------------------------------------------------------------

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
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed) if _stratify(labels) is not None and \
        np.unique(labels, return_counts=True)[1].min() >= folds else KFold(folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(count), labels))


# ---- subject heads -------------------------------------------------------------------------------------------

@dataclass
class SubjectData:
    """Subjects ready for fitting: bags of slice tokens and the encoded targets."""

    bags: list[Bag]
    y: np.ndarray  # class index / target / time
    event: np.ndarray | None = None

    def take(self, index: np.ndarray) -> SubjectData:
        return SubjectData([self.bags[i] for i in index], self.y[index],
                           None if self.event is None else self.event[index])


def subject_targets(manifest: Manifest, rows: Sequence[int], config: FitConfig,
                    class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Targets of `rows`: class indices (and the class names), numbers, or (time, event). Every value is
    checked (see `Manifest`); `class_names` are a fitted head's classes, else those found in the rows."""
    task = config.task
    if task in ("classification", "knn"):
        labels = manifest.class_labels(rows, config.label_column)
        if class_names is None:
            class_names = sorted(set(labels))
            if len(class_names) < 2:
                raise BrainDINOError(manifest.path, f"{config.label_column} holds one class only ({class_names[0]!r} "
                                                    f"in all {len(rows)} training rows); {task} needs two or more")
        unknown = sorted(set(labels) - set(class_names))
        if unknown:
            raise BrainDINOError(manifest.path, f"classes {unknown} are not among the head's {class_names}")
        return np.asarray([class_names.index(x) for x in labels]), None, class_names
    if task == "regression":
        return manifest.numbers(rows, config.target_column), None, None
    manifest.require(config.time_column, config.event_column)
    return manifest.numbers(rows, config.time_column, minimum=0), manifest.events(rows, config.event_column), None


def _subject_loss(task: str, extra: dict):
    def loss(outputs: torch.Tensor, data: SubjectData, index: np.ndarray) -> torch.Tensor:
        if task == "classification":
            return F.cross_entropy(outputs, torch.as_tensor(data.y[index]))
        if task == "regression":
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
    if config.task == "survival":  # the partial likelihood compares each subject with everyone at risk
        training = replace(training, batch_size=0)

    def batch_loss(m, index):
        index = index.numpy()
        return loss(m([data.bags[i] for i in index]), data, index)

    def val_loss(m):
        return float(loss(m(val.bags), val, np.arange(len(val.bags))))

    use_val = val is not None and len(val.bags) >= (2 if config.task == "survival" else 1)
    history = train_module(module, batch_loss, len(data.bags), training, val_loss if use_val else None,
                           progress=progress, cancel=cancel)
    return module.eval(), history, arguments


def subject_metrics(head: Head, data: SubjectData) -> tuple[dict, np.ndarray]:
    """Metrics of `head` on subjects `data`, and its raw outputs."""
    outputs = subject_outputs(head, data.bags)
    card = head.card
    if card.task in ("classification", "knn"):
        return classification_metrics(data.y, class_probabilities(card, outputs), card.class_names), outputs
    if card.task == "regression":
        return regression_metrics(data.y, regression_values(card, outputs)), outputs
    return {"c_index": c_index(data.y, outputs[:, 0], data.event), "events": int(data.event.sum()),
            "subjects": len(data.y)}, outputs


def _fit_subject_head(data: SubjectData, val: SubjectData | None, config: FitConfig, card: HeadCard,
                      progress=None, cancel=None) -> tuple[Head, History]:
    """Fit one subject head (kNN: remember the training subjects and pick k on `val`)."""
    task = config.task
    if task == "knn":
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
        return Head(card, module.eval()), History()
    extra = dict(card.extra)
    if task == "regression":
        extra.update(target_mean=float(data.y.mean()), target_std=float(data.y.std() or 1.0))
    out_dim = len(card.classes) if task == "classification" else 1
    module, history, arguments = _fit_subject_module(data, val, config, out_dim, extra, progress, cancel)
    head = Head(replace(card, module=arguments, extra=extra), module)
    if task == "survival":
        risks = subject_outputs(head, data.bags)[:, 0]
        head.card.extra["median_risk"] = float(np.median(risks))
    return head, history


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
    card = HeadCard(task=config.task, kind="knn" if config.task == "knn" else "subject-mlp",
                    encoder_id=session.encoder.model_id, classes=classes,
                    pooling="mean" if config.task == "knn" else config.pooling,
                    modalities=tuple(columns), preprocessing=session.preprocessing.to_dict(),
                    extra={"fitted_on": str(manifest.path), "training_subjects": len(rows),
                           "resolution": session.policy.to_dict(),
                           "label_fraction": config.label_fraction, "training": config.training.to_dict()},
                    description=f"{config.task} head on {len(rows)} subjects of {manifest.path.name}")
    strata = y if class_names else None
    metrics: dict = {"task": config.task, "training_subjects": len(rows)}
    if config.folds > 1:
        fold_metrics = []
        for fold, (train, held) in enumerate(folds_of(len(rows), config.folds, config.seed, strata)):
            inner_train, inner_val = validation_split(len(train), config.val_fraction, config.seed,
                                                      None if strata is None else strata[train])
            part = data.take(train)
            head, _ = _fit_subject_head(part.take(inner_train), part.take(inner_val), config, card, cancel=cancel)
            fold_metrics.append(subject_metrics(head, data.take(held))[0])
            log.info("fold %d: %s", fold, {k: v for k, v in fold_metrics[-1].items() if isinstance(v, float)})
        metrics["cross_validation"] = _summarise_folds(fold_metrics)
    train, val = validation_split(len(rows), config.val_fraction, config.seed, strata)
    head, history = _fit_subject_head(data.take(train), data.take(val), config, card, cancel=cancel)
    if len(val):
        metrics["validation"] = subject_metrics(head, data.take(val))[0]
    head.card.metrics = metrics
    return FitResult(head, history, metrics)


def _summarise_folds(fold_metrics: list[dict]) -> dict:
    """Mean and std over folds of every scalar metric."""
    keys = [k for k, v in fold_metrics[0].items() if isinstance(v, (int, float))]
    summary = {"folds": len(fold_metrics)}
    for key in keys:
        values = np.asarray([m[key] for m in fold_metrics], float)
        summary[key] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}
    return summary


# ---- segmentation heads -------------------------------------------------------------------------------------

@dataclass
class SegmentationData:
    """Every embedded slice of every case: head inputs [C, h, w] and class fractions [K, H, W] (fp16). Cases
    may have grids of different sizes (the grid follows each head's size in millimetres), so slices are kept
    one by one and a batch is scored in groups of one grid size."""

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    case_of_slice: np.ndarray  # [N] case number

    def loss(self, module: torch.nn.Module, index: Sequence[int]) -> torch.Tensor:
        """Segmentation loss of slices `index`: the mean over same-size groups, weighted by group size."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in index:
            groups.setdefault(tuple(self.inputs[i].shape), []).append(int(i))
        return sum(len(group) / len(index) * segmentation_loss(
            module(torch.stack([self.inputs[i] for i in group]).float()),
            torch.stack([self.targets[i] for i in group]).float()) for group in groups.values())


def read_labels(manifest: Manifest, row: int, column: str, shape: tuple[int, ...]) -> np.ndarray:
    path = manifest.resolve(manifest.rows[row][column])
    labels = read_volume(path).array
    if labels.shape != shape:
        raise BrainDINOError(path, f"label grid {labels.shape} differs from its image grid {shape}")
    if np.any(labels < 0) or np.any(labels != np.round(labels)):
        raise BrainDINOError(path, "label volume must hold non-negative integers")
    return labels.astype(np.int64)


def fit_segmentation(manifest: Manifest, session: FeatureSession, config: FitConfig, progress=None,
                     cancel=None, store: FeatureStore | None = None) -> FitResult:
    """Fit a segmentation head on every embedded slice of the manifest's training cases."""
    rows = check_manifest(manifest, config)
    column = manifest.image_columns(config.image_columns)[0]
    manifest.warn_shared_images([column])
    rows = [rows[i] for i in label_subset(len(rows), config.label_fraction, config.seed)]
    layers = tuple(sorted(session.segmentation_layers if config.layers is None else config.layers))
    source = FeatureSource(session, layers, progress, cancel, store)
    kind = config.kind or "linear"
    cases = []
    for n, row in enumerate(rows):
        features = source(manifest.resolve(manifest.rows[row][column]))
        labels = read_labels(manifest, row, config.label_column, features.slices.volume_shape)
        cases.append((features, labels))
        if progress:
            progress(n + 1, len(rows))
    values = sorted({0, *np.unique(np.concatenate([np.unique(lab) for _, lab in cases])).astype(int).tolist()})
    torch.manual_seed(config.seed)
    module, arguments = make_segmentation_module(kind, cases[0][0].token_maps(layers).shape[-1], len(values))
    inputs, targets, case_of = [], [], []
    for n, (features, labels) in enumerate(cases):
        inputs += head_inputs(features, layers, features.slices.slice_indices).half().unbind(0)
        targets += soft_targets(labels, features.slices, features.slices.slice_indices, values,
                                module.upscale).half().unbind(0)
        case_of += [n] * features.num_slices
    data = SegmentationData(inputs, targets, np.asarray(case_of))
    train_cases, val_cases = validation_split(len(rows), config.val_fraction, config.seed)
    train = np.flatnonzero(np.isin(data.case_of_slice, train_cases))
    val = np.flatnonzero(np.isin(data.case_of_slice, val_cases))

    def batch_loss(m, index):
        return data.loss(m, train[index.numpy()])

    def val_loss(m):
        return float(np.mean([float(data.loss(m, val[s:s + 64])) for s in range(0, len(val), 64)]))

    history = train_module(module, batch_loss, len(train), config.training, val_loss if len(val) else None,
                           cancel=cancel)
    card = HeadCard(task="segmentation", kind=kind, encoder_id=session.encoder.model_id,
                    classes=make_classes(values, names_for_values(values, config.class_names)), layers=layers,
                    preprocessing=session.preprocessing.to_dict(), module=arguments,
                    extra={"fitted_on": str(manifest.path), "training_cases": len(rows),
                           "resolution": session.policy.to_dict(),
                           "label_fraction": config.label_fraction, "training": config.training.to_dict()},
                    description=f"{kind} segmentation head on {len(rows)} cases of {manifest.path.name}")
    head = Head(card, module.eval())
    metrics: dict = {"task": "segmentation", "training_cases": len(rows)}
    if len(val_cases):
        from .evaluation import segmentation_case_metrics
        per_case = [segmentation_case_metrics(head, *cases[i]) for i in val_cases]
        metrics["validation"] = {"mean_dice": float(np.nanmean([m["mean_dice"] for m in per_case])),
                                 "mean_hd95_mm": float(np.nanmean([m["mean_hd95_mm"] for m in per_case])),
                                 "cases": len(per_case)}
    head.card.metrics = metrics
    return FitResult(head, history, metrics)


def check_manifest(manifest: Manifest, config: FitConfig) -> list[int]:
    """Check, before any features are computed, everything a fit of `config.task` needs from the manifest:
    columns, splits, every training and test target (see `Manifest`), that the targets can teach something
    (two classes, varying numbers, comparable survival pairs) and that every image and label file exists.
    Returns the training rows."""
    if config.task not in ("segmentation", *SUBJECT_TASKS):
        raise BrainDINOError(config.task, UNKNOWN_TASK)
    rows = manifest.training_rows()
    test = manifest.select("test") if "split" in manifest.columns else []
    if config.task == "segmentation":
        manifest.require(config.label_column)
        files = [manifest.image_columns(config.image_columns)[0], config.label_column]
        manifest.image_paths(rows + test, files)
        return rows
    y, event, class_names = subject_targets(manifest, rows, config)
    subject_targets(manifest, test, config, class_names)
    if config.task == "survival" and not admissible_pairs(y, event):
        raise BrainDINOError(manifest.path, f"no two training subjects can be compared ({int(event.sum())} events "
                                            f"among {len(rows)} subjects, none outlived by another subject); a "
                                            "survival head needs observed events followed by longer survivors")
    if config.task == "regression" and np.ptp(y) == 0:
        raise BrainDINOError(manifest.path, f"every training row has {config.target_column} {y[0]:g}; a regression "
                                            "head needs targets that vary")
    if config.folds > len(rows):
        raise BrainDINOError(f"{config.folds} folds", f"cannot split {len(rows)} training subjects; use at most "
                                                      f"{len(rows)}")
    manifest.image_paths(rows + test, manifest.image_columns(config.image_columns))
    return rows


def fit_head(manifest: Manifest, session: FeatureSession, config: FitConfig, progress=None,
             cancel=None, store: FeatureStore | None = None) -> FitResult:
    """Fit the head `config.task` asks for (see the module docstring for the manifest's columns); features come
    from `store` when given (see `FeatureSource`)."""
    if config.task == "segmentation":
        return fit_segmentation(manifest, session, config, progress, cancel, store)
    if config.task in SUBJECT_TASKS:
        return fit_subject(manifest, session, config, progress, cancel, store)
    raise BrainDINOError(config.task, UNKNOWN_TASK)
