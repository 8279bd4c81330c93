"""`FeatureSession`: the one owner of a volume's features.

Everything that needs features (each CLI command, the demo, head fitting and prediction, the tissue probe,
the attention map, the Slicer module and the web page) asks a session, which holds the encoder, its
preprocessing, the resolution policy, the rule for which encoder blocks segmentation reads, and two caches:
a few volumes in memory in front of the on-disk `FeatureCache`. A request is served by any cached features
that hold at least the blocks asked for at a resolution at least as fine; otherwise the volume is embedded
and the result cached.
"""
from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import FeatureCache, preference, serves, volume_key
from .embedding import Cancel, Progress, default_preprocessing, embed_volume
from .encoder import Encoder, load_encoder
from .precision import Precision
from .features import VolumeFeatures
from .resolution import ResolutionPolicy, default_policy
from .slices import PreprocessConfig, SliceStack
from .volume import Volume

log = logging.getLogger(__name__)


def segmentation_layers(depth: int, count: int = 4) -> tuple[int, ...]:
    """`count` evenly spaced blocks ending with the last one ([2, 5, 8, 11] for a 12-block ViT, as the
    BrainDINO segmentation work used; [0, 2, 3, 5] for the 6-block demo model)."""
    return tuple(sorted({max(0, (depth * (i + 1)) // count - 1) for i in range(count)}))


@dataclass
class FeatureSession:
    """An encoder with its preprocessing, resolution policy and caches; `features(volume)` answers."""

    encoder: Encoder
    policy: ResolutionPolicy
    preprocessing: PreprocessConfig
    cache: FeatureCache | None = None
    batch_size: int | None = None
    memory_volumes: int = 2  # volumes whose features stay in memory
    _memory: OrderedDict[str, list[VolumeFeatures]] = field(default_factory=OrderedDict, repr=False)
    # Cache keys of the Volume objects asked about, by id, with a weak reference that tells a live object from a
    # later one at the same address and removes the entry when its volume is gone.
    _keys: dict[int, tuple[weakref.ref, str]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, model: str | Path = "demo", device: str | torch.device | None = None,
             policy: ResolutionPolicy | None = None, cache: FeatureCache | None = None,
             batch_size: int | None = None, precision: Precision = "auto") -> FeatureSession:
        """Load `model` on `device` (auto if None) to run at `precision` (see `inference.py`); `policy` None
        takes the device's default resolution."""
        return cls.for_encoder(load_encoder(model, device=device, precision=precision), policy, cache, batch_size)

    @classmethod
    def for_encoder(cls, encoder: Encoder, policy: ResolutionPolicy | None = None,
                    cache: FeatureCache | None = None, batch_size: int | None = None) -> FeatureSession:
        return cls(encoder, policy or default_policy(encoder.device.type), default_preprocessing(encoder), cache,
                   batch_size)

    @property
    def segmentation_layers(self) -> tuple[int, ...]:
        """The encoder blocks segmentation heads read, the same for every way a head is fitted or applied."""
        return segmentation_layers(self.encoder.architecture.depth)

    def describe(self) -> str:
        return f"{self.encoder.feature_id} on {self.encoder.device}: {self.policy.describe()}"

    def slice_stack(self, volume: Volume) -> SliceStack:
        """The model-ready slices of `volume` under this session's preprocessing and resolution."""
        return SliceStack.from_volume(volume, self.encoder.patch_size, self.preprocessing, self.policy)

    def cache_key(self, volume: Volume) -> str:
        """The key of `volume`'s features under this session's model, precision and preprocessing (see
        `volume_key`). Hashed once per `Volume` object (a Volume is never changed in place: maps and labels are
        new Volumes), so asking again for the features of a volume in hand (a click of the web page, a moved
        point in Slicer) costs no pass over its voxels."""
        known = self._keys.get(id(volume))
        if known is not None and known[0]() is volume:
            return known[1]
        key = volume_key(volume, self.encoder.feature_id, self.preprocessing)
        ident = id(volume)

        def forget(reference: weakref.ref) -> None:
            if self._keys.get(ident, (None,))[0] is reference:
                del self._keys[ident]
        self._keys[ident] = (weakref.ref(volume, forget), key)
        return key

    def features(self, volume: Volume, layers: Sequence[int] = (), progress: Progress | None = None,
                 cancel: Cancel | None = None, stack: SliceStack | None = None) -> VolumeFeatures:
        """Features of `volume` with at least the blocks `layers`, from memory, the disk cache or the encoder
        (`stack`: the volume's `slice_stack`, if already built)."""
        layers = tuple(sorted(set(layers)))
        key = self.cache_key(volume)
        held = [f for f in self._memory.get(key, []) if serves(f, self.policy, layers)]
        if held:
            self._memory.move_to_end(key)
            features = min(held, key=lambda f: preference(self.policy, layers)((f.policy, tuple(f.layers))))
            log.info("features of %s from memory", volume.source or "volume")
        elif self.cache is not None and (features := self.cache.get(key, self.policy, layers)) is not None:
            log.info("features of %s from the cache %s", volume.source or "volume", self.cache.root)
        else:
            features = embed_volume(volume, self.encoder, self.preprocessing, self.policy, layers, self.batch_size,
                                    progress, cancel, stack)
            if self.cache is not None:
                self.cache.put(key, features)
        if progress:
            progress(features.num_slices, features.num_slices)
        self._remember(key, features)
        return features

    def _remember(self, key: str, features: VolumeFeatures) -> None:
        entries = self._memory.setdefault(key, [])
        if not any(f is features for f in entries):
            entries.append(features)
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_volumes:
            self._memory.popitem(last=False)
