"""Tissue probe: do an encoder's frozen patch tokens know brain tissue?

Targets: background / CSF / GM / WM of the MNI152 2009a template (rule in `BrainDINOLib/tissue.py`). Inputs:
the MNI152 T1 through the engine's `SliceStack`. 40 axial slices evenly spread over the brain; every 4th (10)
trains, the other 30 are scored. Two probes, both linear on standardised patch tokens and the same for every
feature set:

- voxel probe (DINOv2's linear segmentation protocol): a linear map from each token to class logits on the
  patch grid, upsampled bilinearly to the voxels and trained with voxel cross-entropy; scored by voxel Dice.
  This is the headline figure: it asks what a user of the features gets.
- patch probe: multinomial logistic regression of each patch's majority tissue; scored by Dice on the
  patch grid. It asks whether a token knows its own patch, free of the patch-size limit on voxel Dice.

Feature sets: the encoder; the same architecture untrained (timm's initialisation and, for a model trained
here, the run's own step-0 weights, rebuilt from the config in its card); and raw intensities (each
patch's own normalised pixels), a baseline that any learned feature should beat.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from ..encoder import Encoder
from ..heads.metrics import dice_per_class
from ..heads.segmentation import soft_targets
from ..slices import PreprocessConfig, SliceStack, crop_box
from ..threads import torch_threads
from ..volume import Volume
from .config import config_from_dict
from .model import build_network
from ..tissue import CLASS_NAMES

log = logging.getLogger(__name__)

TISSUES = tuple(range(1, len(CLASS_NAMES)))  # CSF, GM, WM: the classes averaged into the mean Dice


@dataclass(frozen=True)
class ProbeSplit:
    """The probe's slices: positions in the stack of the training and test slices."""

    train: list[int]
    test: list[int]


def choose_slices(stack: SliceStack, labels: np.ndarray, count: int = 40, train_every: int = 4) -> ProbeSplit:
    """`count` slices evenly spread over those with at least 20% of the largest brain area; every
    `train_every`-th one trains, the rest test."""
    brain_area = np.array([(labels[k] > 0).sum() for k in stack.geometry.slice_indices])
    candidates = np.flatnonzero(brain_area >= 0.2 * brain_area.max())
    chosen = candidates[np.linspace(0, len(candidates) - 1, count).round().astype(int)]
    return ProbeSplit([int(p) for p in chosen[::train_every]],
                      [int(p) for i, p in enumerate(chosen) if i % train_every])


def encoder_patch_features(encoder: Encoder, stack: SliceStack, positions: list[int]) -> np.ndarray:
    """Final-norm patch tokens [S, h, w, D] of the slices at `positions`."""
    images = torch.cat([stack.batch(p, p + 1, encoder.architecture.in_chans) for p in positions])
    return torch.cat([encoder.tokens(images[i:i + 8]).patches for i in range(0, len(images), 8)]).float().numpy()


def raw_patch_features(stack: SliceStack, positions: list[int], patch: int) -> np.ndarray:
    """Each patch's own normalised pixels [S, h, w, patch^2]."""
    images = stack.images[positions]
    h, w = stack.geometry.grid
    return F.unfold(images, patch, stride=patch).transpose(1, 2).reshape(len(positions), h, w, -1).numpy()


def box_labels(stack: SliceStack, labels: np.ndarray, positions: list[int]) -> np.ndarray:
    """Voxel labels [S, rows, cols] of the stack's in-plane box (background past the volume's edges)."""
    return crop_box(labels[[stack.geometry.slice_indices[p] for p in positions]], stack.geometry.box, 0)


def patch_majority_labels(stack: SliceStack, labels: np.ndarray, positions: list[int]) -> np.ndarray:
    """Majority class of each patch [S, h, w]: the largest of the patch's class fractions."""
    slice_indices = [stack.geometry.slice_indices[p] for p in positions]
    fractions = soft_targets(labels, stack.geometry, slice_indices, range(len(CLASS_NAMES)))
    return fractions.argmax(dim=1).numpy()


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the training set's per-feature mean and std, as [S, D, h, w] tensors."""
    flat = train.reshape(-1, train.shape[-1])
    mean, std = flat.mean(axis=0), flat.std(axis=0) + 1e-6
    return tuple(torch.from_numpy((x - mean) / std).float().permute(0, 3, 1, 2) for x in (train, test))


