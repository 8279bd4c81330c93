"""Schedules and the optimizer: cosine lr (linear warm-up, sqrt batch scaling), cosine weight decay and
teacher momentum, teacher-temperature warm-up, and AdamW parameter groups with layer-wise lr decay.

Schedules are pure functions of the step, so a resumed run needs no scheduler state.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import LossConfig, OptimConfig


def cosine(start: float, end: float, progress: float) -> float:
    """From `start` (progress 0) to `end` (progress 1) along half a cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepValues:
    lr: float
    weight_decay: float
    momentum: float
    teacher_temperature: float
    freeze_prototypes: bool


class Schedules:
    def __init__(self, optim: OptimConfig, loss: LossConfig, total_batch: int):
        self.optim, self.loss = optim, loss
        self.peak_lr = optim.base_lr * math.sqrt(total_batch / 1024)
        self.warmup = max(1, round(optim.warmup_fraction * optim.steps))

    def at(self, step: int) -> StepValues:
        o, loss = self.optim, self.loss
        if step < self.warmup:
            lr = self.peak_lr * (step + 1) / self.warmup
        else:
            lr = cosine(self.peak_lr, o.min_lr, (step - self.warmup) / max(1, o.steps - self.warmup))
        progress = step / max(1, o.steps - 1)
        temperature_steps = max(1, round(loss.teacher_temperature_warmup_fraction * o.steps))
        low, high = loss.teacher_temperature
        temperature = low + (high - low) * min(1.0, step / temperature_steps)
        return StepValues(lr=lr, weight_decay=cosine(*o.weight_decay, progress),
                          momentum=cosine(*o.momentum, progress), teacher_temperature=temperature,
                          freeze_prototypes=step < round(o.freeze_prototypes_fraction * o.steps))


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings (patch embedding, class/register/mask tokens), i + 1 for block i, depth + 1 for
    the final norm and the heads."""
    if name.startswith("backbone.blocks."):
        return int(re.match(r"backbone\.blocks\.(\d+)\.", name).group(1)) + 1
    if name.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.reg_token", "mask_token",
                        "backbone.pos_embed")):
        return 0
    return depth + 1


def _decays(name: str, parameter: nn.Parameter) -> bool:
    """Weight decay applies to weight matrices only: not to biases, norms, LayerScale or tokens."""
    return parameter.ndim > 1 and not name.endswith(("token", "pos_embed")) and "prototypes" not in name


def build_optimizer(network: nn.Module, depth: int, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW with one group per (layer, decays?) pair; each group carries its `lr_scale` and `wd_scale`."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        layer, decays = layer_id(name, depth), _decays(name, parameter)
        group = groups.setdefault((layer, decays), {
            "params": [], "lr_scale": config.layer_decay ** (depth + 1 - layer), "wd_scale": 1.0 if decays else 0.0})
        group["params"].append(parameter)
    ordered = [groups[key] for key in sorted(groups)]
    return torch.optim.AdamW(ordered, lr=0.0, betas=config.betas, weight_decay=0.0)


def apply_step_values(optimizer: torch.optim.Optimizer, values: StepValues) -> None:
    for group in optimizer.param_groups:
        group["lr"] = values.lr * group["lr_scale"]
        group["weight_decay"] = values.weight_decay * group["wd_scale"]


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)
