"""The `braindino` command line. Each subcommand (see `commands/`) is a thin call into the engine.

Bad input ends with one line on stderr that names the file and the problem, and exit code 2: a misspelt
option as much as an unreadable volume. The command line starts at once (torch and the other heavy modules
are imported by the commands that need them), checks that its input files exist and that no output would
replace an input before any slow work, and then runs the command.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys

from .errors import OneLineParser, report_errors

# A comma-separated list of numbers that starts with a minus sign, e.g. the point `-24,4,2`.
NEGATIVE_LIST = re.compile(r"^-\d[\d.eE+-]*(,\s*[-+]?[\d.eE+-]+)+$")


def build_parser() -> argparse.ArgumentParser:
    from .commands import COMMAND_MODULES

    parser = OneLineParser(prog="braindino", description="BrainDINO: self-supervised ViT features for brain MRI, "
                                                         "and the maps and heads built on them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    parser.add_argument("--progress-lines", action="store_true",
                        help="report progress as machine-readable lines on stdout (for front ends) instead of a bar")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def join_negative_values(argv: list[str]) -> list[str]:
    """`--point-ras -24,4,2` -> `--point-ras=-24,4,2`: argparse takes a value that starts with `-` for an option
    unless it is a single number, so a coordinate list with a negative first value needs the `=` form."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if previous.startswith("--") and "=" not in previous and NEGATIVE_LIST.match(token):
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        from .commands import common
        common.PROGRESS_LINES = args.progress_lines
        common.check_files(args)
        return args.run(args)

    return report_errors("braindino", body)


if __name__ == "__main__":
    sys.exit(main())
