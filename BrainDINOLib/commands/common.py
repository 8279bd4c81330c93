"""Pieces every subcommand shares: model and resolution options, the feature session, layer lists, a tqdm
progress callback."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

RESOLUTION_PRESETS = ("legacy", "cpu", "mps", "cuda", "fine")  # names of resolution.PRESETS (kept light: no torch)


def tqdm_progress(description: str, unit: str = "slice") -> tuple[Callable[[int, int], None], tqdm]:
    """A progress callback for the engine that drives a tqdm bar on stderr (use the bar as a context)."""
    bar = tqdm(desc=description, unit=unit, leave=False, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that embeds volumes: the model, where it runs, the feature cache, and
    the resolution (see `BrainDINOLib.resolution`)."""
    parser.add_argument("--model", default="demo", help="checkpoint file or built-in model name (default: demo)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: from free memory)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="feature cache folder (default: $BRAINDINO_CACHE or ~/.cache/braindino)")
    resolution = parser.add_argument_group("resolution (default: by device, printed at the start)")
    resolution.add_argument("--resolution", choices=RESOLUTION_PRESETS, default=None,
                            help="named setting: cpu (6 mm), mps (4 mm), cuda or fine (3 mm), legacy (224 px, every "
                                 "slice, bilinear: the behaviour before version 0.2)")
    size = resolution.add_mutually_exclusive_group()
    size.add_argument("--patch-mm", type=positive_float, default=None, metavar="MM",
                      help="in-plane size of one patch in mm; the model input size follows from the head's size")
    size.add_argument("--image-size", type=int, default=None, metavar="PX",
                      help="fixed model input size in pixels instead of --patch-mm (every slice unless "
                           "--slice-step-mm)")
    resolution.add_argument("--slice-step-mm", type=float, default=None, metavar="MM",
                            help="distance between embedded axial slices (default: the patch size; 0: every slice)")
    resolution.add_argument("--upsampling", choices=("guided", "bilinear"), default=None,
                            help="from patches to voxels: guided by the image (default) or bilinear")
    resolution.add_argument("--shifts", type=int, default=None, metavar="N",
                            help="embed each slice N x N times shifted by 1/N patch: an N times finer grid for N^2 "
                                 "the time (for GPUs)")


def policy_from_args(args: argparse.Namespace, device_type: str):
    """The `ResolutionPolicy` the options ask for: a preset (default: the device's), then single settings."""
    from ..resolution import PRESETS, default_policy, with_overrides

    policy = PRESETS[args.resolution] if args.resolution else default_policy(device_type)
    if args.patch_mm is not None:
        policy = replace(policy, patch_mm=args.patch_mm, image_size=None)
    return with_overrides(policy, image_size=args.image_size, slice_step_mm=args.slice_step_mm,
                          upsampling=args.upsampling, shifts=args.shifts)


def feature_cache(args: argparse.Namespace):
    from ..cache import FeatureCache

    return None if args.no_cache else FeatureCache(args.cache_dir)


def open_session(args: argparse.Namespace):
    """The `FeatureSession` the options ask for; prints its model, device and resolution."""
    from ..encoder import load_encoder
    from ..session import FeatureSession

    encoder = load_encoder(args.model, device=args.device)
    session = FeatureSession.for_encoder(encoder, policy_from_args(args, encoder.device.type), feature_cache(args),
                                         args.batch_size)
    print(f"features: {session.describe()}", flush=True)
    return session
