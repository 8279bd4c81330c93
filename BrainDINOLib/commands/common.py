"""Pieces every subcommand shares: model options, layer lists, a tqdm progress callback."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm


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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that embeds volumes."""
    parser.add_argument("--model", default="demo", help="checkpoint file or built-in model name (default: demo)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--precision", choices=("auto", "fp32", "int8", "bf16"), default="auto",  # inference.PRECISIONS
                        help="how the encoder computes (default auto: int8 on an x86 CPU, bf16 on CUDA, fp32 "
                             "elsewhere); fp32 reproduces the reference features exactly")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: from free memory)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="feature cache folder (default: $BRAINDINO_CACHE or ~/.cache/braindino)")
