"""Export a trained teacher as the engine reads it: a BrainDINO teacher checkpoint (with the DINO and iBOT
head tensors) and a float16 safetensors file with its model card."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoints import ModelCard, save_safetensors, save_teacher_checkpoint
from ..slices import PreprocessConfig
from .model import DistillationNetwork


def export_teacher(teacher: DistillationNetwork, output_dir: str | Path, name: str, preprocessing: PreprocessConfig,
                   provenance: dict[str, Any], description: str = "", iteration: int = 0) -> dict[str, Path]:
    """Write `<name>.safetensors` (+ `<name>.json` card) and, for DINOv3 backbones, `teacher_checkpoint.pth`."""
    output_dir = Path(output_dir)
    architecture = teacher.architecture
    card = ModelCard(name=name, architecture=architecture, preprocessing=preprocessing.to_dict(),
                     provenance=provenance, description=description)
    written = {"safetensors": save_safetensors(teacher.backbone, card, output_dir / f"{name}.safetensors")}
    if architecture.family == "dinov3":
        extra: dict[str, torch.Tensor] = {f"{head}.{key}": value.detach().cpu()
                                          for head in ("dino_head", "ibot_head")
                                          for key, value in getattr(teacher, head).state_dict().items()}
        extra["backbone.mask_token"] = teacher.mask_token.detach().cpu()
        written["teacher"] = save_teacher_checkpoint(teacher.backbone, architecture,
                                                     output_dir / "teacher_checkpoint.pth", extra=extra,
                                                     iteration=iteration)
    return written
