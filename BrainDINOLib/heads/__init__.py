"""Heads on frozen BrainDINO features: segmentation (incl. few-shot), subject-level classification,
regression and survival, and a kNN probe; their saved form, fitting from CSV manifests, metrics and plots.

The tree follows the data path. Names: `tasks` (the task families), `config` (what a fit is asked).
Heads: `card` (what a head is), `registry` (kind -> module, task -> prediction; members register themselves,
`kinds` imports them all), `head` (a fitted head), `storage` (its file), `segmentation`, `subject`, `knn`
(the modules and their predictions), `survival` (Cox loss, C-index, risk groups). Fitting: `cases` (what a
manifest holds for a task, checked), `sourcing` (features from the one feature owner), `splits`,
`training` (the optimisation loop), `segmentation_fitting`, `subject_fitting`, `fitting` (the entry point),
`fewshot` and `painted` (a few painted slices of one volume). Scoring: `evaluation`, `metrics`, `plots`.

The public names below are imported on first use (PEP 562), like the package above: the command line reads
`tasks` and `config` without paying for torch.
"""
from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it (relative to this package).
_EXPORTS = {
    "ClassInfo": ".card", "HeadCard": ".card",
    "FitConfig": ".config", "HeadTrainingConfig": ".config",
    "Evaluation": ".evaluation", "evaluate": ".evaluation", "write_report": ".evaluation",
    "FewShotResult": ".fewshot", "few_shot_segment": ".fewshot",
    "fit_head": ".fitting",
    "FitResult": ".head", "Head": ".head",
    "Manifest": "..manifest",
    "head_kinds": ".registry",
    "keep_largest_components": ".segmentation", "segment": ".segmentation",
    "FeatureSource": ".sourcing",
    "load_head": ".storage", "save_head": ".storage",
    "predict_subject": ".subject", "slice_tokens": ".subject",
    "TASKS": ".tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
