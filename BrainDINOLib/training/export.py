"""Export a trained teacher as the engine reads it: a BrainDINO teacher checkpoint (with the DINO and iBOT
head tensors) and a float16 safetensors file with its model card."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoints import ModelCard, save_safetensors, save_teacher_checkpoint
from ..errors import BrainDINOError
from ..slices import PreprocessConfig
from .model import DistillationNetwork


def export_teacher(teacher: DistillationNetwork, output_dir: str | Path, name: str, preprocessing: PreprocessConfig,
                   provenance: dict[str, Any], description: str = "", iteration: int = 0,
                   teacher_checkpoint: bool = True) -> dict[str, Path]:
    """Write `<name>.safetensors` (float16, + `<name>.json` card) and, unless told not to,
    `teacher_checkpoint.pth` (float32, the teacher layout in Meta's naming, with the DINO and iBOT heads)."""
    output_dir = Path(output_dir)
    architecture = teacher.architecture
    card = ModelCard(name=name, architecture=architecture, preprocessing=preprocessing,
                     provenance=provenance, description=description)
    written = {"safetensors": save_safetensors(teacher.backbone, card, output_dir / f"{name}.safetensors")}
    if teacher_checkpoint:
        extra: dict[str, torch.Tensor] = {f"{head}.{key}": value.detach().cpu()
                                          for head in ("dino_head", "ibot_head")
                                          for key, value in getattr(teacher, head).state_dict().items()}
        extra["backbone.mask_token"] = teacher.mask_token.detach().cpu()
        written["teacher"] = save_teacher_checkpoint(teacher.backbone, architecture,
                                                     output_dir / "teacher_checkpoint.pth", extra=extra,
                                                     iteration=iteration)
    return written


def export_training_checkpoint(checkpoint: str | Path, output_dir: str | Path, name: str, description: str = "",
                               notes: dict[str, Any] | None = None, teacher_checkpoint: bool = True) -> dict[str, Path]:
    """Export the teacher of a pretraining checkpoint (`<run>/checkpoint.pth`, also of a run still going)."""
    from .config import config_from_dict
    from .model import build_network
    from .shards import SliceShards

    if not Path(checkpoint).is_file():
        raise BrainDINOError(checkpoint, "no such training checkpoint (<run.output_dir>/checkpoint.pth)")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = config_from_dict(state["config"])
    teacher = build_network(config.model, config.loss)
    teacher.load_state_dict(state["teacher_network"])
    shards = SliceShards(config.data.shards)
    step = int(state["step"])
    provenance = {"steps": step, "of_steps": config.optim.steps, "slices": len(shards),
                  "volumes": [Path(v["path"]).name for v in shards.index["volumes"]], "config": config.to_dict(),
                  **(notes or {})}
    return export_teacher(teacher, output_dir, name, shards.preprocessing, provenance,
                          description=description or f"teacher of {checkpoint} at step {step}", iteration=step,
                          teacher_checkpoint=teacher_checkpoint)
