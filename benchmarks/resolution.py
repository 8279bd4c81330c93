"""What resolution costs and buys: the old default against physical resolution policies, in one run.

Volume: the bundled Colin27 T1 (1 mm) with its AAL atlas merged into lobes; model: the bundled demo model
(or --model); CPU. For each setting it prints:
- features: seconds to embed the volume (with the blocks segmentation reads), and the ratio to the old default;
- few-shot: seconds to fit a head on 5 labelled axial slices and segment the volume, and the mean lobe Dice on
  every slice it was not shown (the demo's protocol);
- probe: the tissue voxel probe's mean Dice (CSF / GM / WM of the MNI152 template; training/probe.py);
- stripes: the stripe index of the PCA map (3 components), inside the brain: the mean squared difference
  between neighbouring axial slices over that between neighbouring rows. 1 is isotropic; embedding every
  slice on its own makes neighbouring slices disagree (far above 1).

    .venv/bin/python benchmarks/resolution.py [--settings old,cpu,cpu-bilinear,fine] [--smoke]

--smoke runs two coarse settings on the volumes at 4 mm in seconds (make test runs it, so the script cannot rot).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import SimpleITK as sitk
import torch

from BrainDINOLib.atlas import COLIN27_AAL, COLIN27_T1, MNI152_GM, MNI152_T1, MNI152_WM, merge_aal_into_lobes
from BrainDINOLib.demo import lobe_few_shot
from BrainDINOLib.encoder import load_encoder
from BrainDINOLib.maps import pca_map
from BrainDINOLib.resolution import LEGACY, PRESETS, ResolutionPolicy
from BrainDINOLib.session import FeatureSession
from BrainDINOLib.threads import torch_threads
from BrainDINOLib.training.probe import tissue_probe
from BrainDINOLib.tissue import tissue_classes
from BrainDINOLib.volume import Volume, read_volume

SETTINGS: dict[str, ResolutionPolicy] = {
    "old": LEGACY,
    "cpu": PRESETS["cpu"],
    "cpu-bilinear": replace(PRESETS["cpu"], upsampling="bilinear"),
    "cpu-shifts": replace(PRESETS["cpu"], shifts=2),
    "fine": PRESETS["fine"],
}
SMOKE_SETTINGS = {"old": replace(LEGACY, image_size=64), "coarse": ResolutionPolicy(patch_mm=16.0)}


def stripe_index(components: np.ndarray, brain: np.ndarray) -> float:
    """Mean squared difference of a map [Z, Y, X, C] between neighbouring axial slices, over that between
    neighbouring rows, both where the two voxels are in `brain`."""
    def mean_square(axis: int) -> float:
        near = [slice(None)] * 3
        far = [slice(None)] * 3
        near[axis], far[axis] = slice(0, -1), slice(1, None)
        both = brain[tuple(near)] & brain[tuple(far)]
        return float(((components[tuple(far)] - components[tuple(near)]) ** 2).sum(axis=-1)[both].mean())
    return mean_square(0) / mean_square(1)


def resampled(path, spacing: float | None, labels: bool = False) -> Volume:
    """A bundled volume, at `spacing` mm (None: as it is)."""
    if spacing is None:
        return read_volume(path)
    image = sitk.ReadImage(str(path))
    size = [int(round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                          image.GetOrigin(), [spacing] * 3, image.GetDirection(), 0, sitk.sitkFloat32)
    return Volume.from_image(image, source=str(path))


def measure(name: str, policy: ResolutionPolicy, encoder, volume, lobes, names, brain, mni, tissue) -> dict:
    session = FeatureSession.for_encoder(encoder, policy)
    started = time.perf_counter()
    features = session.features(volume, session.segmentation_layers)
    features_s = time.perf_counter() - started
    started = time.perf_counter()
    with torch_threads(1):
        _, _, dice = lobe_few_shot(features, lobes, names, 5, session.segmentation_layers)
    few_shot_s = time.perf_counter() - started
    components = pca_map(features).components.array
    probe = tissue_probe(session, mni, tissue, baselines=False)
    (model_probe,) = probe.values()
    h, w = features.grid
    return {"setting": name, "policy": policy.describe(), "grid": f"{len(features.slices.slice_indices)} x {h}x{w}",
            "features_s": features_s, "few_shot_s": few_shot_s, "dice": float(np.mean(list(dice.values()))),
            "probe": model_probe["voxel"]["mean"], "stripes": stripe_index(components, brain)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--settings", default="old,cpu,cpu-bilinear,fine",
                        help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for embedding (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny run: coarse settings, volumes at 4 mm")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spacing = 4.0 if args.smoke else None
    settings = SMOKE_SETTINGS if args.smoke else {name: SETTINGS[name] for name in args.settings.split(",")}
    encoder = load_encoder(args.model, device="cpu")
    volume = resampled(COLIN27_T1, spacing)
    atlas = resampled(COLIN27_AAL, spacing, labels=True)
    lobes, names = merge_aal_into_lobes(np.rint(atlas.array).astype(np.int64))
    brain = lobes > 0
    mni = resampled(MNI152_T1, spacing)
    tissue = tissue_classes(resampled(MNI152_GM, spacing), resampled(MNI152_WM, spacing))
    print(f"Colin27 {volume.shape} with {encoder.model_id} ({encoder.precision}) on {torch.get_num_threads()} CPU "
          f"thread(s)")
    rows = []
    for name, policy in settings.items():
        rows.append(measure(name, policy, encoder, volume, lobes, names, brain, mni, tissue))
        print(f"measured {name}: {rows[-1]}", flush=True)  # a long run shows its figures as they come
    base = rows[0]["features_s"]
    print(f"{'setting':14s} {'policy':58s} {'tokens':>12s} {'features':>14s} {'few-shot':>9s} {'lobe Dice':>9s} "
          f"{'probe':>6s} {'stripes':>8s}")
    for row in rows:
        print(f"{row['setting']:14s} {row['policy']:58s} {row['grid']:>12s} {row['features_s']:7.1f} s "
              f"{row['features_s'] / base:4.2f}x {row['few_shot_s']:7.1f} s {row['dice']:9.3f} {row['probe']:6.3f} "
              f"{row['stripes']:8.2f}")


if __name__ == "__main__":
    main()
