"""Pretraining configuration as dataclasses, read from YAML.

A config file has one section per dataclass below (`data`, `synthetic`, `crops`, `model`, `loss`, `optim`, `run`); every
field has a default, so a file only states what differs. Unknown keys are an error that names them, so a
typo never silently falls back to a default. Command-line overrides use dotted keys (`optim.steps=10`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import BrainDINOError


@dataclass(frozen=True)
class DataConfig:
    """Where the slices come from: prepared shards (`braindino prepare-slices`) and/or synthetic brains, mixed
    by weight (each step holds round(batch x synthetic share) synthetic slices, the rest from the shards)."""

    shards: str = ""
    num_workers: int = 0  # DataLoader worker processes per rank; 0 builds batches in the training process
    shards_weight: float = 1.0
    synthetic_weight: float = 0.0  # > 0 mixes in SynthSeg-style brains (the `synthetic` section)
    prefetch_factor: int = 4  # batches each worker prepares ahead


@dataclass(frozen=True)
class SyntheticConfig:
    """SynthSeg-style brains generated on the fly from the bundled label maps (`training/synthbrain.py`)."""

    image_size: int = 224  # used when no shards are mixed in (otherwise the shards' size)
    spacing_mm: float = 1.0  # grid of the label maps (2 builds them 8x faster, for tests)
    contrast_weights: tuple[float, float, float, float, float] = (1.0, 1.0, 1.0, 0.5, 1.5)  # T1 T2 FLAIR PD random
    structure_jitter: float = 0.1  # relative jitter of each structure's signal in the MRI-like contrasts
    texture: float = 0.03  # within-structure voxel noise (relative std)
    skull_strip_probability: float = 0.3
    tilt_deg: float = 10.0  # plane tilt about the left-right and anterior-posterior axes
    rotation_deg: float = 10.0  # in-plane
    scaling: float = 0.1  # relative, per in-plane axis
    elastic_mm: float = 2.0  # std of the smooth displacement
    low_resolution_probability: float = 0.5  # a thick-slice or anisotropic acquisition
    max_spacing_mm: float = 5.0  # thickest slice and coarsest in-plane axis of a low-resolution acquisition
    bias: float = 0.3  # largest std of the log bias field
    noise: tuple[float, float] = (0.0, 0.04)  # Rician noise std relative to the brightest structure


@dataclass(frozen=True)
class CropConfig:
    """Multi-crop views and MRI augmentation (no colour jitter: MRI is grey and its contrast is the signal)."""

    global_size: int = 128
    global_scale: tuple[float, float] = (0.32, 1.0)  # fraction of the slice area a global crop covers
    local_count: int = 6
    local_size: int = 64
    local_scale: tuple[float, float] = (0.05, 0.32)
    flip_probability: float = 0.5  # left-right (the brain is nearly symmetric); up-down flips are not used
    max_rotation_deg: float = 10.0
    max_shear: float = 0.05
    max_aspect_change: float = 0.1  # log-uniform in [-x, x] on the crop's aspect ratio
    gamma_probability: float = 0.5
    gamma_range: tuple[float, float] = (0.7, 1.5)
    bias_field_probability: float = 0.5
    bias_field_coefficients: tuple[float, float] = (0.0, 0.3)
    noise_probability: float = 0.3
    noise_std: float = 0.08
    contrast_probability: float = 0.5
    contrast_range: tuple[float, float] = (0.75, 1.25)
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.0)


@dataclass(frozen=True)
class ModelConfig:
    """The backbone (a timm DINOv3 ViT by default) or a checkpoint to continue pretraining from."""

    family: Literal["dinov3", "dinov2"] = "dinov3"
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    patch_size: int = 16
    in_chans: int = 1
    num_register_tokens: int = 4
    drop_path_rate: float = 0.1
    # LayerScale gammas of a fresh backbone. The engine's 1e-5 (DINOv3's) suits long runs; in a short run the
    # blocks then barely contribute, every image's CLS token is the same, the teacher's targets are uniform
    # and the heads settle on uniform outputs (DINO's collapse). Short runs from scratch want ~1.
    layer_scale_init: float = 1e-5
    init_from: str = ""  # any checkpoint the engine reads: its architecture and weights replace the fields above


@dataclass(frozen=True)
class LossConfig:
    """DINO (CLS) + iBOT (masked patches) + KoLeo, with their projection heads."""

    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    prototypes: int = 2048
    ibot_prototypes: int = 2048
    student_temperature: float = 0.1
    teacher_temperature: tuple[float, float] = (0.04, 0.07)  # linear warm-up from the first to the second
    teacher_temperature_warmup_fraction: float = 0.3
    target: Literal["sinkhorn", "centering"] = "sinkhorn"
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_sample_probability: float = 0.5  # fraction of global crops that get masked for iBOT
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # fraction of patches masked in a masked crop


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with cosine schedules, sqrt batch-size scaling of the lr, layer-wise lr decay and clipping."""

    steps: int = 1000
    batch_size: int = 32  # slices per process per step
    base_lr: float = 2e-3  # lr = base_lr * sqrt(total batch / 1024)
    min_lr: float = 1e-6
    warmup_fraction: float = 0.1
    weight_decay: tuple[float, float] = (0.04, 0.2)  # cosine from the first to the second
    momentum: tuple[float, float] = (0.99, 1.0)  # teacher EMA momentum, cosine
    layer_decay: float = 0.9
    clip_grad: float = 3.0
    freeze_prototypes_fraction: float = 0.05  # the prototype layers stay fixed for the first steps (stability)
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class RunConfig:
    """Output folder, checkpoint and log cadence, seed, threads."""

    output_dir: str = "runs/pretrain"
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    num_threads: int = 0  # torch CPU threads per process; 0 leaves torch's default
    export_name: str = "braindino-pretrained"


@dataclass(frozen=True)
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


def _plain(value: Any) -> Any:
    """Tuples as lists, so the YAML is plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """A dataclass from a dict, converting lists to tuples where the default is a tuple."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)}")
    defaults = cls()
    values = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{name} must be a mapping")
            values[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or len(value) != len(default):
                raise ValueError(f"{where}.{name} must be a list of {len(default)} values")
            values[name] = tuple(type(d)(v) for d, v in zip(default, value))
        elif isinstance(default, bool):
            values[name] = bool(value)
        elif isinstance(default, (int, float)) and not isinstance(value, (int, float)):
            raise ValueError(f"{where}.{name} must be a number, got {value!r}")
        else:
            values[name] = type(default)(value) if default is not None and value is not None else value
    return replace(defaults, **values)


def config_from_dict(data: dict[str, Any]) -> PretrainConfig:
    return _build(PretrainConfig, data or {}, "config")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read a YAML config (or start from the defaults) and apply `section.key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise BrainDINOError(path, f"not a readable YAML config ({str(error).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise BrainDINOError(path, "a config must be a mapping of sections (data, crops, model, ...)")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise BrainDINOError(item, "an override must look like section.key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(text))
    try:
        return config_from_dict(data)
    except (ValueError, TypeError) as error:
        raise BrainDINOError(path or "overrides", str(error)) from None
