"""`braindino demo`: the whole tour on the bundled sample and model, in one folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_options, declare_files, feature_cache, given, int_between, policy_from_args


def run_demo_command(args: argparse.Namespace) -> int:
    from ..checkpoints import BUILTIN_MODELS
    from ..demo import DemoConfig, run_demo
    from ..encoder import select_device
    from ..errors import BrainDINOError

    if args.model in BUILTIN_MODELS and not BUILTIN_MODELS[args.model].exists():
        raise BrainDINOError(args.model, f"the demo model is not bundled in this installation "
                                         f"({BUILTIN_MODELS[args.model]} is missing); run the demo with "
                                         "--model CHECKPOINT")
    device = args.device or "cpu"
    policy = policy_from_args(args, select_device(device).type)
    config = DemoConfig(model=args.model, device=device, policy=policy, batch_size=args.batch_size,
                        precision=args.precision, **given(args, "clusters", "labelled_slices"))
    print(f"BrainDINO demo on {config.volume.name} with model {args.model}, point: {config.point.name} "
          f"(RAS {config.point.ras} mm)")
    print(f"features: {policy.describe()} on {device}")
    result = run_demo(args.out, config, cache=feature_cache(args),
                      on_step=lambda name, seconds: print(f"  {name:40s} {seconds:6.1f} s", flush=True))
    print(f"  {'total':40s} {sum(result.seconds.values()):6.1f} s")
    if result.dice:
        mean = sum(result.dice.values()) / len(result.dice)
        scores = ", ".join(f"{name} {score:.2f}" for name, score in result.dice.items())
        print(f"few-shot Dice on the slices it was not shown: mean {mean:.2f} ({scores})")
    if result.dice_compared:
        old = sum(result.dice_compared.values()) / len(result.dice_compared)
        print(f"the same at the old resolution (224 px on every slice): mean {old:.2f}")
    print("wrote:")
    for what, path in result.outputs.items():
        print(f"  {path}  ({what})")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="features, maps and a few-shot segmentation of the bundled sample",
                               description="Run the BrainDINO tour on the bundled Colin27 T1: features, PCA map, "
                                           "similarity to the left putamen, k-means clusters and a few-shot lobe "
                                           "segmentation from a handful of labelled slices; writes the volumes "
                                           "and one report picture, and prints how long each step took. Runs "
                                           "on the CPU unless --device is given.")
    demo.add_argument("--out", type=Path, required=True, help="output folder")
    # Defaults: DemoConfig's.
    demo.add_argument("--clusters", type=int_between(1, 255), default=argparse.SUPPRESS,
                      help="k-means regions (default 8)")
    demo.add_argument("--labelled-slices", type=int_between(1), default=argparse.SUPPRESS,
                      help="axial slices the few-shot head learns from (default 5)")
    add_model_options(demo)
    demo.set_defaults(run=run_demo_command)
    declare_files(demo, outputs={"out": "folder"})
