"""Render synthetic T1/T2/FLAIR/PD-like brain volumes from the MNI152 GM/WM maps (training data for the
demo model; see BrainDINOLib/training/tissue.py for the tissue rule), plus the skull-stripped MNI152 T1.

    .venv/bin/python Training/render_contrasts.py ../shared/data/mni152_2009a OUT_FOLDER
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BrainDINOLib import read_volume, write_volume  # noqa: E402
from BrainDINOLib.training.tissue import SYNTHETIC_CONTRASTS, render_contrast, tissue_probabilities  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mni_folder", type=Path, help="folder with t1.nii.gz, gm.nii.gz and wm.nii.gz")
    parser.add_argument("output", type=Path, help="folder for the rendered .nii.gz volumes")
    args = parser.parse_args()
    t1 = read_volume(args.mni_folder / "t1.nii.gz")
    probabilities = tissue_probabilities(read_volume(args.mni_folder / "gm.nii.gz"),
                                         read_volume(args.mni_folder / "wm.nii.gz"))
    brain = probabilities[..., 0] < 1
    write_volume(t1.with_array(t1.array * brain), args.output / "mni152_t1_brain.nii.gz")
    for seed, (name, signals) in enumerate(SYNTHETIC_CONTRASTS.items()):
        path = write_volume(t1.with_array(render_contrast(probabilities, signals, seed=seed)),
                            args.output / f"mni152_{name}.nii.gz")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
