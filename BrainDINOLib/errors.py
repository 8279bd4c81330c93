"""The one error type users see (a bad input, named, with what is wrong with it) and how every program of the
project reports it: one line on stderr and exit code 2, never a traceback. It sits below every other module so
`braindino`, the torchrun entry point and the scripts in Training/ share it without importing the CLI."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class BrainDINOError(Exception):
    """An input BrainDINO cannot use.

    The message is one line that names the offending file (or object) and the problem, so the CLI can
    print it as is and exit with code 2 instead of showing a traceback.
    """

    def __init__(self, source: str | Path | None, problem: str):
        self.source = str(source) if source is not None else None
        self.problem = " ".join(problem.split())  # one line, whatever a library's message held
        super().__init__(f"{self.source}: {problem}" if self.source else problem)


class CancelledError(Exception):
    """Raised inside long work when the caller's cancel flag is set."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage block stays in `--help`), still with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
