"""Few-shot segmentation head fitting time from cached features, on CPU.

Embeds the bundled Colin27 T1 once (the cost a user pays once per volume; afterwards it comes from the
feature cache), then fits few-shot heads from 3 and 5 labelled axial slices (AAL merged into lobes) and
segments the whole volume. The baseline, measured in the same run, is embedding the volume: fitting
should cost a small fraction of it.

    .venv/bin/python benchmarks/fit_speed.py [--model CHECKPOINT] [--image-size 224] [--layers 0,1,2]
                                            [--spacing 1] [--threads 1] [--repeats 3] [--smoke]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _common import read_resampled
from BrainDINOLib import embed_volume, load_encoder
from BrainDINOLib.resolution import DEFAULTS, ResolutionPolicy
from BrainDINOLib.heads import few_shot_segment, segment
from BrainDINOLib.heads.metrics import dice_per_class
from BrainDINOLib.atlas import COLIN27_AAL, COLIN27_T1, merge_aal_into_lobes

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "dinov3_teacher" / "teacher_checkpoint.pth"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--patch-mm", type=float, default=DEFAULTS["cpu"].patch_mm)
    parser.add_argument("--layers", default="0,1,2")
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true",
                        help="16-mm patches, 4 mm voxels, one thread, one repeat: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.patch_mm, args.spacing, args.threads, args.repeats = 16.0, 4.0, 1, 1
    torch.set_num_threads(args.threads)
    encoder = load_encoder(args.model, device="cpu")
    volume = read_resampled(COLIN27_T1, args.spacing, labels=False)
    lobes, names = merge_aal_into_lobes(read_resampled(COLIN27_AAL, args.spacing, labels=True).array)
    layers = tuple(int(x) for x in args.layers.split(",") if x)

    started = time.perf_counter()
    features = embed_volume(volume, encoder, policy=ResolutionPolicy(patch_mm=args.patch_mm), layers=layers)
    embed_s = time.perf_counter() - started
    print(f"encoder {encoder.model_id}, volume {volume.shape} at {args.spacing} mm, {features.num_slices} slices, "
          f"grid {features.grid}, blocks {layers}, {args.threads} thread(s)")
    print(f"baseline: embedding the volume            {embed_s:7.2f} s")
    area = (lobes > 0).sum(axis=(1, 2))
    brain = [k for k in features.covered if area[k] > 0.3 * area.max()]
    for count in (3, 5):
        labelled = [brain[int(len(brain) * (i + 0.5) / count)] for i in range(count)]
        totals, segments = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = few_shot_segment(features, lobes, labelled, class_names=names)
            totals.append(time.perf_counter() - started)
            started = time.perf_counter()
            segment(result.head, features)
            segments.append(time.perf_counter() - started)
        held_out = [k for k in brain if k not in labelled]
        dice = dice_per_class(result.labels.array[held_out], lobes[held_out], range(1, len(names)))
        total, seg = statistics.median(totals), statistics.median(segments)
        print(f"few-shot, {count} labelled slices: fit {total - seg:5.2f} s + segment the volume {seg:5.2f} s "
              f"= {total:5.2f} s ({total / embed_s:.2f} x embedding; held-out mean Dice "
              f"{np.mean(list(dice.values())):.3f})")


if __name__ == "__main__":
    main()
