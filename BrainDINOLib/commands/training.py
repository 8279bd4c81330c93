"""`braindino prepare-slices` and `braindino pretrain`: thin wrappers around BrainDINOLib.training."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .common import declare_files, given, int_between, tqdm_progress


def run_prepare_slices(args: argparse.Namespace) -> int:
    from ..training.shards import prepare_slices

    progress, bar = tqdm_progress("preparing slices", unit="volume")
    with bar:
        summary = prepare_slices(args.inputs, args.output, progress=progress,
                                 **given(args, "image_size", "patch_size", "shard_size"))
    for path in summary.skipped:
        print(f"skipped (unreadable): {path}", file=sys.stderr)
    print(summary.describe())
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    """One process: train here. Several: hand the same arguments to torchrun on this machine."""
    from ..training import entry

    if args.nproc_per_node <= 1:
        return entry.run(args)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc_per_node}", "-m", "BrainDINOLib.training.entry",
               "--config", str(args.config)]
    command += ["--resume"] if args.resume else []
    command += [item for override in args.overrides for item in ("--set", override)]
    command += ["--device", args.device] if args.device else []
    return subprocess.run(command, check=False).returncode


def register(commands: argparse._SubParsersAction) -> None:
    prepare = commands.add_parser("prepare-slices", help="normalise the axial slices of many volumes into shards "
                                                         "for pretraining")
    prepare.add_argument("inputs", nargs="+", help="volume files, folders (searched recursively) or CSV lists "
                                                   "(a 'path' column)")
    prepare.add_argument("--output", type=Path, required=True, help="folder for the shards and index.json")
    # Defaults: prepare_slices's.
    prepare.add_argument("--image-size", type=int_between(1), default=argparse.SUPPRESS,
                         help="slice size in pixels (default 224)")
    prepare.add_argument("--patch-size", type=int_between(1), default=argparse.SUPPRESS,
                         help="the model's patch size (default 16)")
    prepare.add_argument("--shard-size", type=int_between(1), default=argparse.SUPPRESS,
                         help="slices per shard file (default 256)")
    prepare.set_defaults(run=run_prepare_slices)
    declare_files(prepare, inputs={"inputs": "file or folder"}, outputs={"output": "folder"})

    from ..training.entry import add_pretrain_arguments

    pretrain = commands.add_parser("pretrain", help="self-supervised pretraining (DINO + iBOT + KoLeo) of an "
                                                    "encoder on prepared slices")
    add_pretrain_arguments(pretrain)
    pretrain.add_argument("--nproc-per-node", type=int_between(1), default=1,
                          help="processes on this machine (>1 runs torchrun --standalone); for several nodes "
                               "run torchrun with Training/pretrain.py yourself")
    pretrain.set_defaults(run=run_pretrain)
    declare_files(pretrain, inputs={"config": "config file"})
