"""Fitting a head on the labelled cases listed in a CSV manifest: the one entry point, `fit_head`.

Features come from a `FeatureSession` (with its caches) or a cohort store (`sourcing.py`), so refitting a head
costs seconds. Fitting holds out a validation part (`val_fraction`, fixed seed) for early stopping and reporting,
or runs k-fold cross-validation (`folds`) for the estimate and then fits the final head on all training rows. A
`label_fraction` below 1 trains on that share of the labelled rows (stratified for classes); see `splits.py`.
The work per task family is in `segmentation_fitting.py` and `subject_fitting.py`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BrainDINOError
from ..manifest import Manifest
from ..session import FeatureSession
from .config import FitConfig
from .head import FitResult
from .segmentation_fitting import fit_segmentation
from .subject_fitting import fit_subject
from .tasks import SEGMENTATION, SUBJECT_TASKS, UNKNOWN_TASK

if TYPE_CHECKING:  # the cohort package imports its torch data loading; fitting needs the store's type only
    from ..cohort.store import FeatureStore


def fit_head(manifest: Manifest, session: FeatureSession, config: FitConfig, progress=None,
             cancel=None, store: FeatureStore | None = None) -> FitResult:
    """Fit the head `config.task` asks for (see `cases.py` for what it needs of the manifest); features come
    from `store` when given (see `sourcing.FeatureSource`)."""
    if config.task == SEGMENTATION:
        return fit_segmentation(manifest, session, config, progress, cancel, store)
    if config.task in SUBJECT_TASKS:
        return fit_subject(manifest, session, config, progress, cancel, store)
    raise BrainDINOError(config.task, UNKNOWN_TASK)
