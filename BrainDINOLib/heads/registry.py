"""The head registry: which torch module a card's `kind` names, and which function predicts for a task family.

The registry knows none of its members: each head module registers itself where it is defined
(`@register_head_kind("linear", SEGMENTATION)`), and so does each task family's prediction
(`@register_predictor(SEGMENTATION)`). `kinds.py` is the one place that imports every member.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_MODULES: dict[str, type[nn.Module]] = {}  # card.kind -> module class
_TASKS_OF_KIND: dict[str, tuple[str, ...]] = {}  # card.kind -> the tasks it serves
_PREDICTORS: dict[str, Callable[..., Any]] = {}  # card.task -> predict(head, features)


def register_head_kind(name: str, *tasks: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a head module rebuildable from `card.kind == name`; it serves heads of `tasks`."""
    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODULES and _MODULES[name] is not cls:
            raise ValueError(f"head kind {name!r} is registered twice ({_MODULES[name].__name__}, {cls.__name__})")
        _MODULES[name] = cls
        _TASKS_OF_KIND[name] = tasks
        return cls
    return decorate


def register_predictor(*tasks: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Function decorator: `Head.predict` of a head whose task is one of `tasks` calls this function."""
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for task in tasks:
            _PREDICTORS[task] = function
        return function
    return decorate


def head_kinds(task: str | None = None) -> list[str]:
    """The registered kinds (those serving `task` only, when given), sorted."""
    return sorted(name for name in _MODULES if task is None or task in _TASKS_OF_KIND[name])


def tasks_of_kind(kind: str) -> tuple[str, ...]:
    """The tasks a registered kind serves."""
    return _TASKS_OF_KIND[kind]


def create_head_module(kind: str, **arguments: Any) -> nn.Module:
    """A fresh module of `kind` built from its constructor `arguments` (as a card's `module` holds them)."""
    if kind not in _MODULES:
        raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(head_kinds())}")
    return _MODULES[kind](**arguments)


def predictor(task: str) -> Callable[..., Any]:
    """The prediction function registered for `task`."""
    if task not in _PREDICTORS:
        raise ValueError(f"no prediction registered for {task} heads; known: {', '.join(sorted(_PREDICTORS))}")
    return _PREDICTORS[task]
