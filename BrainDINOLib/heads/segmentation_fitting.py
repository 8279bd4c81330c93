"""Fitting a segmentation head on every embedded slice of a manifest's training cases.

Each slice gives the head's input (the tokens of the chosen blocks) and its soft targets (class fractions per
cell); cases are split into training and validation cases, so no case's slices land on both sides.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..manifest import Manifest
from ..session import FeatureSession
from .card import HeadCard, make_classes, names_for_values
from .cases import check_manifest, read_labels
from .config import FitConfig
from .evaluation import mean_over_cases, segmentation_case_metrics
from .head import FitResult, Head
from .segmentation import head_inputs, make_segmentation_module, segmentation_loss, soft_targets
from .sourcing import FeatureSource
from .splits import label_subset, validation_split
from .tasks import SEGMENTATION
from .training import train_module

if TYPE_CHECKING:  # the cohort package imports its torch data loading; fitting needs the store's type only
    from ..cohort.store import FeatureStore


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
    card = HeadCard(task=SEGMENTATION, kind=kind, encoder_id=session.encoder.model_id,
                    classes=make_classes(values, names_for_values(values, config.class_names)), layers=layers,
                    preprocessing=session.preprocessing, module=arguments,
                    extra={"fitted_on": str(manifest.path), "training_cases": len(rows),
                           "resolution": session.policy.to_dict(),
                           "label_fraction": config.label_fraction, "training": config.training.to_dict()},
                    description=f"{kind} segmentation head on {len(rows)} cases of {manifest.path.name}")
    head = Head(card, module.eval())
    metrics: dict = {"task": SEGMENTATION, "training_cases": len(rows)}
    if len(val_cases):
        per_case = [segmentation_case_metrics(head, *cases[i]) for i in val_cases]
        metrics["validation"] = {**mean_over_cases(per_case), "cases": len(per_case)}
    head.card.metrics = metrics
    return FitResult(head, history, metrics)
