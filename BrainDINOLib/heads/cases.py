"""The labelled cases of a manifest that a fit or an evaluation uses, checked for the head's task before any
features are computed (`BrainDINOLib.manifest` reads the table and checks each value): which rows, which image
columns, the targets (class indices, numbers, survival times and events) and the label volumes."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..errors import BrainDINOError
from ..manifest import Manifest
from ..volume import read_volume
from .card import HeadCard
from .config import FitConfig
from .survival import admissible_pairs
from .tasks import CLASS_TASKS, REGRESSION, SEGMENTATION, SURVIVAL, TASKS, UNKNOWN_TASK


def subject_targets(manifest: Manifest, rows: Sequence[int], config: FitConfig,
                    class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Targets of `rows`: class indices (and the class names), numbers, or (time, event). Every value is
    checked (see `Manifest`); `class_names` are a fitted head's classes, else those found in the rows."""
    task = config.task
    if task in CLASS_TASKS:
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
    if task == REGRESSION:
        return manifest.numbers(rows, config.target_column), None, None
    manifest.require(config.time_column, config.event_column)
    return manifest.numbers(rows, config.time_column, minimum=0), manifest.events(rows, config.event_column), None


def read_labels(manifest: Manifest, row: int, column: str, shape: tuple[int, ...]) -> np.ndarray:
    """The label volume of `row` (non-negative integers on its image's grid `shape`)."""
    path = manifest.resolve(manifest.rows[row][column])
    labels = read_volume(path).array
    if labels.shape != shape:
        raise BrainDINOError(path, f"label grid {labels.shape} differs from its image grid {shape}")
    if np.any(labels < 0) or np.any(labels != np.round(labels)):
        raise BrainDINOError(path, "label volume must hold non-negative integers")
    return labels.astype(np.int64)


def check_manifest(manifest: Manifest, config: FitConfig) -> list[int]:
    """Check, before any features are computed, everything a fit of `config.task` needs from the manifest:
    columns, splits, every training and test target (see `Manifest`), that the targets can teach something
    (two classes, varying numbers, comparable survival pairs) and that every image and label file exists.
    Returns the training rows."""
    if config.task not in TASKS:
        raise BrainDINOError(config.task, UNKNOWN_TASK)
    rows = manifest.training_rows()
    test = manifest.select("test") if "split" in manifest.columns else []
    if config.task == SEGMENTATION:
        _check_segmentation_files(manifest, rows + test, config)
        return rows
    y, event, class_names = subject_targets(manifest, rows, config)
    subject_targets(manifest, test, config, class_names)
    if config.task == SURVIVAL and not admissible_pairs(y, event):
        raise BrainDINOError(manifest.path, f"no two training subjects can be compared ({int(event.sum())} events "
                                            f"among {len(rows)} subjects, none outlived by another subject); a "
                                            "survival head needs observed events followed by longer survivors")
    if config.task == REGRESSION and np.ptp(y) == 0:
        raise BrainDINOError(manifest.path, f"every training row has {config.target_column} {y[0]:g}; a regression "
                                            "head needs targets that vary")
    if config.folds > len(rows):
        raise BrainDINOError(f"{config.folds} folds", f"cannot split {len(rows)} training subjects; use at most "
                                                      f"{len(rows)}")
    manifest.image_paths(rows + test, manifest.image_columns(config.image_columns))
    return rows


def evaluation_config(card: HeadCard, columns: FitConfig | None = None) -> FitConfig:
    """The manifest columns an evaluation of a head with `card` reads: those of `columns`, else the defaults."""
    return replace(columns, task=card.task) if columns else FitConfig(task=card.task)


def subject_image_columns(card: HeadCard, manifest: Manifest, config: FitConfig) -> list[str]:
    """The image columns a subject head reads: those asked for, else the head's modalities, else the manifest's."""
    return list(config.image_columns or card.modalities) or manifest.image_columns()


def evaluation_rows(card: HeadCard, manifest: Manifest, split: str | None = "test",
                    columns: FitConfig | None = None) -> list[int]:
    """The rows an evaluation uses, after checking, before any features are computed, that the manifest suits a head
    with `card`: the split exists, every target is valid for the head's task and classes, every file exists."""
    config = evaluation_config(card, columns)
    rows = manifest.rows_of_split(split)
    if card.task == SEGMENTATION:
        _check_segmentation_files(manifest, rows, config)
        return rows
    images = subject_image_columns(card, manifest, config)
    manifest.require(*images)
    _refuse_label_volumes(manifest, rows, config.label_column, card.task)
    subject_targets(manifest, rows, config, card.class_names or None)
    manifest.image_paths(rows, images)
    return rows


def _check_segmentation_files(manifest: Manifest, rows: list[int], config: FitConfig) -> None:
    """The label column exists, and every row's image (the first image column) and label volume exist."""
    manifest.require(config.label_column)
    manifest.image_paths(rows, [manifest.image_columns(config.image_columns)[0], config.label_column])


def _refuse_label_volumes(manifest: Manifest, rows: list[int], column: str, task: str) -> None:
    """A classification or kNN head evaluated on a segmentation manifest: say so, not "unknown classes"."""
    if task not in CLASS_TASKS or column not in manifest.columns:
        return
    if all(manifest.rows[i][column] and manifest.resolve(manifest.rows[i][column]).is_file() for i in rows):
        raise BrainDINOError(manifest.path, f"its {column} column holds label volumes (a segmentation manifest); "
                                            f"this is a {task} head, which needs class names there")
