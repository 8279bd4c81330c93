"""Linear probe for MNI152 tissue classes on frozen patch features: does an encoder know tissue?

Targets: background / CSF / GM / WM from the MNI152 2009a GM and WM probability maps (the rule is in
BrainDINOLib/training/tissue.py). Inputs: the MNI152 T1 template through the engine's SliceStack. 40
axial slices evenly spread over the brain; every 4th (10) trains a per-patch multinomial logistic
regression (standardised features, label = majority class of the patch's voxels), the other 30 are
scored: patch probabilities are upsampled bilinearly to voxels, argmax, Dice per class against the voxel
labels, mean over CSF, GM and WM.

Feature sets, same probe:
- the model (frozen patch tokens after the final norm),
- the same architecture at random initialisation: timm's (seed 0) and, for models trained here, the run's
  own initial weights (rebuilt from the config in the model card),
- raw intensities: the patch's own normalised pixels (patch_size^2 values).

    .venv/bin/python Training/probe_tissue.py --model demo [--image-size 224] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BrainDINOLib import Encoder, PreprocessConfig, SliceStack, load_encoder, read_volume  # noqa: E402
from BrainDINOLib.atomic import write_text_atomic  # noqa: E402
from BrainDINOLib.embedding import default_preprocessing  # noqa: E402
from BrainDINOLib.training.config import config_from_dict  # noqa: E402
from BrainDINOLib.training.model import build_network  # noqa: E402
from BrainDINOLib.training.tissue import CLASS_NAMES, tissue_classes  # noqa: E402

DEFAULT_MNI = Path(__file__).resolve().parents[2] / "shared" / "data" / "mni152_2009a"


def choose_slices(stack: SliceStack, labels: np.ndarray, count: int = 40, train_every: int = 4) -> tuple[list, list]:
    """Positions (in the stack) of `count` slices evenly spread over those with at least 20% of the largest
    brain area; every `train_every`-th one trains, the rest test."""
    brain_area = np.array([(labels[k] > 0).sum() for k in stack.geometry.slice_indices])
    candidates = np.flatnonzero(brain_area >= 0.2 * brain_area.max())
    chosen = candidates[np.linspace(0, len(candidates) - 1, count).round().astype(int)]
    return list(chosen[::train_every]), [p for i, p in enumerate(chosen) if i % train_every]


def patch_labels(stack: SliceStack, labels: np.ndarray, positions: list[int]) -> np.ndarray:
    """Majority class of each patch [S, h, w]: voxel one-hots cut to the stack's box, averaged per patch."""
    row0, col0, rows, cols = stack.geometry.box
    onehot = torch.from_numpy(np.eye(len(CLASS_NAMES), dtype=np.float32)[labels]).permute(0, 3, 1, 2)
    pad = (max(0, -col0), max(0, col0 + cols - labels.shape[2]), max(0, -row0), max(0, row0 + rows - labels.shape[1]))
    background = torch.zeros(len(CLASS_NAMES))
    background[0] = 1
    ks = [stack.geometry.slice_indices[p] for p in positions]
    padded = F.pad(onehot[ks] - background[None, :, None, None], pad) + background[None, :, None, None]
    r, c = row0 + pad[2], col0 + pad[0]
    fractions = F.adaptive_avg_pool2d(padded[:, :, r:r + rows, c:c + cols], stack.geometry.grid)
    return fractions.argmax(dim=1).numpy()


def encoder_features(encoder: Encoder, stack: SliceStack, positions: list[int]) -> np.ndarray:
    images = torch.cat([stack.batch(p, p + 1, encoder.architecture.in_chans) for p in positions])
    return torch.cat([encoder.tokens(images[i:i + 8]).patches for i in range(0, len(images), 8)]).float().numpy()


def raw_patch_features(stack: SliceStack, positions: list[int], patch: int) -> np.ndarray:
    images = stack.images[positions]  # [S, 1, H, W]
    h, w = stack.geometry.grid
    return F.unfold(images, patch, stride=patch).transpose(1, 2).reshape(len(positions), h, w, -1).numpy()


