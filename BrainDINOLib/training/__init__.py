"""Self-supervised pretraining (DINOv2/DINOv3-style self-distillation) on axial brain-MRI slices.

`prepare_slices` turns volumes into slice shards; `load_config` reads a YAML config; `pretrain` runs the
distributed, resumable training loop and exports the teacher as checkpoints the engine reads. The
torchrun entry point is Training/pretrain.py; the CLI has `braindino prepare-slices` and `braindino pretrain`.
"""
from .config import TrainConfig, load_config
from .shards import SliceShards, prepare_slices
from .trainer import PretrainResult, pretrain

__all__ = ["PretrainResult", "SliceShards", "TrainConfig", "load_config", "prepare_slices", "pretrain"]
