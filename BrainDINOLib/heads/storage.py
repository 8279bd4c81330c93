"""A head's saved form: safetensors with the card as JSON in the header, and a readable copy of the card.

The file holds the module's tensors with the card as JSON in the safetensors header; a readable copy of
the card is written beside it as `<stem>.json`. Loading rebuilds the module from the card's kind and constructor
arguments (`registry.py`) and loads its tensors strictly, so a reloaded head is bit-identical to the saved one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_path, write_text_atomic
from ..errors import BrainDINOError
from . import kinds  # noqa: F401  (registers every head kind, so that any saved head can be rebuilt)
from .card import HeadCard
from .head import Head
from .registry import create_head_module

HEAD_CARD_KEY = "braindino_head_card"


def build_module(card: HeadCard) -> nn.Module:
    """A fresh module of the card's kind, built from its constructor arguments."""
    return create_head_module(card.kind, **card.module)


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
