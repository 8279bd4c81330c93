"""Tissue probe: do an encoder's frozen patch tokens know brain tissue?

Targets: background / CSF / GM / WM of the MNI152 2009a template (rule in `BrainDINOLib/tissue.py`). Inputs:
the MNI152 T1 through a `FeatureSession`, at its resolution. 40 axial slices evenly spread over the brain; every
4th (10) trains, the other 30 are scored; their features are interpolated between embedded slices as every map's
are. Two probes, both linear on standardised patch tokens and the same for every feature set:

- voxel probe (DINOv2's linear segmentation protocol): a linear map from each token to class logits on the
  patch grid, upsampled to the voxels as every map is (guided by the image or bilinear, by the session's
  resolution policy) and trained with voxel cross-entropy; scored by voxel Dice. This is the headline figure:
  it asks what a user of the features gets.
- patch probe: multinomial logistic regression of each patch's majority tissue; scored by Dice on the
  patch grid. It asks whether a token knows its own patch, free of the patch-size limit on voxel Dice.

Feature sets: the encoder; the same architecture untrained (timm's initialisation and, for a model trained
here, the run's own step-0 weights, rebuilt from the config in its card); and raw intensities (each
patch's own normalised pixels), a baseline that any learned feature should beat.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from ..encoder import Encoder
from ..features import VoxelMapping
from ..heads.metrics import dice_per_class
from ..heads.segmentation import soft_targets
from ..session import FeatureSession
from ..slices import SliceGeometry, SliceStack
from ..threads import torch_threads
from ..tissue import CLASS_NAMES, TISSUE_CLASSES
from ..upsample import interpolate_slices
from ..volume import Volume
from .config import config_from_dict
from .model import build_network

log = logging.getLogger(__name__)

PROBE_WEIGHTS_MIB = 256  # the guided weights of the probe's 40 slices (about 64 MiB for MNI152 at 1 mm)


@dataclass(frozen=True)
class ProbeSplit:
    """The probe's axial slices (voxel slice indices k): training and test."""

    train: list[int]
    test: list[int]


def choose_slices(covered: range, labels: np.ndarray, count: int = 40, train_every: int = 4) -> ProbeSplit:
    """`count` slices evenly spread over those (of `covered`) with at least 20% of the largest brain area;
    every `train_every`-th one trains, the rest test."""
    candidates = np.asarray(covered)
    brain_area = np.array([(labels[k] > 0).sum() for k in candidates])
    candidates = candidates[brain_area >= 0.2 * brain_area.max()]
    chosen = candidates[np.linspace(0, len(candidates) - 1, count).round().astype(int)]
    return ProbeSplit([int(k) for k in chosen[::train_every]],
                      [int(k) for i, k in enumerate(chosen) if i % train_every])


def raw_patch_features(stack: SliceStack, patch: int) -> Tensor:
    """Each grid cell's own normalised pixels [S, h, w, patch^2] (a baseline any learned feature should beat)."""
    windows = stack.batch(0, len(stack), 1)
    side = stack.geometry.patches
    cells = F.unfold(windows, patch, stride=patch).transpose(1, 2).reshape(len(windows), side, side, -1)
    return stack.interleave(cells)


def window_labels(mapping: VoxelMapping, labels: np.ndarray, slice_indices: list[int]) -> np.ndarray:
    """Voxel labels [n, rows, cols] of the part of the box inside the volume, on slices `slice_indices`."""
    _, _, rows, cols = mapping.slices.window()
    return labels[slice_indices][:, rows, cols]


def patch_majority_labels(geometry: SliceGeometry, labels: np.ndarray, slice_indices: list[int]) -> np.ndarray:
    """Majority class of each grid cell [n, h, w]: the largest of the cell's class fractions."""
    return soft_targets(labels, geometry, slice_indices, range(len(CLASS_NAMES))).argmax(dim=1).numpy()


def _standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets [n, h, w, C] scaled by the training set's per-feature mean and std, as [n, C, h, w]."""
    flat = train.reshape(-1, train.shape[-1])
    mean, std = flat.mean(dim=0), flat.std(dim=0) + 1e-6
    return tuple(((x - mean) / std).permute(0, 3, 1, 2).contiguous() for x in (train, test))


def voxel_probe_dice(train: Tensor, test: Tensor, mapping: VoxelMapping, labels: np.ndarray, split: ProbeSplit,
                     steps: int = 300, lr: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """DINOv2's linear protocol: token -> class logits (one linear map), upsampled to the voxels as every map is
    (`mapping`'s upsampler: guided by the image or bilinear), trained full-batch with voxel cross-entropy on
    the training slices; voxel Dice on the test slices."""
    x_train, x_test = _standardise(train, test)
    upsample = mapping.upsampler(keep_weights_mib=PROBE_WEIGHTS_MIB)  # every step maps the same slices
    target = torch.from_numpy(window_labels(mapping, labels, split.train).astype(np.int64))
    torch.manual_seed(seed)
    linear = nn.Conv2d(x_train.shape[1], len(CLASS_NAMES), kernel_size=1)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(upsample(linear(x_train), split.train), target).backward()
        optimizer.step()
    with torch.no_grad():
        predicted = upsample(linear(x_test), split.test).argmax(dim=1).numpy()
    return _named_dice(predicted, window_labels(mapping, labels, split.test))


def patch_probe_dice(train: Tensor, test: Tensor, geometry: SliceGeometry, labels: np.ndarray,
                     split: ProbeSplit) -> dict[str, float]:
    """Logistic regression of each cell's majority tissue; Dice on the test slices' grids."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    probe.fit(train.reshape(-1, train.shape[-1]).numpy(),
              patch_majority_labels(geometry, labels, split.train).reshape(-1))
    predicted = probe.predict(test.reshape(-1, test.shape[-1]).numpy())
    return _named_dice(predicted, patch_majority_labels(geometry, labels, split.test).reshape(-1))


def _named_dice(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    per_class = dice_per_class(predicted, truth, TISSUE_CLASSES)  # mean Dice: CSF, GM, WM
    dice = {CLASS_NAMES[c]: per_class.get(c, 0.0) for c in TISSUE_CLASSES}
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


def tissue_probe(session: FeatureSession, t1: Volume, labels: np.ndarray,
                 baselines: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """{feature set: {"voxel": Dice per tissue + mean, "patch": same}} for the session's encoder and (with
    `baselines`) its untrained twins and raw intensity patches, at the session's resolution, on one thread
    (the figures are then the same on every machine size)."""
    with torch_threads(1):
        features = session.features(t1)
        split = choose_slices(features.covered, labels)
        cell_sets: dict[str, Tensor] = {f"model ({session.encoder.model_id})": features.patches}
        for name, backbone in untrained_backbones(session.encoder).items() if baselines else ():
            twin = Encoder(backbone, session.encoder.checkpoint, session.encoder.device, session.encoder.precision)
            cell_sets[name] = FeatureSession.for_encoder(twin, session.policy).features(t1).patches
        if baselines:
            cell_sets["raw intensity patches"] = raw_patch_features(session.slice_stack(t1), session.encoder.patch_size)
        results = {}
        for name, cells in cell_sets.items():
            train, test = (interpolate_slices(cells, features.slices, ks) for ks in (split.train, split.test))
            results[name] = {"voxel": voxel_probe_dice(train, test, features.mapping, labels, split),
                             "patch": patch_probe_dice(train, test, features.slices, labels, split)}
            log.info("tissue probe: %s: voxel mean Dice %.3f", name, results[name]["voxel"]["mean"])
    return results
