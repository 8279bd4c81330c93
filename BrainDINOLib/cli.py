"""The `braindino` command line. Each subcommand (see `commands/`) is a thin call into the engine.

Bad input ends with one line on stderr that names the file and the problem, and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

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
    try:
        return args.run(args)
    except BrainDINOError as error:
        print(f"braindino: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CancelledError:
        print("braindino: cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("braindino: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
