"""Export the teacher of a pretraining checkpoint as a model the engine reads (safetensors + model card, and
the BrainDINO teacher checkpoint), e.g. from a run that is still going or to bundle a model with notes.

    .venv/bin/python Training/export_model.py runs/demo/checkpoint.pth OUT_FOLDER --name demo \
        --description "..." --note key=value ... [--no-teacher-checkpoint]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BrainDINOLib.training.export import export_training_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="<run.output_dir>/checkpoint.pth")
    parser.add_argument("output", type=Path, help="folder for <name>.safetensors, <name>.json (and the teacher)")
    parser.add_argument("--name", required=True, help="model name (file stem and card name)")
    parser.add_argument("--description", default="", help="one paragraph for the model card")
    parser.add_argument("--note", action="append", default=[], metavar="KEY=VALUE", help="provenance entries")
    parser.add_argument("--no-teacher-checkpoint", action="store_true", help="write the safetensors file only")
    args = parser.parse_args()
    notes = dict(item.split("=", 1) for item in args.note)
    written = export_training_checkpoint(args.checkpoint, args.output, args.name, args.description, notes,
                                         teacher_checkpoint=not args.no_teacher_checkpoint)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
