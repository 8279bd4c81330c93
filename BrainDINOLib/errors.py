"""The one error type users see: a bad input, named, with what is wrong with it."""
from __future__ import annotations

from pathlib import Path


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
