"""Read any supported checkpoint safely, detect what it is, and build its timm backbone strictly.

Supported kinds (the architecture is always read from the tensors themselves):
- `braindino-teacher`: `{"teacher": {"backbone.*": ...}}`, the layout of BrainDINO/DINOv3 training
  checkpoints (the DINO and iBOT heads are dropped);
- `dinov3-state-dict` / `dinov2-state-dict`: plain backbone state dicts in Meta's naming;
- `timm-state-dict`: the same architectures in timm's naming;
- `braindino-safetensors`: our own safetensors file, with a JSON model card in its header.

Pickled checkpoints are opened with `torch.load(weights_only=True)`, so a file that would run code is
refused. Loading is strict: a missing, unexpected or mis-shaped tensor is an error that names it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models import eva, vision_transformer
from torch import nn

from .architecture import Architecture
from .atomic import atomic_path, write_text_atomic
from .errors import BrainDINOError

log = logging.getLogger(__name__)

CARD_KEY = "braindino_model_card"
MODELS_DIR = Path(__file__).parent / "models"
BUILTIN_MODELS = {"demo": MODELS_DIR / "demo.safetensors"}
ASSUMED_HEAD_DIM = 64  # every DINOv2 and DINOv3 ViT up to ViT-H+ uses 64-dim heads


@dataclass
class ModelCard:
    """What a saved encoder is: its architecture, how inputs were preprocessed for it, where it came from."""

    name: str
    architecture: Architecture
    preprocessing: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def to_json(self) -> str:
        data = {"name": self.name, "architecture": self.architecture.to_dict(),
                "preprocessing": self.preprocessing, "provenance": self.provenance,
                "description": self.description}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        return cls(name=data["name"], architecture=Architecture.from_dict(data["architecture"]),
                   preprocessing=data.get("preprocessing", {}), provenance=data.get("provenance", {}),
                   description=data.get("description", ""))


@dataclass
class Checkpoint:
    """A checkpoint as read from disk: its kind, its detected architecture and its backbone tensors."""

    path: Path
    kind: str
    architecture: Architecture
    state_dict: dict[str, torch.Tensor]
    sha256: str
    card: ModelCard | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def model_id(self) -> str:
        """A short, stable identity: name (card or file stem) plus the first 12 hex digits of the file hash."""
        name = self.card.name if self.card else self.path.name.split(".")[0]
        return f"{name}-{self.sha256[:12]}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_source(source: str | Path) -> Path:
    """A built-in model name (`demo`) or a path -> an existing checkpoint path."""
    if str(source) in BUILTIN_MODELS:
        path = BUILTIN_MODELS[str(source)]
        if not path.exists():
            raise BrainDINOError(source, f"the built-in model is not bundled in this installation ({path} is missing)")
        return path
    path = Path(source)
    if not path.exists():
        known = ", ".join(BUILTIN_MODELS)
        raise BrainDINOError(path, f"no such checkpoint file (built-in model names: {known})")
    if path.is_dir():
        raise BrainDINOError(path, "is a folder, not a checkpoint file")
    return path


def _load_tensors(path: Path) -> tuple[Any, dict[str, str]]:
    """The raw object of a checkpoint file and, for safetensors, its header metadata."""
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as error:
            raise BrainDINOError(path, f"not a readable safetensors file ({error})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as error:
        # torch names the refused class or function as "GLOBAL module.name"; anything else is damaged data.
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
        if unsafe is None:
            raise BrainDINOError(path, "not a readable PyTorch checkpoint (corrupt or truncated?)") from None
        raise BrainDINOError(path, "refused: the checkpoint holds pickled objects that are not plain tensors "
                                   f"and loading it could run code ({unsafe.group(1)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BrainDINOError(path, f"not a readable PyTorch checkpoint (corrupt or truncated?): {reason}") from None


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _block_count(state: dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _rope_base(periods: torch.Tensor) -> float:
    """DINOv3 RoPE periods are base ** (2 i / (head_dim / 2)) for i < head_dim / 4: solve for the base."""
    n = periods.numel()
    if n < 2:
        return 100.0
    base = math.exp(math.log(float(periods[-1])) * n / (n - 1))
    return float(f"{base:.3g}")  # periods are often stored in bf16: keep the digits they can carry


def _detect_architecture(state: dict[str, torch.Tensor], family: str, meta_naming: bool, norm_eps: float,
                         notes: list[str]) -> Architecture:
    """Read the architecture off backbone tensors (Meta's or timm's naming)."""
    if any(".mlp.w12." in k or ".mlp.w1." in k for k in state):
        raise BrainDINOError(None, "SwiGLU MLP blocks (ViT-S+/H+/g/7B) are not supported")
    proj = state["patch_embed.proj.weight"]
    embed_dim, in_chans, patch, _ = proj.shape
    depth = _block_count(state)
    periods_key = "rope_embed.periods"
    if family == "dinov3" and periods_key in state:
        num_heads = embed_dim // (4 * state[periods_key].numel())
        rope_base = _rope_base(state[periods_key].float())
    else:
        num_heads = embed_dim // ASSUMED_HEAD_DIM
        rope_base = 100.0
        notes.append(f"num_heads={num_heads} assumed from head_dim {ASSUMED_HEAD_DIM} (not stored in the tensors)")
    registers_key = ("storage_tokens" if family == "dinov3" else "register_tokens") if meta_naming else "reg_token"
    registers = state[registers_key].shape[1] if registers_key in state else 0
    qkv_bias = "blocks.0.attn.qkv.bias" in state or "blocks.0.attn.q_bias" in state
    layer_scale = any(k.startswith("blocks.0.ls1.") or k == "blocks.0.gamma_1" for k in state)
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    pos_grid = 0
    if family == "dinov2":
        tokens = state["pos_embed"].shape[1]
        pos_grid = math.isqrt(tokens) if math.isqrt(tokens) ** 2 == tokens else math.isqrt(tokens - 1)
    return Architecture(family=family, embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch,
                        in_chans=in_chans, num_register_tokens=registers, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                        layer_scale=layer_scale, norm_eps=norm_eps, rope_base=rope_base, pos_embed_grid=pos_grid)


def _family_of(state: dict[str, torch.Tensor]) -> tuple[str, bool] | None:
    """(family, uses Meta's naming) from characteristic keys, or None when unrecognised."""
    if "patch_embed.proj.weight" not in state or "blocks.0.norm1.weight" not in state:
        return None
    if "storage_tokens" in state or "rope_embed.periods" in state:
        return "dinov3", True
    if "pos_embed" not in state and ("blocks.0.gamma_1" in state or "reg_token" in state):
        return "dinov3", False
    if "pos_embed" in state and ("mask_token" in state or "register_tokens" in state):
        return "dinov2", True
    if "pos_embed" in state:
        return "dinov2", False
    return None


def read_checkpoint(source: str | Path) -> Checkpoint:
    """Open a checkpoint (path or built-in name), detect its kind and architecture. No model is built."""
    path = resolve_source(source)
    raw, metadata = _load_tensors(path)
    card = None
    notes: list[str] = []
    if CARD_KEY in metadata:
        try:
            card = ModelCard.from_json(metadata[CARD_KEY])
            if card.architecture.family not in ("dinov2", "dinov3"):
                raise ValueError(f"unknown architecture family {card.architecture.family!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # invalid JSON, fields, values
            raise BrainDINOError(path, f"the model card in the file is not valid ({type(error).__name__}: "
                                       f"{error})") from None
        kind, state = "braindino-safetensors", raw
    elif isinstance(raw, dict) and isinstance(raw.get("teacher"), dict):
        kind, state = "braindino-teacher", _strip_prefix(raw["teacher"], "backbone.")
    elif isinstance(raw, dict):
        state = next((raw[k] for k in ("model", "state_dict") if isinstance(raw.get(k), dict)), raw)
        if all(k.startswith("module.") for k in state):
            state = _strip_prefix(state, "module.")
        kind = None
    else:
        raise BrainDINOError(path, f"unknown checkpoint kind: expected a dict of tensors, found {type(raw).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BrainDINOError(path, "unknown checkpoint kind: not a flat dict of tensors")
    detected = _family_of(state)
    if detected is None:
        sample = ", ".join(list(state)[:5]) or "no tensors"
        raise BrainDINOError(path, "unknown checkpoint kind: not a DINOv3/DINOv2 ViT, BrainDINO teacher or "
                                   f"BrainDINO safetensors file (first keys: {sample})")
    family, meta_naming = detected
    if kind is None:
        kind = f"{family}-state-dict" if meta_naming else "timm-state-dict"
    # LayerNorm eps cannot be read from tensors: BrainDINO teachers and DINOv2 use 1e-6, Meta's DINOv3
    # release (and timm's port of it) 1e-5.
    norm_eps = 1e-5 if family == "dinov3" and kind != "braindino-teacher" else 1e-6
    try:
        architecture = card.architecture if card else _detect_architecture(state, family, meta_naming, norm_eps, notes)
    except BrainDINOError as error:
        raise BrainDINOError(path, error.problem) from None
    return Checkpoint(path, kind, architecture, state, file_sha256(path), card, notes)


def _to_timm_keys(state: dict[str, torch.Tensor], model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """Rename Meta-layout tensors to timm's (timm's own converters; timm-layout input passes through)."""
    state = {k: v for k, v in state.items() if not k.endswith(".bias_mask")}
    if family == "dinov3":
        state = {k: v for k, v in state.items() if k != "mask_token"}
        return eva.checkpoint_filter_fn(state, model)
    return vision_transformer.checkpoint_filter_fn(state, model)


def load_backbone(checkpoint: Checkpoint) -> nn.Module:
    """Build the timm backbone for `checkpoint` and load its tensors strictly, in eval mode."""
    model = checkpoint.architecture.build()
    state = _to_timm_keys(dict(checkpoint.state_dict), model, checkpoint.architecture.family)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        raise BrainDINOError(checkpoint.path, f"does not match {checkpoint.architecture.describe()}: "
                                              + "; ".join(parts))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BrainDINOError(checkpoint.path, f"tensor {key} has shape {tuple(tensor.shape)}, "
                                                  f"expected {tuple(expected[key].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def save_safetensors(model: nn.Module, card: ModelCard, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save a timm backbone with its model card (in the header and as a readable `<stem>.json` beside it)."""
    path = Path(path)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={CARD_KEY: card.to_json()})
    write_text_atomic(path.with_name(path.name.split(".")[0] + ".json"), card.to_json() + "\n")
    return path


def dinov3_meta_state_dict(model: nn.Module, architecture: Architecture) -> dict[str, torch.Tensor]:
    """The inverse of timm's DINOv3 conversion: a timm `Eva` state dict in Meta's/BrainDINO's naming."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if key.endswith("attn.q_bias"):
            v_bias = model.state_dict()[key.replace("q_bias", "v_bias")]
            out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias.cpu()])
            continue
        if key.endswith("attn.v_bias") or key.startswith("rope."):
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[key] = value
    n_periods = architecture.head_dim // 4
    exponents = 2 * torch.arange(n_periods, dtype=torch.float32) / (architecture.head_dim // 2)
    out["rope_embed.periods"] = architecture.rope_base ** exponents
    out["mask_token"] = torch.zeros(1, architecture.embed_dim)
    return out


def save_teacher_checkpoint(model: nn.Module, architecture: Architecture, path: str | Path,
                            extra: dict[str, torch.Tensor] | None = None, iteration: int = 0) -> Path:
    """Save a DINOv3-family timm backbone in the BrainDINO teacher layout that `read_checkpoint` reads."""
    if architecture.family != "dinov3":
        raise ValueError("the BrainDINO teacher layout is defined for DINOv3 backbones only")
    teacher = {f"backbone.{k}": v for k, v in dinov3_meta_state_dict(model, architecture).items()}
    teacher.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save({"teacher": teacher, "iteration": iteration}, tmp)
    return Path(path)
