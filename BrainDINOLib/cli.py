"""The `braindino` command line. Each subcommand (see `commands/`) is a thin call into the engine.

Bad input ends with one line on stderr that names the file and the problem, and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .errors import BrainDINOError, CancelledError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from .commands import COMMAND_MODULES

    parser = argparse.ArgumentParser(prog="braindino", description="BrainDINO: self-supervised ViT features for "
                                                                  "brain MRI, and the maps and heads built on them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return report_errors("braindino", lambda: args.run(args))


def report_errors(program: str, body: Callable[[], int]) -> int:
    """Run a command's `body` and return its exit code. Bad input ends with one line on stderr naming the file
    and the problem (exit code 2); a cancel or Ctrl-C with one line (130); never a traceback. Shared by
    `braindino`, the torchrun entry point and the scripts in Training/."""
    try:
        return body()
    except BrainDINOError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CancelledError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
