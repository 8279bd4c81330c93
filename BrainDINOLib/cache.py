"""A content-addressed on-disk cache of `VolumeFeatures`.

Entries are grouped by what fixes the tokens of a volume: its voxels and geometry, the model's identity
(name + file hash) and the preprocessing (`volume_key`). Inside a group, each entry holds one resolution
policy and one set of encoder blocks, and a request is served by any entry that holds at least the blocks
asked for at a resolution at least as fine (`ResolutionPolicy.at_least_as_fine_as`): embedding with blocks
2, 5, 8, 11 once serves every later map. Entries are written atomically, so a crash never leaves a
half-written entry that a later run would trust.

Layout: `root/<key[:2]>/<key>/<policy hash>-<blocks>.safetensors`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .atomic import is_temporary, remove_stale_temp_files
from .errors import BrainDINOError
from .features import VolumeFeatures
from .resolution import ResolutionPolicy
from .slices import PreprocessConfig
from .volume import Volume

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$BRAINDINO_CACHE`, else `$XDG_CACHE_HOME/braindino`, else `~/.cache/braindino`."""
    if os.environ.get("BRAINDINO_CACHE"):
        return Path(os.environ["BRAINDINO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "braindino"


def volume_key(volume: Volume, model_id: str, config: PreprocessConfig) -> str:
    """Hash of everything but the resolution and blocks that determines a volume's features."""
    digest = hashlib.sha256()
    digest.update(volume.array.tobytes())
    digest.update(json.dumps({"shape": volume.array.shape, "dtype": str(volume.array.dtype),
                              "geometry": asdict(volume.geometry), "stored": asdict(volume.stored),
                              "model": model_id, "preprocessing": config.to_dict()}, sort_keys=True).encode())
    return digest.hexdigest()


def serves(entry: VolumeFeatures | dict, policy: ResolutionPolicy, layers: Sequence[int]) -> bool:
    """Whether features (or their metadata) can answer a request for `policy` and blocks `layers`."""
    if isinstance(entry, VolumeFeatures):
        held_policy, held_layers = entry.policy, set(entry.layers)
    else:
        held_policy, held_layers = ResolutionPolicy.from_dict(entry["policy"]), set(entry["layers"])
    return set(layers) <= held_layers and held_policy.at_least_as_fine_as(policy)


def preference(policy: ResolutionPolicy, layers: Sequence[int]):
    """Sort key among serving entries: the requested policy itself first, then the fewest extra blocks."""
    def key(candidate: tuple[ResolutionPolicy, Sequence[int]]) -> tuple[bool, int]:
        held_policy, held_layers = candidate
        return held_policy != policy, len(set(held_layers) - set(layers))
    return key


class FeatureCache:
    """`get`/`put` of `VolumeFeatures` by volume key, resolution policy and encoder blocks."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()
        self._swept = False  # stale temporary files are looked for once per cache object, not on every write

    def folder_for(self, key: str) -> Path:
        return self.root / key[:2] / key

    def path_for(self, key: str, policy: ResolutionPolicy, layers: Sequence[int]) -> Path:
        policy_hash = hashlib.sha256(json.dumps(policy.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        blocks = "-".join(str(i) for i in sorted(set(layers))) or "final"
        return self.folder_for(key) / f"{policy_hash}-{blocks}.safetensors"

    def get(self, key: str, policy: ResolutionPolicy, layers: Sequence[int] = ()) -> VolumeFeatures | None:
        """The best entry that serves the request (see module docstring), or None. A damaged entry is a miss:
        discarded here (with a warning) and recomputed by the caller."""
        candidates = []
        # A writer's temporary file shares the suffix: one a killed writer left is no entry, even when complete.
        for path in sorted(p for p in self.folder_for(key).glob("*.safetensors") if not is_temporary(p.name)):
            try:
                info = VolumeFeatures.read_metadata(path)
            except BrainDINOError as error:
                self._discard(path, error)
                continue
            if serves(info, policy, layers):
                candidates.append((ResolutionPolicy.from_dict(info["policy"]), info["layers"], path))
        for *_, path in sorted(candidates, key=lambda c: preference(policy, layers)(c[:2])):
            try:
                return VolumeFeatures.load(path)
            except BrainDINOError as error:
                self._discard(path, error)
        return None

    @staticmethod
    def _discard(path: Path, error: BrainDINOError) -> None:
        log.warning("discarded a damaged cache entry, computing it again: %s: %s", path, error.problem)
        with contextlib.suppress(OSError):
            path.unlink()

    def put(self, key: str, features: VolumeFeatures) -> Path | None:
        """Store `features`; a cache that cannot be written (full disk, read-only) is a warning, not a failure."""
        if not self._swept:  # what writers killed mid-write left behind (a walk of the whole cache)
            remove_stale_temp_files(self.root)
            self._swept = True
        try:
            return features.save(self.path_for(key, features.policy, tuple(features.layers)))
        except BrainDINOError as error:
            log.warning("features not cached: %s", error)
            return None
