"""`HeadCard`: what a saved head is for, what it predicts, and which encoder's features it was fitted on.

A head is only meaningful on features of the encoder it was fitted on (same weights, same preprocessing,
same blocks), so the card records the encoder's id (name + file hash) and every head refuses features or
an encoder with a different id (`check_encoder`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import BrainDINOError
from ..preprocessing import PreprocessConfig
from .tasks import TASKS

# Distinct colours for label maps (0 = background is never drawn); cycled past the end.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128))


def default_colour(index: int) -> tuple[int, int, int]:
    """The palette colour of class `index` (1-based for foreground classes; 0 is black background)."""
    return (0, 0, 0) if index == 0 else PALETTE[(index - 1) % len(PALETTE)]


@dataclass(frozen=True)
class ClassInfo:
    """One output class: the value it has in label volumes (or its position for subject classes), a name
    and an RGB colour (0-255)."""

    value: int
    name: str
    colour: tuple[int, int, int]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassInfo:
        return cls(int(data["value"]), str(data["name"]), tuple(int(c) for c in data["colour"]))


def make_classes(values: list[int], names: list[str] | None = None) -> list[ClassInfo]:
    """Classes for the given label values, named `names` (else `label <v>` / `background`), palette-coloured."""
    if names is not None and len(names) != len(values):
        raise ValueError(f"{len(names)} class names for {len(values)} classes")
    out = []
    for index, value in enumerate(values):
        name = names[index] if names else ("background" if value == 0 else f"label {value}")
        out.append(ClassInfo(int(value), name, default_colour(index)))
    return out


def names_for_values(values: list[int], names: list[str] | None) -> list[str] | None:
    """Names of the label `values`: `names[v]` when the list covers the largest value (names by value,
    background first), else one name per value in order."""
    if names is None:
        return None
    names = list(names)
    if len(names) > max(values):
        return [names[v] for v in values]
    if len(names) == len(values):
        return names
    raise BrainDINOError("class names", f"{len(names)} names for label values {values}: give one name per "
                                        f"label value 0..{max(values)} or one per class present")


@dataclass
class HeadCard:
    """The JSON description saved with every head.

    `module` holds the constructor arguments of the head's torch module, so `load_head` rebuilds it
    exactly; `extra` holds task data such as a regression target's mean and std; `metrics` what it scored
    when it was fitted.
    """

    task: str
    kind: str  # which head module: e.g. "linear", "decoder", "subject-mlp", "knn"
    encoder_id: str
    classes: list[ClassInfo] = field(default_factory=list)
    layers: tuple[int, ...] = ()  # encoder blocks whose patch tokens it reads (empty: the final output)
    pooling: str = ""  # subject heads: "mean" or "attention"
    modalities: tuple[str, ...] = ()  # subject heads: one input volume per modality, in this order
    preprocessing: PreprocessConfig | None = None  # of the features it was fitted on; None: not recorded
    module: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown head task {self.task!r}; expected one of {', '.join(TASKS)}")
        if isinstance(self.preprocessing, dict):  # as stored in the JSON ({} when not recorded)
            self.preprocessing = PreprocessConfig.from_dict(self.preprocessing) if self.preprocessing else None

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def check_encoder(self, model_id: str, source: object = None) -> None:
        """Refuse features or an encoder other than the one this head was fitted on."""
        if model_id != self.encoder_id:
            raise BrainDINOError(source or "features", f"come from encoder {model_id}, but this {self.task} head "
                                                       f"was fitted on {self.encoder_id}; use that encoder")

    def to_json(self) -> str:
        data = asdict(self)
        data["layers"] = list(self.layers)
        data["modalities"] = list(self.modalities)
        data["preprocessing"] = data["preprocessing"] or {}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HeadCard:
        data = json.loads(text)
        data["classes"] = [ClassInfo.from_dict(c) for c in data.get("classes", [])]
        data["layers"] = tuple(data.get("layers", ()))
        data["modalities"] = tuple(data.get("modalities", ()))
        return cls(**data)
