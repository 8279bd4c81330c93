"""Slice shards: the foreground axial slices of many volumes, normalised once, stored compactly.

`prepare_slices` runs every volume through the engine's own `SliceStack` (foreground mask, percentile clip,
z-score, square crop, resize), so pretraining sees exactly the input the engine gives a model at
inference. Slices are stored as float16 `.npy` shards (a few hundred slices each) plus `index.json`;
`SliceShards` memory-maps them, so a dataset of any size is read with random access and little memory.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, write_text_atomic
from ..errors import BrainDINOError, CancelledError
from ..resolution import ResolutionPolicy
from ..slices import PreprocessConfig, SliceStack
from ..volume import read_volume
from ..volume_files import find_volumes

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
@dataclass
class PrepareSummary:
    volumes: int
    skipped: list[str]
    slices: int
    bytes: int
    output: Path

    def describe(self) -> str:
        text = (f"{self.volumes} volumes, {self.slices} slices, {self.bytes / 1e6:.1f} MB "
                f"of shards in {self.output}")
        return text + (f" ({len(self.skipped)} skipped)" if self.skipped else "")


class _ShardWriter:
    """Collects slices and writes them out `shard_size` at a time."""

    def __init__(self, root: Path, shard_size: int):
        self.root, self.shard_size = root, shard_size
        self.pending: list[np.ndarray] = []
        self.shards: list[dict] = []
        self.bytes = 0

    def add(self, images: np.ndarray) -> None:
        self.pending.extend(images)
        while len(self.pending) >= self.shard_size:
            self._write(self.pending[:self.shard_size])
            self.pending = self.pending[self.shard_size:]

    def close(self) -> None:
        if self.pending:
            self._write(self.pending)
            self.pending = []

    def _write(self, slices: list[np.ndarray]) -> None:
        name = f"shard_{len(self.shards):05d}.npy"
        array = np.stack(slices).astype(np.float16)
        with atomic_path(self.root / name) as tmp:
            np.save(tmp, array)
        self.shards.append({"file": name, "count": int(array.shape[0])})
        self.bytes += (self.root / name).stat().st_size


def prepare_slices(inputs: Iterable[str | Path], output: str | Path, image_size: int = 224, patch_size: int = 16,
                   shard_size: int = 256, progress: Callable[[int, int], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> PrepareSummary:
    """Normalise the foreground axial slices of every input volume into shards under `output`.

    Unreadable volumes are skipped with a warning that names them; inputs are only read. The index is
    written last, so a folder with an `index.json` always holds complete shards.
    """
    output = Path(output)
    volumes = find_volumes(inputs)
    if not volumes:
        raise BrainDINOError(", ".join(map(str, inputs)), "no volumes found (NIfTI, NRRD, MHA or DICOM folders)")
    output.mkdir(parents=True, exist_ok=True)
    config = PreprocessConfig()
    policy = ResolutionPolicy(image_size=image_size, upsampling="bilinear")  # every head slice, fixed size
    writer = _ShardWriter(output, shard_size)
    entries, skipped = [], []
    for done, path in enumerate(volumes):
        if cancel is not None and cancel():
            raise CancelledError("prepare-slices cancelled")
        try:
            stack = SliceStack.from_volume(read_volume(path), patch_size, config, policy)
        except (BrainDINOError, RuntimeError, ValueError, OSError) as error:
            log.warning("skipping %s: %s", path, error)
            skipped.append(str(path))
            continue
        images = stack.images[:, 0].numpy()
        entries.append({"path": str(path), "first": sum(e["slices"] for e in entries), "slices": len(images)})
        writer.add(images)
        if progress is not None:
            progress(done + 1, len(volumes))
    writer.close()
    if not entries:
        raise BrainDINOError(output, f"none of the {len(volumes)} input volume(s) could be read")
    index = {"format": "braindino-slice-shards/1", "image_size": image_size, "dtype": "float16",
             "preprocessing": config.to_dict(), "shards": writer.shards, "volumes": entries, "skipped": skipped}
    write_text_atomic(output / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    total = sum(e["slices"] for e in entries)
    return PrepareSummary(len(entries), skipped, total, writer.bytes, output)


class SliceShards:
    """Random access to prepared slices: `shards[i]` is a float32 tensor [1, H, W]; shards are memory-mapped."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index_path = self.root / INDEX_NAME
        if not index_path.exists():
            raise BrainDINOError(self.root, f"no {INDEX_NAME}: not a slice-shard folder (run braindino prepare-slices)")
        self.index = json.loads(index_path.read_text())
        self.counts = np.array([s["count"] for s in self.index["shards"]])
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self._arrays: dict[int, np.ndarray] = {}

    @property
    def image_size(self) -> int:
        return int(self.index["image_size"])

    @property
    def preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.index["preprocessing"])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, number: int) -> np.ndarray:
        if number not in self._arrays:
            self._arrays[number] = np.load(self.root / self.index["shards"][number]["file"], mmap_mode="r")
        return self._arrays[number]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        number = int(np.searchsorted(self.starts, i, side="right") - 1)
        image = np.asarray(self._shard(number)[i - self.starts[number]], dtype=np.float32)
        return torch.from_numpy(image)[None]

    def __getstate__(self) -> dict:  # memory maps are reopened in DataLoader workers
        return {**self.__dict__, "_arrays": {}}
