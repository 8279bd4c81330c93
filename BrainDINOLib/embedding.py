"""`embed_volume`: a `Volume` through an `Encoder`, slice batch by slice batch, into `VolumeFeatures`.

This is the computation only; `FeatureSession` (session.py) decides the preprocessing, resolution and layers
and keeps the results in its caches. `for_each_batch` is the batch loop itself, shared with the attention map.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import psutil
import torch
from torch import Tensor

from .encoder import Encoder, autocast_for
from .errors import CancelledError
from .features import VolumeFeatures
from .resolution import ResolutionPolicy
from .slices import PreprocessConfig, SliceStack
from .volume import Volume

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (slices done, slices in total)
Cancel = Callable[[], bool]  # e.g. threading.Event().is_set


def default_preprocessing(encoder: Encoder) -> PreprocessConfig:
    """The preprocessing the model was trained with (from its card), else the defaults."""
    if encoder.card and encoder.card.preprocessing:
        return encoder.card.preprocessing
    return PreprocessConfig()


# Largest useful batch per device type. On a CPU, large batches only lose cache locality (ViT-S/16 on 2
# cores: about 12-14 slices/s at batch 8, 12.6 at 16, 10.6 at 64, 10.8 at 1); GPUs want large batches.
MAX_BATCH = {"cpu": 8, "mps": 32, "cuda": 128}


def auto_batch_size(encoder: Encoder, image_size: int, budget_fraction: float = 0.25) -> int:
    """A batch size whose activations fit in a fraction of the free memory of the encoder's device.

    Per image, a ViT block holds roughly 12 N x D floats of activations plus heads x N x N attention
    scores (N tokens); inference keeps about one block alive at a time.
    """
    most = MAX_BATCH.get(encoder.device.type, 16)
    arch = encoder.architecture
    tokens = (image_size // arch.patch_size) ** 2 + 1 + arch.num_register_tokens
    bytes_per_image = 4 * (12 * tokens * arch.embed_dim + 2 * arch.num_heads * tokens * tokens)
    if encoder.device.type == "cuda":
        free = torch.cuda.mem_get_info(encoder.device)[0]
    else:
        free = psutil.virtual_memory().available
    return max(1, min(most, int(free * budget_fraction // bytes_per_image)))


def for_each_batch(stack: SliceStack, encoder: Encoder, work: Callable[[int, int, Tensor], None],
                   batch_size: int | None = None, progress: Progress | None = None, cancel: Cancel | None = None,
                   what: str = "embedding") -> None:
    """Call `work(start, stop, images)` for consecutive batches of the stack's slices (model-ready images on
    the encoder's input channels; with a shift ensemble, every slice's N^2 windows). `cancel()` is checked
    between batches (raises `CancelledError`), `progress(done, total)` reported after each."""
    total = len(stack)
    windows = stack.geometry.shifts ** 2
    batch_size = max(1, (batch_size or auto_batch_size(encoder, stack.geometry.image_size)) // windows)
    channels = encoder.architecture.in_chans
    log.info("%s: %d slices (batch %d, %s)", what, total, batch_size, encoder.device)
    for start in range(0, total, batch_size):
        if cancel is not None and cancel():
            raise CancelledError(f"{what} cancelled")
        stop = min(total, start + batch_size)
        work(start, stop, stack.batch(start, stop, channels))
        if progress:
            progress(stop, total)


def embed_volume(volume: Volume, encoder: Encoder, config: PreprocessConfig | None = None,
                 policy: ResolutionPolicy | None = None, layers: Sequence[int] = (), batch_size: int | None = None,
                 progress: Progress | None = None, cancel: Cancel | None = None,
                 stack: SliceStack | None = None) -> VolumeFeatures:
    """Embed the axial slices of `volume` that `policy` chooses with `encoder`.

    Batched inference (batch size from free memory unless given) at the encoder's precision (`inference.py`),
    optional intermediate `layers` (block indices, after the final norm), `progress(done, total)` after each
    batch, and `cancel()` checked between batches (raises `CancelledError`). `stack`, when given, is the
    volume's `SliceStack` under `config` and `policy`, already built (e.g. in a DataLoader worker).
    """
    config = config or default_preprocessing(encoder)
    policy = policy or ResolutionPolicy()
    layers = tuple(sorted(set(layers)))
    if stack is None:
        stack = SliceStack.from_volume(volume, encoder.patch_size, config, policy)
    total = len(stack)
    h, w = stack.geometry.grid
    dim = encoder.embed_dim
    cls = torch.empty((total, dim), dtype=torch.float16)
    patches = torch.empty((total, h, w, dim), dtype=torch.float16)
    layer_out = {i: torch.empty((total, h, w, dim), dtype=torch.float16) for i in layers}

    def embed(start: int, stop: int, images: Tensor) -> None:
        with autocast_for(encoder.device):
            tokens = encoder.tokens(images, layers=layers)
        windows = stack.geometry.shifts ** 2
        cls[start:stop] = tokens.cls.float().cpu().reshape(stop - start, windows, dim).mean(dim=1)
        patches[start:stop] = stack.interleave(tokens.patches.float().cpu())
        for i in layers:
            layer_out[i][start:stop] = stack.interleave(tokens.layers[i].float().cpu())

    log.info("embedding %s: %s", volume.source or "volume", policy.describe())
    for_each_batch(stack, encoder, embed, batch_size, progress, cancel)
    return VolumeFeatures(cls=cls, patches=patches, slices=stack.geometry, geometry=volume.geometry,
                          stored=volume.stored, model_id=encoder.model_id, preprocessing=config,
                          foreground=stack.foreground, guide=stack.guide, policy=policy, layers=layer_out,
                          source=volume.source)
