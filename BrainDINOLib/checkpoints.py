"""Read any supported checkpoint safely, detect what it is, and build its timm backbone strictly.

Supported kinds (the architecture is always read from the tensors themselves):
- `braindino-teacher`: `{"teacher": {"backbone.*": ...}}`, the layout of BrainDINO/DINOv3 training
  checkpoints (the DINO and iBOT heads are dropped);
- `dinov3-state-dict` / `dinov2-state-dict`: plain backbone state dicts in Meta's naming;
- `timm-state-dict`: the same architectures in timm's naming;
- `braindino-safetensors`: our own safetensors file, with a JSON model card in its header.

Pickled checkpoints are opened with `torch.load(weights_only=True)` (large ones memory-mapped, so reading a
7B file allocates nothing), so a file that would run code is refused. Loading is strict: a missing, unexpected or
mis-shaped tensor is an error that names it. What the tensors cannot tell (LayerNorm eps, how a DINOv2
position grid is resized) is the family's released value unless the file records it, and is noted.
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

from .architecture import FAMILY_NAMES, POS_EMBED_RESIZES, Architecture, parameter_count
from .atomic import atomic_path, write_text_atomic
from .errors import BrainDINOError
from .memory import ensure_fits
from .preprocessing import PreprocessConfig

log = logging.getLogger(__name__)

CARD_KEY = "braindino_model_card"
MODELS_DIR = Path(__file__).parent / "models"
BUILTIN_MODELS = {"demo": MODELS_DIR / "demo.safetensors"}
ASSUMED_HEAD_DIM = 64  # every DINOv2 and DINOv3 ViT up to ViT-H+ uses 64-dim heads
TEACHER_ARCHITECTURE_KEY = "braindino_architecture"  # our teacher files record what tensors cannot tell
# Tensors of Meta's DINOv3 checkpoints that inference never uses: the iBOT mask token and the LayerNorm the
# 7B (and the satellite ViT-L) apply to local-crop CLS tokens in training only.
TRAINING_ONLY = ("mask_token", "local_cls_norm.weight", "local_cls_norm.bias")
# Files this large are memory-mapped, so their tensors take no memory before the fit check in `load_backbone`.
# Smaller ones are read whole: a mapped file stays locked on Windows while its checkpoint is in use.
MMAP_FROM_BYTES = 1 << 30


@dataclass
class ModelCard:
    """What a saved encoder is: its architecture, how inputs were preprocessed for it, where it came from.

    `preprocessing` None: the card names none, and the engine's defaults apply (written as `{}`)."""

    name: str
    architecture: Architecture
    preprocessing: PreprocessConfig | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def to_json(self) -> str:
        data = {"name": self.name, "architecture": self.architecture.to_dict(),
                "preprocessing": self.preprocessing.to_dict() if self.preprocessing else {},
                "provenance": self.provenance, "description": self.description}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        preprocessing = data.get("preprocessing")
        return cls(name=data["name"], architecture=Architecture.from_dict(data["architecture"]),
                   preprocessing=PreprocessConfig.from_dict(preprocessing) if preprocessing else None,
                   provenance=data.get("provenance", {}),
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
        mmap = path.stat().st_size >= MMAP_FROM_BYTES and zipfile.is_zipfile(path)  # torch's zip format only
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), {}
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