def voxel_probe_dice(train: np.ndarray, test: np.ndarray, stack: SliceStack, labels: np.ndarray,
                     split: ProbeSplit, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """DINOv2's linear protocol: token -> class logits (one linear map), upsampled bilinearly to voxels,
    trained full-batch with voxel cross-entropy on the training slices; voxel Dice on the test slices."""
    x_train, x_test = _standardise(train, test)
    target = torch.from_numpy(box_labels(stack, labels, split.train).astype(np.int64))
    torch.manual_seed(seed)
    linear = nn.Conv2d(x_train.shape[1], len(CLASS_NAMES), kernel_size=1)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = F.interpolate(linear(x_train), size=target.shape[1:], mode="bilinear", align_corners=False)
        F.cross_entropy(logits, target).backward()
        optimizer.step()
    with torch.no_grad():
        test_logits = linear(x_test).permute(0, 2, 3, 1)
    test_ks = [stack.geometry.slice_indices[p] for p in split.test]
    geometry = replace(stack.geometry, slice_indices=tuple(test_ks))
    predicted = geometry.upsample(test_logits, mode="bilinear", fill=0.0)[test_ks].argmax(axis=-1)
    return _named_dice(predicted, labels[test_ks])


def patch_probe_dice(train: np.ndarray, test: np.ndarray, stack: SliceStack, labels: np.ndarray,
                     split: ProbeSplit) -> dict[str, float]:
    """Logistic regression of each patch's majority tissue; Dice on the test slices' patch grids."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    probe.fit(train.reshape(-1, train.shape[-1]), patch_majority_labels(stack, labels, split.train).reshape(-1))
    predicted = probe.predict(test.reshape(-1, test.shape[-1]))
    return _named_dice(predicted, patch_majority_labels(stack, labels, split.test).reshape(-1))


def _named_dice(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    per_class = dice_per_class(predicted, truth, TISSUES)
    dice = {CLASS_NAMES[c]: per_class.get(c, 0.0) for c in TISSUES}
    dice["mean"] = float(np.mean(list(dice.values())))
    return dice


def untrained_backbones(encoder: Encoder) -> dict[str, nn.Module]:
    """The encoder's architecture untrained: timm's initialisation (seed 0) and, for a model trained by
    BrainDINOLib.training (its card holds the run's config), the run's own step-0 weights."""
    torch.manual_seed(0)
    backbones = {"same architecture, random init (timm)": encoder.architecture.build()}
    config = encoder.card.provenance.get("config") if encoder.card else None
    if config:
        config = config_from_dict(config)
        torch.manual_seed(config.run.seed)
        backbones["same architecture, the run's initial weights"] = build_network(config.model, config.loss).backbone
    return backbones


def tissue_probe(encoder: Encoder, t1: Volume, labels: np.ndarray,
                 preprocessing: PreprocessConfig) -> dict[str, dict[str, dict[str, float]]]:
    """{feature set: {"voxel": Dice per tissue + mean, "patch": same}} for the encoder, its untrained
    twins and raw intensity patches, on one thread (the figures are then the same on every machine size)."""
    stack = SliceStack.from_volume(t1, encoder.patch_size, preprocessing)
    split = choose_slices(stack, labels)
    extractors: dict[str, Callable[[list[int]], np.ndarray]] = {
        f"model ({encoder.model_id})": lambda pos: encoder_patch_features(encoder, stack, pos)}
    for name, backbone in untrained_backbones(encoder).items():
        twin = Encoder(backbone, encoder.checkpoint, encoder.device)
        extractors[name] = lambda pos, twin=twin: encoder_patch_features(twin, stack, pos)
    extractors["raw intensity patches"] = lambda pos: raw_patch_features(stack, pos, encoder.patch_size)
    results = {}
    with torch_threads(1):
        for name, extract in extractors.items():
            train, test = extract(split.train), extract(split.test)
            results[name] = {"voxel": voxel_probe_dice(train, test, stack, labels, split),
                             "patch": patch_probe_dice(train, test, stack, labels, split)}
            log.info("tissue probe: %s: voxel mean Dice %.3f", name, results[name]["voxel"]["mean"])
    return results
