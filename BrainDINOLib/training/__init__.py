"""Self-supervised pretraining (DINOv2/DINOv3-style self-distillation) on axial brain-MRI slices.

`prepare_slices` turns volumes into slice shards; `load_config` reads a YAML config; `pretrain` runs the
distributed, resumable training loop and exports the teacher as checkpoints the engine reads. The
torchrun entry point is Training/pretrain.py; the CLI has `braindino prepare-slices` and `braindino pretrain`.
The names are imported on first use, so the command line can register its options without loading torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"PretrainConfig": "config", "load_config": "config", "SliceShards": "shards", "prepare_slices": "shards",
            "PretrainResult": "trainer", "pretrain": "trainer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
