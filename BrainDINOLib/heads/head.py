"""`Head`: a fitted head (card + torch module) and its saved form (safetensors + JSON card).

The file holds the module's tensors with the card as JSON in the safetensors header; a readable copy of
the card is written beside it as `<stem>.json`. Loading rebuilds the module from the card's constructor
arguments and loads its tensors strictly, so a reloaded head is bit-identical to the saved one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_path, write_text_atomic
from ..errors import BrainDINOError
from .card import HeadCard

HEAD_CARD_KEY = "braindino_head_card"

# Head module kinds (card.kind) -> constructor; filled by the modules that define them.
MODULE_KINDS: dict[str, Callable[..., nn.Module]] = {}


def register_kind(name: str):
    """Class decorator: make a head module rebuildable from `card.kind == name`."""
    def decorate(cls):
        MODULE_KINDS[name] = cls
        return cls
    return decorate


@dataclass
class Head:
    """A fitted head: what it is (`card`) and its weights (`module`, in eval mode)."""

    card: HeadCard
    module: nn.Module

    @property
    def task(self) -> str:
        return self.card.task

    def predict(self, features_or_list: Any) -> Any:
        """Segmentation heads: `VolumeFeatures` -> label `Volume`. Subject heads: the features of one
        subject (one `VolumeFeatures`, or one per modality in `card.modalities` order) -> dict."""
        if self.task == "segmentation":
            from .segmentation import segment
            return segment(self, features_or_list)
        from .subject import predict_subject
        return predict_subject(self, features_or_list)


def build_module(card: HeadCard) -> nn.Module:
    if card.kind not in MODULE_KINDS:
        raise ValueError(f"unknown head kind {card.kind!r}; known: {', '.join(sorted(MODULE_KINDS))}")
    return MODULE_KINDS[card.kind](**card.module)


def save_head(head: Head, path: str | Path) -> Path:
    """Write the head atomically (tensors + card in one .safetensors file, and the card as `<stem>.json`)."""
    path = Path(path)
    if not path.name.endswith(".safetensors"):
        raise BrainDINOError(path, "a head is saved as a .safetensors file")
    state = {k: v.detach().cpu().contiguous() for k, v in head.module.state_dict().items()}
    text = head.card.to_json()
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={HEAD_CARD_KEY: text})
    write_text_atomic(path.with_name(path.name.split(".")[0] + ".json"), text + "\n")
    return path


def load_head(path: str | Path) -> Head:
    """Read a head written by `save_head`. Raises `BrainDINOError` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise BrainDINOError(path, "no such head file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(HEAD_CARD_KEY)
            if text is None:
                raise BrainDINOError(path, "not a BrainDINO head (no head card in the file)")
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise BrainDINOError(path, f"not a readable head file ({error})") from None
    try:
        card = HeadCard.from_json(text)
        module = build_module(card)
    except (ValueError, TypeError, KeyError, AttributeError) as error:  # invalid JSON, fields or values
        raise BrainDINOError(path, f"the head card in the file is not valid ({type(error).__name__}: {error})") \
            from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        # torch lists every mismatch on its own line after a heading; name the tensors, not the heading.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise BrainDINOError(path, f"head card and tensors do not match: {'; '.join(lines[1:] or lines)}") from None
    return Head(card, module.eval())


def module_state_equal(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold bit-identical tensors under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
