"""Few-shot segmentation of the case at hand: label a few axial slices, get the whole volume.

The head is fitted on the labelled slices' tokens only (seconds on a CPU: a few thousand cells per slice,
a small per-cell MLP, full-batch AdamW) and then applied to every slice of the same volume. It is a
normal segmentation head: it can be saved and applied to other volumes from the same encoder.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import BrainDINOError
from ..features import VolumeFeatures
from ..volume import Volume
from .card import HeadCard, make_classes, names_for_values
from .config import HeadTrainingConfig
from .head import Head
from .segmentation import (check_covered, head_inputs, make_segmentation_module, segment, segmentation_loss,
                           soft_targets)
from .tasks import SEGMENTATION
from .training import History, train_module

log = logging.getLogger(__name__)

FEW_SHOT_TRAINING = HeadTrainingConfig(max_epochs=150, learning_rate=3e-3, weight_decay=1e-4, batch_size=0)


@dataclass
class FewShotResult:
    labels: Volume  # label values on the input grid, 0 = background
    head: Head
    class_names: list[str]
    history: History


def few_shot_segment(features: VolumeFeatures, labels: np.ndarray, slice_indices: Sequence[int],
                     class_names: Sequence[str] | None = None, progress: Callable[[int, int], None] | None = None,
                     cancel: Callable[[], bool] | None = None, kind: str = "mlp",
                     config: HeadTrainingConfig = FEW_SHOT_TRAINING, cleanup: bool = False,
                     layers: Sequence[int] | None = None,
                     colours: Mapping[int, tuple[int, int, int]] | None = None) -> FewShotResult:
    """Fit a segmentation head on axial slices `slice_indices` of `labels` (int [Z, Y, X] on the canonical
    grid of the volume `features` came from; only those slices are read) and segment the whole volume.

    Reads the concatenated blocks `layers` (default: every block `features` holds; the final tokens when it
    holds none), interpolated between embedded slices where a labelled slice was not embedded. The classes
    are the label values present on the given slices, background (0) always included; `colours` (by label
    value) override the palette.
    """
    labels = np.asarray(labels)
    source = features.source or "features"
    if labels.shape != tuple(features.slices.volume_shape):
        raise BrainDINOError("labels", f"shape {labels.shape} is not the volume grid {features.slices.volume_shape}")
    if not slice_indices:
        raise BrainDINOError("slice_indices", "give at least one labelled slice")
    slice_indices = sorted({int(k) for k in slice_indices})
    if not all(0 <= k < labels.shape[0] for k in slice_indices):
        raise BrainDINOError("slice_indices", f"{slice_indices} outside the volume's {labels.shape[0]} axial slices")
    labelled = labels[slice_indices]
    if not np.issubdtype(labels.dtype, np.integer) or labelled.min() < 0:
        raise BrainDINOError("labels", "must be non-negative integers on the labelled slices (0 = background)")
    values = sorted({0, *np.unique(labelled).tolist()})
    if len(values) < 2:
        raise BrainDINOError("labels", f"slices {slice_indices} hold no labels other than background")
    layers = tuple(sorted(features.layers if layers is None else layers))
    check_covered(features, slice_indices)
    inputs = head_inputs(features, layers, slice_indices)
    torch.manual_seed(config.seed)
    module, arguments = make_segmentation_module(kind, inputs.shape[1], len(values))
    targets = soft_targets(labels, features.slices, slice_indices, values, module.upscale)
    if module.per_cell:  # train on the cells that touch the head only: the rest is background by the mask
        inside = features.foreground_fraction(slice_indices) > 0
        inputs, targets = (x.permute(0, 2, 3, 1)[inside][:, :, None, None] for x in (inputs, targets))

    def batch_loss(m, index):
        return segmentation_loss(m(inputs[index]), targets[index])

    history = train_module(module, batch_loss, len(inputs), config, progress=progress, cancel=cancel)
    log.info("few-shot head on %d slices of %s: loss %.3f", len(slice_indices), source, history.train_loss[-1])
    classes = [replace(c, colour=tuple(colours[c.value])) if colours and c.value in colours else c
               for c in make_classes(values, names_for_values(values, class_names))]
    card = HeadCard(task=SEGMENTATION, kind=kind, encoder_id=features.model_id, classes=classes, layers=layers,
                    preprocessing=features.preprocessing, module=arguments,
                    extra={"fitted_on": source, "labelled_slices": slice_indices, "training": config.to_dict()},
                    description=f"few-shot segmentation from {len(slice_indices)} labelled slices")
    head = Head(card, module.eval())
    names = card.class_names
    return FewShotResult(segment(head, features, cleanup=cleanup), head, names, history)