def _feed_forward(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(FFN kind, width of its hidden activation) from block 0's FFN tensors, in Meta's or timm's naming."""
    if "blocks.0.mlp.w12.weight" in state:  # Meta's DINOv2-g: gate and value packed in one projection
        return "swiglu-packed", state["blocks.0.mlp.w12.weight"].shape[0] // 2
    for gate in ("blocks.0.mlp.w1.weight", "blocks.0.mlp.fc1_g.weight"):  # Meta's / timm's DINOv3 SwiGLU
        if gate in state:
            return "swiglu", state[gate].shape[0]
    if "blocks.0.mlp.fc1.weight" not in state or "blocks.0.mlp.fc2.weight" not in state:
        sample = ", ".join(k for k in state if k.startswith("blocks.0.mlp.")) or "none"
        raise BrainDINOError(None, f"unrecognised feed-forward block (block 0 FFN tensors: {sample})")
    fc1, fc2 = state["blocks.0.mlp.fc1.weight"].shape[0], state["blocks.0.mlp.fc2.weight"].shape[1]
    if fc1 == 2 * fc2:  # timm's packed SwiGLU (DINOv2-g in timm's naming)
        return "swiglu-packed", fc2
    return "mlp", fc1


def _check_k_bias(state: dict[str, torch.Tensor]) -> None:
    """timm's Eva has no k bias (as Meta's DINOv3 releases, which mask it). A qkv bias whose k third would
    act (no `bias_mask` zeroing it, and non-zero) cannot be expressed: refuse it, naming the tensor."""
    for key, bias in state.items():
        if not key.endswith("attn.qkv.bias"):
            continue
        k_third = slice(bias.shape[0] // 3, 2 * bias.shape[0] // 3)
        mask = state.get(key.replace("qkv.bias", "qkv.bias_mask"))
        effective = bias[k_third] * mask[k_third] if mask is not None else bias[k_third]
        if bool(effective.float().abs().max() > 0):
            raise BrainDINOError(None, f"{key} has a non-zero k bias that is not masked: DINOv3 backbones "
                                       "(Meta's and timm's) use no k bias")


def _detect_architecture(state: dict[str, torch.Tensor], family: str, meta_naming: bool, norm_eps: float,
                         notes: list[str]) -> Architecture:
    """Read the architecture off backbone tensors (Meta's or timm's naming)."""
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
    if family == "dinov3" and meta_naming:
        _check_k_bias(state)
    registers_key = ("storage_tokens" if family == "dinov3" else "register_tokens") if meta_naming else "reg_token"
    registers = state[registers_key].shape[1] if registers_key in state else 0
    qkv_bias = "blocks.0.attn.qkv.bias" in state or "blocks.0.attn.q_bias" in state
    layer_scale = any(k.startswith("blocks.0.ls1.") or k == "blocks.0.gamma_1" for k in state)
    ffn, hidden = _feed_forward(state)
    pos_grid = 0
    if family == "dinov2":
        tokens = state["pos_embed"].shape[1]
        pos_grid = math.isqrt(tokens) if math.isqrt(tokens) ** 2 == tokens else math.isqrt(tokens - 1)
    try:
        return Architecture(family=family, embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch,
                            in_chans=in_chans, num_register_tokens=registers, mlp_ratio=hidden / embed_dim,
                            qkv_bias=qkv_bias, layer_scale=layer_scale, norm_eps=norm_eps, rope_base=rope_base,
                            pos_embed_grid=pos_grid, ffn=ffn)
    except ValueError as error:
        raise BrainDINOError(None, str(error)) from None


def _assumed_settings_notes(architecture: Architecture, kind: str) -> list[str]:
    """Say what was taken from the family's releases rather than read from the file."""
    family = FAMILY_NAMES[architecture.family]
    source = "BrainDINO teachers" if kind == "braindino-teacher" else f"Meta's {family} releases"
    notes = [f"LayerNorm eps {architecture.norm_eps:g} assumed, as in {source} (not stored in the tensors)"]
    if architecture.family == "dinov2":
        registers = "with" if architecture.num_register_tokens else "without"
        notes.append(f"position grid resized {POS_EMBED_RESIZES[architecture.pos_embed_resize]}, as Meta's hub "
                     f"runs DINOv2 models {registers} registers (the tensors cannot tell)")
    return notes


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
    recorded: dict[str, Any] | None = None  # an architecture the file states (our model cards and teachers)
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
        recorded = raw.get(TEACHER_ARCHITECTURE_KEY)
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
        if card is not None:
            architecture = card.architecture
        elif recorded is not None:
            architecture = Architecture.from_dict(recorded)
        else:
            architecture = _detect_architecture(state, family, meta_naming, norm_eps, notes)
            notes.extend(_assumed_settings_notes(architecture, kind))
    except BrainDINOError as error:
        raise BrainDINOError(path, error.problem) from None
    except (ValueError, TypeError) as error:
        raise BrainDINOError(path, f"invalid recorded architecture ({error})") from None
    if "local_cls_norm.weight" in state:
        notes.append("local_cls_norm (training-only LayerNorm of local-crop CLS tokens) is not used for inference")
    return Checkpoint(path, kind, architecture, state, file_sha256(path), card, notes)


def _to_timm_keys(state: dict[str, torch.Tensor], model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """Rename Meta-layout tensors to timm's (timm's own converters; timm-layout input passes through).

    DINOv3's RoPE periods (read into the architecture) and k-bias masks (checked by `_check_k_bias`) are
    buffers timm computes itself."""
    if family == "dinov3":
        state = {k: v for k, v in state.items()
                 if k not in TRAINING_ONLY and not k.endswith(".bias_mask") and k != "rope_embed.periods"}
        return eva.checkpoint_filter_fn(state, model)
    return vision_transformer.checkpoint_filter_fn(state, model)  # also drops DINOv2's mask token


def _bounded_list(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "")


def backbone_skeleton(checkpoint: Checkpoint) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The checkpoint's timm backbone on the meta device (shapes only, no memory) and its tensors in timm's
    naming, checked strictly against it: a missing, unexpected or mis-shaped tensor is an error naming it."""
    with torch.device("meta"):
        model = checkpoint.architecture.build()
    state = _to_timm_keys(dict(checkpoint.state_dict), model, checkpoint.architecture.family)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {_bounded_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {_bounded_list(unexpected)}")
        raise BrainDINOError(checkpoint.path, f"does not match {checkpoint.architecture.describe()}: "
                                              + "; ".join(parts))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BrainDINOError(checkpoint.path, f"tensor {key} has shape {tuple(tensor.shape)}, "
                                                  f"expected {tuple(expected[key].shape)}")
    return model, state


def load_backbone(checkpoint: Checkpoint, device: str | torch.device | None = None) -> nn.Module:
    """Build the timm backbone for `checkpoint` on `device` (CPU if None) and load its tensors strictly, in
    float32 and eval mode. Refuses, before allocating anything, a model that would not fit on the device."""
    skeleton, state = backbone_skeleton(checkpoint)
    device = torch.device(device or "cpu")
    ensure_fits(checkpoint.path, checkpoint.architecture.variant, parameter_count(skeleton), device)
    with torch.device(device):
        model = checkpoint.architecture.build()
    model.load_state_dict(state, strict=True)  # copies tensor by tensor, casting each to the model's float32
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


# timm's names for Eva's SwiGLU projections -> Meta's (DINOv3 SwiGLUFFN: silu(w1 x) * w2 x, then w3)
SWIGLU_META_NAMES = {"mlp.fc1_g.": "mlp.w1.", "mlp.fc1_x.": "mlp.w2.", "mlp.fc2.": "mlp.w3."}
# timm's names for the packed SwiGLU of DINOv2-g -> Meta's (SwiGLUFFNFused: w12 packs gate and value)
PACKED_SWIGLU_META_NAMES = {"mlp.fc1.": "mlp.w12.", "mlp.fc2.": "mlp.w3."}


def _renamed(key: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        key = key.replace(old, new)
    return key


def dinov3_meta_state_dict(model: nn.Module, architecture: Architecture) -> dict[str, torch.Tensor]:
    """The inverse of timm's DINOv3 conversion: a timm `Eva` state dict in Meta's/BrainDINO's naming, with
    the buffers Meta's model expects (RoPE periods, and the k-bias mask when qkv has a bias)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("attn.q_bias"):
            qkv_bias = torch.cat([value, torch.zeros_like(value), state[key.replace("q_bias", "v_bias")]])
            out[key.replace("q_bias", "qkv.bias")] = qkv_bias
            out[key.replace("q_bias", "qkv.bias_mask")] = torch.cat(
                [torch.ones_like(value), torch.zeros_like(value), torch.ones_like(value)])
            continue
        if key.endswith("attn.v_bias") or key.startswith("rope."):
            continue
        if architecture.ffn == "swiglu":
            key = _renamed(key, SWIGLU_META_NAMES)
        out[_renamed(key, {"reg_token": "storage_tokens", "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"})] = value
    n_periods = architecture.head_dim // 4
    exponents = 2 * torch.arange(n_periods, dtype=torch.float32) / (architecture.head_dim // 2)
    out["rope_embed.periods"] = architecture.rope_base ** exponents
    out["mask_token"] = torch.zeros(1, architecture.embed_dim)
    return out


def dinov2_meta_state_dict(model: nn.Module, architecture: Architecture) -> dict[str, torch.Tensor]:
    """The inverse of timm's DINOv2 conversion: a timm `VisionTransformer` state dict in Meta's naming.

    With registers, timm folds the class position into the class token; Meta's layout gets that token and a
    zero class position, which Meta's model (and timm's conversion) adds back to the same sum."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        key = _renamed(key, PACKED_SWIGLU_META_NAMES) if architecture.ffn == "swiglu-packed" else key
        out[key.replace("reg_token", "register_tokens")] = value.detach().cpu()
    if architecture.num_register_tokens:
        out["pos_embed"] = torch.cat([torch.zeros_like(out["pos_embed"][:, :1]), out["pos_embed"]], dim=1)
    out["mask_token"] = torch.zeros(1, architecture.embed_dim)
    return out


def save_teacher_checkpoint(model: nn.Module, architecture: Architecture, path: str | Path,
                            extra: dict[str, torch.Tensor] | None = None, iteration: int = 0) -> Path:
    """Save a timm backbone in the teacher layout of BrainDINO, DINOv2 and DINOv3 training checkpoints
    (`{"teacher": {"backbone.<Meta's key>": ...}}`) that `read_checkpoint` reads, with its architecture
    recorded beside the tensors (so what they cannot tell, LayerNorm eps and position resizing, round-trips)."""
    to_meta = dinov3_meta_state_dict if architecture.family == "dinov3" else dinov2_meta_state_dict
    teacher = {f"backbone.{k}": v for k, v in to_meta(model, architecture).items()}
    teacher.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save({"teacher": teacher, "iteration": iteration, TEACHER_ARCHITECTURE_KEY: architecture.to_dict()},
                   tmp)
    return Path(path)
