"""Cohorts: thousands of volumes embedded once, across processes, GPUs and nodes (torchrun), into a resumable
feature store that head fitting and evaluation read instead of embedding again.

`read_cohort` lists a manifest's (or folder's) images; `embed_cohort` fills a `FeatureStore` (per-volume feature
files in the cache format plus index.json); `FeatureStore.open(...).features(path)` reads them back. The names are
imported on first use, so the command line can register its options without loading torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Cohort": "items", "CohortEntry": "items", "read_cohort": "items",
            "FeatureStore": "store", "StoreIdentity": "store", "VolumeRecord": "store",
            "CohortSummary": "run", "cohort_identity": "run", "embed_cohort": "run", "plan_run": "run"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
