"""Tissue probe of any model: do its frozen patch tokens know MNI152 background / CSF / GM / WM?

10 training and 30 test axial slices of the MNI152 2009a T1; a voxel probe (DINOv2's linear protocol) and a
patch probe, each run on the model, on the same architecture untrained and on raw intensity patches. The
method is documented in BrainDINOLib/training/probe.py.

    .venv/bin/python Training/probe_tissue.py --model demo [--resolution legacy | --patch-mm 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BrainDINOLib import read_volume  # noqa: E402
from BrainDINOLib.atlas import MNI152_GM, MNI152_T1, MNI152_WM  # noqa: E402
from BrainDINOLib.atomic import write_text_atomic  # noqa: E402
from BrainDINOLib.commands.common import add_model_options, open_session  # noqa: E402
from BrainDINOLib.errors import report_errors  # noqa: E402
from BrainDINOLib.training.probe import tissue_probe  # noqa: E402
from BrainDINOLib.tissue import tissue_classes  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    add_model_options(parser)
    parser.set_defaults(device="cpu", no_cache=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    session = open_session(args)
    labels = tissue_classes(read_volume(MNI152_GM), read_volume(MNI152_WM))
    results = tissue_probe(session, read_volume(MNI152_T1), labels)

    print("MNI152 tissue probe: 10 train / 30 test axial slices; Dice per class")
    print(f"{'features':48s} {'voxel probe: CSF    GM    WM  mean':>36s}   {'patch probe: mean':>17s}")
    for name, dice in results.items():
        voxel = dice["voxel"]
        print(f"{name:48s} {voxel['CSF']:17.3f} {voxel['grey matter']:5.3f} {voxel['white matter']:5.3f} "
              f"{voxel['mean']:5.3f}   {dice['patch']['mean']:17.3f}")
    if args.json:
        summary = {"model": str(args.model), "model_id": session.encoder.model_id,
                   "resolution": session.policy.to_dict(), "dice": results}
        write_text_atomic(args.json, json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(report_errors("probe_tissue", main))
