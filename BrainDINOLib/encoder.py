"""`Encoder`: a frozen timm backbone plus the checkpoint it came from, answering `tokens(images)`."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .architecture import Architecture, parameter_count
from .checkpoints import Checkpoint, ModelCard, load_backbone, read_checkpoint
from .errors import BrainDINOError
from .inference import inference_model, precision_context, resolve_precision
from .precision import Precision

log = logging.getLogger(__name__)


@dataclass
class Tokens:
    """Backbone outputs for a batch, all after the final norm (DINOv3's `x_norm_*` outputs).

    cls [B, D], registers [B, R, D], patches [B, h, w, D], and `layers[i]` [B, h, w, D] for each requested
    block index i (the output of block i passed through the final norm).
    """

    cls: Tensor
    registers: Tensor
    patches: Tensor
    layers: dict[int, Tensor]


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, or the best available one: CUDA, then Apple MPS, then CPU."""
    if device not in (None, "auto"):
        return _available_device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _available_device(name: str | torch.device) -> torch.device:
    """`name` as a torch device, refused with one line when it is unknown or absent on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BrainDINOError(f"device {name!r}", "is not a device name; use cuda, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BrainDINOError(f"device {name!r}", "no CUDA GPU is available on this machine; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BrainDINOError(f"device {name!r}", f"this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BrainDINOError(f"device {name!r}", "Apple's MPS is not available on this machine; use cpu")
    if device.type not in ("cuda", "mps", "cpu"):
        raise BrainDINOError(f"device {name!r}", "is not supported; use cuda, mps or cpu")
    return device


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere (CPU and MPS run fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Encoder:
    """A frozen ViT backbone in eval mode. Feed it model-ready images; it returns `Tokens`.

    `model` stays the timm backbone as loaded (fp32): attention maps and exports read its weights. `tokens`
    runs it at `precision` (see `inference.py`; "auto": int8 on an x86 CPU, bf16 on CUDA), through a copy
    prepared on the first call when the precision needs one.
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, device: torch.device,
                 precision: Precision = "auto"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.checkpoint = checkpoint
        self.device = device
        self.precision = resolve_precision(precision, device)
        self._runner: nn.Module | None = None

    @property
    def architecture(self) -> Architecture:
        return self.checkpoint.architecture

    @property
    def card(self) -> ModelCard | None:
        return self.checkpoint.card

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    @property
    def feature_id(self) -> str:
        """The model's identity and the precision it runs at: what the feature cache keys on, since features
        of different precisions are close but not identical (heads compare `model_id` only)."""
        return f"{self.model_id} ({self.precision})"

    @property
    def runner(self) -> nn.Module:
        """The module `tokens` runs: `model`, or its int8 copy (made once, on first use)."""
        if self._runner is None:
            self._runner = inference_model(self.model, self.precision)
        return self._runner

    @property
    def patch_size(self) -> int:
        return self.architecture.patch_size

    @property
    def embed_dim(self) -> int:
        return self.architecture.embed_dim

    @property
    def num_parameters(self) -> int:
        return parameter_count(self.model)

    @torch.inference_mode()
    def tokens(self, images: Tensor, layers: list[int] | tuple[int, ...] | None = None) -> Tokens:
        """Run the backbone on `images` [B, C, H, W] (H, W multiples of the patch size), as given."""
        batch, channels, height, width = images.shape
        patch = self.patch_size
        if height % patch or width % patch:
            raise BrainDINOError(f"image size {height}x{width}", f"is not a multiple of the patch size {patch}")
        if channels != self.architecture.in_chans:
            raise BrainDINOError(f"images of {channels} channels", f"the model expects {self.architecture.in_chans}")
        layers = sorted(set(layers or ()))
        depth = self.architecture.depth
        if any(not 0 <= i < depth for i in layers):
            raise BrainDINOError(f"layers {','.join(map(str, layers))}", f"out of range for {self.model_id}, a "
                                                                         f"{depth}-block model (use 0 to {depth - 1})")
        x = images.to(self.device)
        # int8 quantises activations with one scale per forward pass: each image runs alone, so that its tokens
        # never depend on the images batched with it (features stay the same whatever the batch size).
        parts = x.split(1) if self.precision == "int8" else (x,)
        with precision_context(self.device, self.precision):
            outputs = [self._forward(part, layers) for part in parts]
        final = torch.cat([output[0] for output in outputs])
        intermediates = [torch.cat(blocks) for blocks in zip(*(output[1] for output in outputs))]
        h, w = height // patch, width // patch
        registers = self.architecture.num_register_tokens
        prefix = 1 + registers
        return Tokens(cls=final[:, 0], registers=final[:, 1:prefix],
                      patches=final[:, prefix:].reshape(batch, h, w, -1),
                      layers={i: y.reshape(batch, h, w, -1) for i, y in zip(layers, intermediates)})

    def _forward(self, x: Tensor, layers: list[int]) -> tuple[Tensor, list[Tensor]]:
        """(final normed tokens, normed tokens of blocks `layers`), each [B, prefix + patches, D]."""
        if layers:
            return self.runner.forward_intermediates(x, indices=layers, norm=True, output_fmt="NLC")
        return self.runner.forward_features(x), []


def load_encoder(source: str | Path = "demo", device: str | torch.device | None = None,
                 precision: Precision = "auto") -> Encoder:
    """Load a checkpoint (path or built-in model name) as a frozen `Encoder` on `device` (auto if None) that
    runs at `precision` ("auto", "fp32", "int8" or "bf16"; see `inference.py`).

    The weights are built directly on the device, after checking that they fit there (`BrainDINOError` if not)."""
    checkpoint = read_checkpoint(source)
    device = select_device(device)
    encoder = Encoder(load_backbone(checkpoint, device=device), checkpoint, device, precision)
    log.info("loaded %s (%s) from %s on %s, %s", checkpoint.architecture.describe(), checkpoint.kind,
             checkpoint.path, encoder.device, encoder.precision)
    return encoder