def probe_dice(features: dict[str, np.ndarray], stack: SliceStack, labels: np.ndarray, train: list[int],
               test: list[int]) -> dict[str, float]:
    """Fit the per-patch probe on the train slices, score voxel Dice per class on the test slices."""
    targets = patch_labels(stack, labels, train)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    x = features["train"]
    probe.fit(x.reshape(-1, x.shape[-1]), targets.reshape(-1))
    y = features["test"]
    probabilities = np.zeros((*y.shape[:3], len(CLASS_NAMES)), dtype=np.float32)
    probabilities[..., probe.classes_] = probe.predict_proba(y.reshape(-1, y.shape[-1])).reshape(*y.shape[:3], -1)
    test_ks = [stack.geometry.slice_indices[p] for p in test]
    geometry = replace(stack.geometry, slice_indices=tuple(test_ks))
    predicted = geometry.upsample(probabilities, mode="bilinear", fill=0.0)[test_ks].argmax(axis=-1)
    truth = labels[test_ks]
    dice = {}
    for label, name in enumerate(CLASS_NAMES[1:], start=1):
        overlap = np.logical_and(predicted == label, truth == label).sum()
        dice[name] = float(2 * overlap / max(1, (predicted == label).sum() + (truth == label).sum()))
    dice["mean"] = float(np.mean([dice[n] for n in CLASS_NAMES[1:]]))
    return dice


def random_backbones(encoder: Encoder) -> dict[str, torch.nn.Module]:
    """The same architecture untrained: timm's initialisation (seed 0) and, for a model trained by
    BrainDINOLib.training (its card holds the run's config), the run's own step-0 weights."""
    torch.manual_seed(0)
    backbones = {"same architecture, random init (timm)": encoder.architecture.build()}
    config = encoder.card.provenance.get("config") if encoder.card else None
    if config:
        config = config_from_dict(config)
        torch.manual_seed(config.run.seed)
        backbones["same architecture, the run's initial weights"] = build_network(config.model, config.loss).backbone
    return backbones


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint or built-in model name (default demo)")
    parser.add_argument("--mni", type=Path, default=DEFAULT_MNI, help="folder with t1/gm/wm .nii.gz")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's preprocessing")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    encoder = load_encoder(args.model, device="cpu")
    config = default_preprocessing(encoder)
    if args.image_size:
        config = replace(config, image_size=args.image_size)
    labels = tissue_classes(read_volume(args.mni / "gm.nii.gz"), read_volume(args.mni / "wm.nii.gz"))
    stack = SliceStack.from_volume(read_volume(args.mni / "t1.nii.gz"), encoder.patch_size,
                                   PreprocessConfig.from_dict(config.to_dict()))
    train, test = choose_slices(stack, labels)

    feature_sets = {f"model ({encoder.model_id})": lambda pos: encoder_features(encoder, stack, pos)}
    for name, backbone in random_backbones(encoder).items():
        random_encoder = Encoder(backbone, encoder.checkpoint, encoder.device)
        feature_sets[name] = lambda pos, e=random_encoder: encoder_features(e, stack, pos)
    feature_sets["raw intensity patches"] = lambda pos: raw_patch_features(stack, pos, encoder.patch_size)
    results = {}
    for name, extract in feature_sets.items():
        results[name] = probe_dice({"train": extract(train), "test": extract(test)}, stack, labels, train, test)
    h, w = stack.geometry.grid
    print(f"MNI152 tissue probe: {len(train)} train / {len(test)} test axial slices, image {config.image_size} px, "
          f"{h}x{w} patches of {encoder.patch_size} px")
    print(f"{'features':60s} {'CSF':>6s} {'GM':>6s} {'WM':>6s} {'mean':>6s}")
    for name, dice in results.items():
        print(f"{name:60s} {dice['CSF']:6.3f} {dice['GM']:6.3f} {dice['WM']:6.3f} {dice['mean']:6.3f}")
    if args.json:
        summary = {"model": str(args.model), "model_id": encoder.model_id, "image_size": config.image_size,
                   "train_slices": [int(stack.geometry.slice_indices[p]) for p in train],
                   "test_slices": [int(stack.geometry.slice_indices[p]) for p in test], "dice": results}
        write_text_atomic(args.json, json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
