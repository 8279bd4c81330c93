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

from BrainDINOLib.errors import report_errors  # noqa: E402
from BrainDINOLib.training.export import export_training_checkpoint  # noqa: E402


def note(text: str) -> tuple[str, str]:
    """`--note KEY=VALUE` -> (key, value)."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="<run.output_dir>/checkpoint.pth")
    parser.add_argument("output", type=Path, help="folder for <name>.safetensors, <name>.json (and the teacher)")
    parser.add_argument("--name", required=True, help="model name (file stem and card name)")
    parser.add_argument("--description", default="", help="one paragraph for the model card")
    parser.add_argument("--note", type=note, action="append", default=[], metavar="KEY=VALUE",
                        help="provenance entries")
    parser.add_argument("--no-teacher-checkpoint", action="store_true", help="write the safetensors file only")
    args = parser.parse_args()
    written = export_training_checkpoint(args.checkpoint, args.output, args.name, args.description, dict(args.note),
                                         teacher_checkpoint=not args.no_teacher_checkpoint)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(report_errors("export_model", main))
