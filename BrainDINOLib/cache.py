"""A content-addressed on-disk cache of `VolumeFeatures`.

The key hashes what determines the features: the voxels and geometry of the volume, the model's identity
(name + file hash), the preprocessing parameters and the requested layers. Entries are written
atomically, so a crash never leaves a half-written entry that a later run would trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from .atomic import remove_stale_temp_files
from .errors import BrainDINOError
from .features import VolumeFeatures
from .slices import PreprocessConfig
from .volume import Volume

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$BRAINDINO_CACHE`, else `$XDG_CACHE_HOME/braindino`, else `~/.cache/braindino`."""
    if os.environ.get("BRAINDINO_CACHE"):
        return Path(os.environ["BRAINDINO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "braindino"


def feature_key(volume: Volume, model_id: str, config: PreprocessConfig, layers: tuple[int, ...]) -> str:
    digest = hashlib.sha256()
    digest.update(volume.array.tobytes())
    digest.update(json.dumps({"shape": volume.array.shape, "dtype": str(volume.array.dtype),
                              "geometry": asdict(volume.geometry), "stored": asdict(volume.stored),
                              "model": model_id, "preprocessing": config.to_dict(),
                              "layers": sorted(layers)}, sort_keys=True).encode())
    return digest.hexdigest()


class FeatureCache:
    """`get`/`put` of `VolumeFeatures` under `root/<key[:2]>/<key>.safetensors`."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> VolumeFeatures | None:
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            return VolumeFeatures.load(path)
        except BrainDINOError as error:  # a damaged entry is a miss: discarded here, recomputed by the caller
            log.warning("discarded a damaged cache entry, computing it again: %s: %s", path, error.problem)
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def put(self, key: str, features: VolumeFeatures) -> Path | None:
        """Store `features`; a cache that cannot be written (full disk, read-only) is a warning, not a failure."""
        remove_stale_temp_files(self.root)  # what writers killed mid-write left behind
        try:
            return features.save(self.path_for(key))
        except BrainDINOError as error:
            log.warning("features not cached: %s", error)
            return None
