"""Tissue probe of any model: do its frozen patch tokens know MNI152 background / CSF / GM / WM?

10 training and 30 test axial slices of the MNI152 2009a T1; a voxel probe (DINOv2's linear protocol) and a
patch probe, each run on the model, on the same architecture untrained and on raw intensity patches. The
method is documented in BrainDINOLib/training/probe.py.

    .venv/bin/python Training/probe_tissue.py --model demo [--image-size 448] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BrainDINOLib import load_encoder, read_volume  # noqa: E402
from BrainDINOLib.atlas import MNI152_GM, MNI152_T1, MNI152_WM  # noqa: E402
from BrainDINOLib.atomic import write_text_atomic  # noqa: E402
from BrainDINOLib.cli import report_errors  # noqa: E402
from BrainDINOLib.embedding import default_preprocessing  # noqa: E402
from BrainDINOLib.training.probe import tissue_probe  # noqa: E402
from BrainDINOLib.tissue import tissue_classes  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint or built-in model name (default demo)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's preprocessing")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    encoder = load_encoder(args.model, device="cpu")
    preprocessing = default_preprocessing(encoder)
    if args.image_size:
        preprocessing = replace(preprocessing, image_size=args.image_size)
    labels = tissue_classes(read_volume(MNI152_GM), read_volume(MNI152_WM))
    results = tissue_probe(encoder, read_volume(MNI152_T1), labels, preprocessing)

    grid = preprocessing.image_size // encoder.patch_size
    print(f"MNI152 tissue probe: 10 train / 30 test axial slices, image {preprocessing.image_size} px, "
          f"{grid}x{grid} patches of {encoder.patch_size} px; Dice per class")
    print(f"{'features':48s} {'voxel probe: CSF    GM    WM  mean':>36s}   {'patch probe: mean':>17s}")
    for name, dice in results.items():
        voxel = dice["voxel"]
        print(f"{name:48s} {voxel['CSF']:17.3f} {voxel['grey matter']:5.3f} {voxel['white matter']:5.3f} "
              f"{voxel['mean']:5.3f}   {dice['patch']['mean']:17.3f}")
    if args.json:
        summary = {"model": str(args.model), "model_id": encoder.model_id,
                   "image_size": preprocessing.image_size, "dice": results}
        write_text_atomic(args.json, json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(report_errors("probe_tissue", main))
