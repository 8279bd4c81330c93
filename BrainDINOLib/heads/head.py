"""`Head`: a fitted head, its card and its torch module; `FitResult`: a head with how its fit went.

Saving and loading live in `storage.py`; the functions that predict register per task family (`registry.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .card import HeadCard
from .registry import predictor
from .training import History


@dataclass
class Head:
    """A fitted head: what it is (`card`) and its weights (`module`, in eval mode)."""

    card: HeadCard
    module: nn.Module

    @property
    def task(self) -> str:
        return self.card.task

    def predict(self, features_or_list: Any) -> Any:
        """Segmentation heads: `VolumeFeatures` -> label `Volume` (`segment`). Subject heads: the features of one
        subject (one `VolumeFeatures`, or one per modality in `card.modalities` order) -> dict (`predict_subject`)."""
        return predictor(self.task)(self, features_or_list)


@dataclass
class FitResult:
    """A head fitted on a manifest, its training history and its validation (or cross-validation) metrics."""

    head: Head
    history: History
    metrics: dict
