"""`embed_volume`: a `Volume` through an `Encoder`, slice batch by slice batch, into `VolumeFeatures`."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import psutil
import torch

from .cache import FeatureCache, feature_key
from .encoder import Encoder, autocast_for
from .errors import CancelledError
from .features import VolumeFeatures
from .slices import PreprocessConfig, SliceStack
from .volume import Volume

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (slices done, slices in total)
Cancel = Callable[[], bool]  # e.g. threading.Event().is_set


def default_preprocessing(encoder: Encoder) -> PreprocessConfig:
    """The preprocessing the model was trained with (from its card), else the defaults."""
    if encoder.card and encoder.card.preprocessing:
        return PreprocessConfig.from_dict(encoder.card.preprocessing)
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


def embed_volume(volume: Volume, encoder: Encoder, config: PreprocessConfig | None = None,
                 layers: Sequence[int] = (), batch_size: int | None = None, progress: Progress | None = None,
                 cancel: Cancel | None = None, cache: FeatureCache | None = None) -> VolumeFeatures:
    """Embed every foreground axial slice of `volume` with `encoder`.

    Batched inference (batch size from free memory unless given), bf16 autocast on CUDA and fp32 elsewhere,
    optional intermediate `layers` (block indices, after the final norm), `progress(done, total)` after each
    batch, and `cancel()` checked between batches (raises `CancelledError`). With a `cache`, a volume
    already embedded under the same model, preprocessing and layers is read back instead of recomputed.
    """
    config = config or default_preprocessing(encoder)
    layers = tuple(sorted(set(layers)))
    key = feature_key(volume, encoder.feature_id, config, layers) if cache is not None else None
    if cache is not None and (hit := cache.get(key)) is not None:
        log.info("features of %s read from the cache (%s)", volume.source or "volume", cache.path_for(key))
        if progress:
            progress(hit.num_slices, hit.num_slices)
        return hit

    stack = SliceStack.from_volume(volume, encoder.patch_size, config)
    total = len(stack)
    batch_size = batch_size or auto_batch_size(encoder, config.image_size)
    channels = encoder.architecture.in_chans
    h, w = stack.geometry.grid
    dim = encoder.embed_dim
    cls = torch.empty((total, dim), dtype=torch.float16)
    patches = torch.empty((total, h, w, dim), dtype=torch.float16)
    layer_out = {i: torch.empty((total, h, w, dim), dtype=torch.float16) for i in layers}
    log.info("embedding %d slices of %s (batch %d, %s)", total, volume.source or "volume", batch_size, encoder.device)
    for start in range(0, total, batch_size):
        if cancel is not None and cancel():
            raise CancelledError("embedding cancelled")
        stop = min(total, start + batch_size)
        with autocast_for(encoder.device):
            tokens = encoder.tokens(stack.batch(start, stop, channels), layers=layers)
        cls[start:stop] = tokens.cls.float().cpu()
        patches[start:stop] = tokens.patches.float().cpu()
        for i in layers:
            layer_out[i][start:stop] = tokens.layers[i].float().cpu()
        if progress:
            progress(stop, total)

    features = VolumeFeatures(cls=cls, patches=patches, slices=stack.geometry, geometry=volume.geometry,
                              stored=volume.stored, model_id=encoder.model_id, preprocessing=config,
                              foreground=stack.foreground, layers=layer_out, source=volume.source)
    if cache is not None:
        cache.put(key, features)
    return features
