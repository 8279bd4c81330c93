"""`braindino few-shot`: segment a volume from a few of its axial slices painted in a label volume."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..heads.tasks import SEGMENTATION_KINDS
from .common import add_model_options, declare_files, open_session, tqdm_progress
from .heads import head_path
from .maps import output_path, png_path


def run_few_shot(args: argparse.Namespace) -> int:
    from ..volume import read_label_volume, read_volume, write_volume

    volume = read_volume(args.volume)  # unreadable inputs are refused before torch is imported
    labels = read_label_volume(args.labels)
    from ..atomic import write_text_atomic
    from ..heads import save_head
    from ..heads.painted import (check_painted_grid, find_label_table, learn_from_painted, painted_labels,
                                 read_label_table)

    check_painted_grid(labels, volume, source=args.labels)  # before the model is loaded
    table = args.names or find_label_table(args.labels)
    classes = read_label_table(table) if table else ()
    painted = painted_labels(labels, classes, source=args.labels)
    print(f"{len(painted.slice_indices)} labelled slices ({', '.join(map(str, painted.slice_indices))}), classes: "
          f"{', '.join(f'{c.value} {c.name}' for c in painted.classes)}" + (f" (names from {table})" if table else ""))
    session = open_session(args)
    started = time.perf_counter()
    progress, bar = tqdm_progress("few-shot")
    with bar:
        result = learn_from_painted(session, volume, painted, kind=args.kind, cleanup=args.cleanup,
                                    progress=progress)
    write_volume(result.labels, args.out)
    names = "".join(f"{c.value} {c.name}\n" for c in result.head.card.classes)
    table_out = args.out.with_name(args.out.name.split(".")[0] + ".txt")
    write_text_atomic(table_out, names)
    print(f"segmented {args.volume} in {time.perf_counter() - started:.1f} s; wrote {args.out} and {table_out}")
    if args.head:
        print(f"wrote {save_head(result.head, args.head)} (apply it to other volumes with `braindino segment`)")
    if args.png:
        from ..montage import OverlayStyle, save_montage

        style = OverlayStyle("labels", alpha=0.5, names={c.value: c.name for c in result.head.card.classes if c.value})
        save_montage(volume, result.labels, args.png, style, title=f"few-shot segmentation of {Path(args.volume).name}"
                     f" from {len(painted.slice_indices)} labelled slices")
        print(f"wrote {args.png} (picture)")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    text = ("segment a volume from a few painted axial slices: LABELS is a label volume on the same grid in which "
            "some axial slices are painted (any non-zero voxel makes a slice labelled; 0 inside it is background); "
            "every other slice is predicted")
    parser = commands.add_parser("few-shot", help="segment a volume from a few of its axial slices painted in a "
                                                  "label volume", description=text)
    parser.add_argument("volume", help="NIfTI/NRRD/MHA file or DICOM folder")
    parser.add_argument("--labels", required=True, type=Path, help="label volume with a few painted axial slices")
    parser.add_argument("--names", type=Path, default=None,
                        help="label table: `value name` lines, a Slicer colour table or an ITK-SNAP label "
                             "description (default: LABELS' name with .txt, .ctbl or .label, when present)")
    parser.add_argument("--out", type=output_path, required=True, help="label volume to write, with a .txt table of "
                                                                       "the class names beside it")
    parser.add_argument("--png", type=png_path, default=None, help="also write a PNG montage")
    parser.add_argument("--head", type=head_path, default=None, help="also save the fitted head (.safetensors)")
    parser.add_argument("--kind", default="mlp", choices=SEGMENTATION_KINDS, help="head (default mlp)")
    parser.add_argument("--cleanup", action="store_true", help="keep each label's largest connected component")
    add_model_options(parser)
    parser.set_defaults(run=run_few_shot)
    declare_files(parser, inputs={"volume": "file or folder", "labels": "label file", "names": "label table"},
                  outputs={"out": "file", "png": "file", "head": "file"})
