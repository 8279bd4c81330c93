"""The pretraining entry point every launcher shares: `python -m BrainDINOLib.training.entry` (what
Training/pretrain.py and `braindino pretrain` run, under torchrun or as one process).

    torchrun --nproc_per_node=N Training/pretrain.py --config Training/configs/X.yaml [--resume] [--set k=v ...]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import OneLineParser, report_errors


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see Training/configs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <run.output_dir>/checkpoint.pth if it exists (same step, optimizer, "
                             "schedules and random streams)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set optim.steps=100 (repeatable)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: the best available)")


def run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import pretrain

    config = load_config(args.config, args.overrides)
    result = pretrain(config, resume=args.resume, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pretrained {result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.4f}; "
              f"outputs in {result.output_dir}")
        for kind, path in result.exported.items():
            print(f"exported {kind}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description="BrainDINO self-supervised pretraining (run it under torchrun "
                                                 "for several processes or nodes)")
    add_pretrain_arguments(parser)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    return report_errors("pretrain", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
