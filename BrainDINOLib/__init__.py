"""BrainDINO engine: brain-MRI volumes in, frozen self-supervised ViT features out, and the maps and heads
built on them. Pure Python (torch, timm, SimpleITK); imports nothing from Slicer or Qt.

The public names below are imported on first use (PEP 562), so `import BrainDINOLib` and the `braindino`
command line start at once and pay for torch, timm or SimpleITK only when a name that needs them is used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Architecture": "architecture",
    "FeatureCache": "cache",
    "Checkpoint": "checkpoints", "ModelCard": "checkpoints", "read_checkpoint": "checkpoints",
    "embed_volume": "embedding",
    "Encoder": "encoder", "Tokens": "encoder", "load_encoder": "encoder", "select_device": "encoder",
    "BrainDINOError": "errors", "CancelledError": "errors",
    "VolumeFeatures": "features",
    "ResolutionPolicy": "resolution",
    "FeatureSession": "session",
    "PreprocessConfig": "preprocessing", "SliceGeometry": "slices", "SliceStack": "slices",
    "Geometry": "volume", "Volume": "volume", "read_label_volume": "volume", "read_volume": "volume",
    "write_volume": "volume",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
