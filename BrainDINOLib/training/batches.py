"""The batch of one training step on one process, as a pure function of (seed, step, rank).

`StepBatches[step]` picks the step's slices (an epoch-wise permutation of the shards, split across
processes), makes their multi-crop views and iBOT masks, all from generators seeded by (seed, step,
rank). No sampler or augmentation state has to be saved: resuming at step s rebuilds exactly the batches
an uninterrupted run would have seen, whichever DataLoader workers build them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import BrainDINOError
from .augment import MultiCrop, block_mask
from .config import CropConfig, LossConfig
from .shards import SliceShards


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def seeded_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass
class StepBatch:
    """Global crops [2B, C, G, G] (all first views, then all second views), local crops [N B, C, L, L],
    iBOT masks [2B, g*g] (bool, over the global crops' patches) and the slice indices [B]."""

    global_crops: Tensor
    local_crops: Tensor
    masks: Tensor
    indices: Tensor


class StepBatches(Dataset):
    """A map-style dataset whose item `step` is that step's `StepBatch` for this rank."""

    def __init__(self, shards: SliceShards, crops: CropConfig, loss: LossConfig, batch_size: int, patch_size: int,
                 in_chans: int, seed: int, rank: int = 0, world_size: int = 1):
        if crops.global_size % patch_size or crops.local_size % patch_size:
            raise BrainDINOError(f"crop sizes {crops.global_size}/{crops.local_size}", f"must be multiples of the "
                                                                                       f"patch size {patch_size}")
        self.shards, self.crops, self.loss = shards, crops, loss
        self.batch_size, self.patch_size, self.in_chans = batch_size, patch_size, in_chans
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.multicrop = MultiCrop(crops)
        self._permutation: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return 2**62  # indexed by step; the training loop decides how many

    def _epoch_permutation(self, epoch: int) -> Tensor:
        if self._permutation is None or self._permutation[0] != epoch:
            order = torch.randperm(len(self.shards), generator=seeded_generator(self.seed, epoch, 1))
            self._permutation = (epoch, order)
        return self._permutation[1]

    def slice_indices(self, step: int) -> Tensor:
        """The shard indices this rank trains on at `step`: consecutive positions of the epoch permutations."""
        total = len(self.shards)
        first = (step * self.world_size + self.rank) * self.batch_size
        positions = range(first, first + self.batch_size)
        return torch.stack([self._epoch_permutation(p // total)[p % total] for p in positions])

    def epoch(self, step: int) -> float:
        return step * self.world_size * self.batch_size / len(self.shards)

    def __getitem__(self, step: int) -> StepBatch:
        generator = seeded_generator(self.seed, step, self.rank, 2)
        indices = self.slice_indices(step)
        views = [self.multicrop(self.shards[int(i)], generator) for i in indices]
        global_crops = torch.stack([v[0] for v in views], dim=1).flatten(0, 1)  # view-major
        local_crops = torch.stack([v[1] for v in views], dim=1).flatten(0, 1)
        return StepBatch(global_crops.expand(-1, self.in_chans, -1, -1).contiguous(),
                         local_crops.expand(-1, self.in_chans, -1, -1).contiguous(),
                         self._masks(generator), indices)

    def _masks(self, generator: torch.Generator) -> Tensor:
        """iBOT masks: a fixed share of the global crops (at least one) get a block mask."""
        side = self.crops.global_size // self.patch_size
        crops = 2 * self.batch_size
        masked = max(1, int(crops * self.loss.mask_sample_probability))
        masks = torch.zeros(crops, side * side, dtype=torch.bool)
        low, high = self.loss.mask_ratio
        for crop in torch.randperm(crops, generator=generator)[:masked]:
            ratio = low + (high - low) * float(torch.rand(1, generator=generator))
            masks[crop] = block_mask(side, side, ratio, generator).flatten()
        return masks


def collate_single(batch: StepBatch) -> StepBatch:
    """The DataLoader collate for items that already are whole batches."""
    return batch
