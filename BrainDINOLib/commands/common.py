"""Pieces every subcommand shares: model options, layer lists, a tqdm progress callback, and the check of
input and output paths that runs before any command does slow work."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm


def tqdm_progress(description: str, unit: str = "slice") -> tuple[Callable[[int, int], None], tqdm]:
    """A progress callback for the engine that drives a tqdm bar on stderr (use the bar as a context).

    The bar is drawn only on a terminal and only after a second of work, and it is erased when it closes
    (also on an error), so an error message stays the one line on stderr."""
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=unit, leave=False, dynamic_ncols=True, disable=None, delay=1.0)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

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


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that embeds volumes."""
    parser.add_argument("--model", default="demo", help="checkpoint file or built-in model name (default: demo)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--batch-size", type=int_between(1), default=None,
                        help="slices per batch (default: from free memory)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="feature cache folder (default: $BRAINDINO_CACHE or ~/.cache/braindino)")


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
