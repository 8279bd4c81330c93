"""The batch of one training step on one process, as a pure function of (seed, step, rank).

`StepBatches[step]` picks the step's slices: a fixed share from the slice shards (an epoch-wise permutation,
split across processes) and the rest generated (`synthbrain.SyntheticBrains`, one seed per slice); then draws
their crops' parameters and iBOT masks, all from generators seeded by (seed, step, rank). No sampler or
augmentation state has to be saved: resuming at step s rebuilds exactly the batches an uninterrupted run would
have seen, whichever DataLoader workers build them.

The loader hands over `StepSlices` (decoded slices + parameters); `StepBatches.render` turns them into the
crops of a `StepBatch` on whatever device they are on. On a GPU the trainer renders there, so the workers only
read (or generate) slices; on a CPU the workers render too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import BrainDINOError
from .augment import MultiCrop, ViewParameters, block_mask
from .config import CropConfig, LossConfig
from .shards import SliceShards
from .synthbrain import SyntheticBrains


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def seeded_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass
class StepSlices:
    """What the loader hands over for one step: slices [B, 1, H, W], their crops' parameters, the iBOT masks
    [2B, g*g] and the shard index of each slice [B] (-1 for a synthetic one)."""

    slices: Tensor
    views: ViewParameters
    masks: Tensor
    indices: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StepSlices:
        return StepSlices(self.slices.to(device, non_blocking=non_blocking), self.views.to(device, non_blocking),
                          self.masks.to(device, non_blocking=non_blocking),
                          self.indices.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> StepSlices:  # called by the DataLoader's pinning thread
        return StepSlices(self.slices.pin_memory(), self.views.pin_memory(), self.masks.pin_memory(),
                          self.indices.pin_memory())


@dataclass
class StepBatch:
    """Global crops [2B, C, G, G] (all first views, then all second views), local crops [N B, C, L, L],
    iBOT masks [2B, g*g] (bool, over the global crops' patches) and the slice indices [B]."""

    global_crops: Tensor
    local_crops: Tensor
    masks: Tensor
    indices: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StepBatch:
        return StepBatch(*(t.to(device, non_blocking=non_blocking) for t in (self.global_crops, self.local_crops,
                                                                             self.masks, self.indices)))

    def pin_memory(self) -> StepBatch:
        return StepBatch(*(t.pin_memory() for t in (self.global_crops, self.local_crops, self.masks, self.indices)))


def synthetic_count(batch_size: int, shards_weight: float, synthetic_weight: float) -> int:
    """How many of a step's `batch_size` slices are synthetic, for sources mixed by weight."""
    if shards_weight < 0 or synthetic_weight < 0 or shards_weight + synthetic_weight <= 0:
        raise ValueError(f"data.shards_weight ({shards_weight}) and data.synthetic_weight ({synthetic_weight}) "
                         "must be >= 0 and not both 0")
    return round(batch_size * synthetic_weight / (shards_weight + synthetic_weight))


class StepBatches(Dataset):
    """A map-style dataset whose item `step` is that step's `StepSlices` for this rank (or, with
    `render_in_loader`, its rendered `StepBatch`). `synthetic_slices` of every step's `batch_size` slices come
    from `synthetic`, the others from `shards` (which may be None when all are synthetic)."""

    def __init__(self, shards: SliceShards | None, crops: CropConfig, loss: LossConfig, batch_size: int,
                 patch_size: int, in_chans: int, seed: int, rank: int = 0, world_size: int = 1, *,
                 synthetic: SyntheticBrains | None = None, synthetic_slices: int = 0, render_in_loader: bool = True):
        if crops.global_size % patch_size or crops.local_size % patch_size:
            raise BrainDINOError(f"crop sizes {crops.global_size}/{crops.local_size}", f"must be multiples of the "
                                                                                       f"patch size {patch_size}")
        if not 0 <= synthetic_slices <= batch_size or (synthetic_slices and synthetic is None) or (
                synthetic_slices < batch_size and shards is None):
            raise ValueError(f"{synthetic_slices} synthetic slices of {batch_size} need both sources configured")
        self.shards, self.synthetic, self.synthetic_slices = shards, synthetic, synthetic_slices
        self.shard_slices = batch_size - synthetic_slices
        self.crops, self.loss = crops, loss
        self.batch_size, self.patch_size, self.in_chans = batch_size, patch_size, in_chans
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.render_in_loader = render_in_loader
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
        if not self.shard_slices:
            return torch.zeros(0, dtype=torch.int64)
        total = len(self.shards)
        first = (step * self.world_size + self.rank) * self.shard_slices
        positions = range(first, first + self.shard_slices)
        return torch.stack([self._epoch_permutation(p // total)[p % total] for p in positions])

    def epoch(self, step: int) -> float:
        """Passes over the shards after `step` steps (0 without shards)."""
        return step * self.world_size * self.shard_slices / len(self.shards) if self.shard_slices else 0.0

    def synthetic_slice(self, step: int, number: int) -> Tensor:
        """Synthetic slice `number` of `step` on this rank: [1, H, W]."""
        rng = np.random.default_rng(derive_seed(self.seed, step, self.rank, 4, number))
        return self.synthetic.slice(rng).image

    def __getitem__(self, step: int) -> StepSlices | StepBatch:
        generator = seeded_generator(self.seed, step, self.rank, 2)
        indices = self.slice_indices(step)
        slices = [self.shards[int(i)] for i in indices]
        slices += [self.synthetic_slice(step, j) for j in range(self.synthetic_slices)]
        views = self.multicrop.draw(self.batch_size, generator)
        loaded = StepSlices(torch.stack(slices), views, self._masks(generator),
                            torch.cat([indices, torch.full((self.synthetic_slices,), -1)]))
        return self.render(loaded) if self.render_in_loader else loaded

    def render(self, loaded: StepSlices) -> StepBatch:
        """The step's crops, computed on the device `loaded` is on."""
        global_crops, local_crops = self.multicrop.render(loaded.slices, loaded.views)
        return StepBatch(global_crops.expand(-1, self.in_chans, -1, -1).contiguous(),
                         local_crops.expand(-1, self.in_chans, -1, -1).contiguous(), loaded.masks, loaded.indices)

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


def collate_single(batch: StepSlices | StepBatch) -> StepSlices | StepBatch:
    """The DataLoader collate for items that already are whole batches."""
    return batch
