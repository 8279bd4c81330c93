"""Pieces every subcommand shares: model and resolution options, the feature session, layer lists, a tqdm
progress callback, and the check of input and output paths that runs before any command does slow work."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

PROGRESS_LINES = False  # `braindino --progress-lines`: progress as lines for front ends (process.PROGRESS_PREFIX)


def tqdm_progress(description: str, unit: str = "slice") -> tuple[Callable[[int, int], None], tqdm]:
    """A progress callback for the engine that drives a tqdm bar on stderr (use the bar as a context).

    The bar is drawn only on a terminal and only after a second of work, and it is erased when it closes
    (also on an error), so an error message stays the one line on stderr. With `--progress-lines` the bar
    stays off and each step is a JSON line on stdout, which a front end running the command reads."""
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=unit, leave=False, dynamic_ncols=True, disable=True if PROGRESS_LINES else None,
               delay=1.0)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if PROGRESS_LINES:
            import json

            from ..process import PROGRESS_PREFIX
            print(PROGRESS_PREFIX + json.dumps({"stage": description, "done": int(done), "total": int(total)}),
                  flush=True)

    return update, bar


def int_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when `high` is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}")
        return value
    return parse


def float_between(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number in [low, high] (NaN and infinities refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a number from {low:g} to {high:g}, got {text!r}")
        return value
    return parse


def comma_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated names (blanks dropped), e.g. manifest columns or sequences."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None


def given(args: argparse.Namespace, *names: str) -> dict:
    """The options among `names` that the user gave, for a config or function whose own defaults stand for the
    rest: an option declared with `default=argparse.SUPPRESS` is absent from `args` unless given, so its
    default is written once, in the engine."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def add_model_options(parser: argparse.ArgumentParser, cache: bool = True) -> None:
    """Options shared by every command that embeds volumes: the model, where it runs, the feature cache (unless
    `cache` is False), and the resolution (see `BrainDINOLib.resolution`)."""
    from ..precision import PRECISIONS  # both torch-free: the choices come from the engine, not a copy
    from ..resolution import PRESETS, UPSAMPLING_METHODS

    parser.add_argument("--model", default="demo", help="checkpoint file or built-in model name (default: demo)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="how the encoder computes (default auto: int8 on an x86 CPU, bf16 on CUDA, fp32 "
                             "elsewhere); fp32 reproduces the reference features exactly")
    parser.add_argument("--batch-size", type=int_between(1), default=None,
                        help="slices per batch (default: from free memory)")
    if cache:
        parser.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
        parser.add_argument("--cache-dir", type=Path, default=None,
                            help="feature cache folder (default: $BRAINDINO_CACHE or ~/.cache/braindino)")
    resolution = parser.add_argument_group("resolution (default: by device, printed at the start)")
    resolution.add_argument("--resolution", choices=tuple(PRESETS), default=None,
                            help="named setting: cpu (6 mm), mps (4 mm), cuda or fine (3 mm), legacy (224 px, every "
                                 "slice, bilinear: the old default)")
    size = resolution.add_mutually_exclusive_group()
    size.add_argument("--patch-mm", type=float_between(0.1, 100.0), default=None, metavar="MM",
                      help="in-plane size of one patch in mm; the model input size follows from the head's size")
    size.add_argument("--image-size", type=int_between(1), default=None, metavar="PX",
                      help="fixed model input size in pixels instead of --patch-mm (every slice unless "
                           "--slice-step-mm)")
    resolution.add_argument("--slice-step-mm", type=float_between(0.0, 100.0), default=None, metavar="MM",
                            help="distance between embedded axial slices (default: the patch size; 0: every slice)")
    resolution.add_argument("--upsampling", choices=UPSAMPLING_METHODS, default=None,
                            help="from patches to voxels: guided by the image (default) or bilinear")
    resolution.add_argument("--shifts", type=int_between(1, 8), default=None, metavar="N",
                            help="embed each slice N x N times shifted by 1/N patch: an N times finer grid for N^2 "
                                 "the time (for GPUs)")


def policy_from_args(args: argparse.Namespace, device_type: str, base=None):
    """The `ResolutionPolicy` the options ask for: a preset (default: `base`, else the device's), then single
    settings."""
    from ..resolution import PRESETS, default_policy, with_overrides

    policy = PRESETS[args.resolution] if args.resolution else base or default_policy(device_type)
    if args.patch_mm is not None:
        policy = replace(policy, patch_mm=args.patch_mm, image_size=None)
    return with_overrides(policy, image_size=args.image_size, slice_step_mm=args.slice_step_mm,
                          upsampling=args.upsampling, shifts=args.shifts)


def feature_cache(args: argparse.Namespace):
    from ..cache import FeatureCache

    return None if args.no_cache else FeatureCache(args.cache_dir)


def open_session(args: argparse.Namespace, base_policy=None):
    """The `FeatureSession` the options ask for (resolution: `base_policy` where they name none, else the device's
    default); prints its model, device and resolution."""
    from ..encoder import load_encoder
    from ..session import FeatureSession

    encoder = load_encoder(args.model, device=args.device, precision=args.precision)
    session = FeatureSession.for_encoder(encoder, policy_from_args(args, encoder.device.type, base_policy),
                                         feature_cache(args), args.batch_size)
    print(f"features: {session.describe()}", flush=True)
    return session


@dataclass(frozen=True)
class FileArguments:
    """Which arguments of a command name files. `inputs`: argument -> what it is (for "no such <what>"); they
    must exist. `outputs`: argument -> "file", "folder" or "file or folder"; they must be writable, of that
    kind where they exist, and never resolve to an input. `--model`, when it is a file, counts as an input."""

    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


def declare_files(parser: argparse.ArgumentParser, inputs: dict[str, str] | None = None,
                  outputs: dict[str, str] | None = None) -> None:
    parser.set_defaults(files=FileArguments(dict(inputs or {}), dict(outputs or {})))


def _values(args: argparse.Namespace, name: str) -> list[Path]:
    value = getattr(args, name, None)
    values = value if isinstance(value, (list, tuple)) else [value]
    return [Path(v) for v in values if v is not None and str(v) != ""]


def input_paths(args: argparse.Namespace) -> list[Path]:
    """The command's input files (and `--model` when it is a file), checked to exist."""
    from ..errors import BrainDINOError

    declared: FileArguments = getattr(args, "files", FileArguments())
    paths = []
    for name, what in declared.inputs.items():
        for path in _values(args, name):
            if not path.exists():
                raise BrainDINOError(path, f"no such {what}")
            paths.append(path)
    return paths + [path for path in _values(args, "model") if path.is_file()]


def check_files(args: argparse.Namespace) -> None:
    """Before any work: every input exists, and every output can be written without replacing an input (same
    path, symlink or hard link), a folder where a file belongs, or a file where a folder belongs."""
    from ..atomic import check_writable, refuse_output_over_input
    from ..errors import BrainDINOError

    declared: FileArguments = getattr(args, "files", FileArguments())
    inputs = input_paths(args)
    for name, kind in declared.outputs.items():
        for path in _values(args, name):
            if kind == "file" and path.is_dir():
                raise BrainDINOError(path, "is a folder; give a file name for this output")
            if kind == "folder" and path.exists() and not path.is_dir():
                raise BrainDINOError(path, "exists and is not a folder; give a folder for this output")
            refuse_output_over_input([path], inputs)
            check_writable(path)
