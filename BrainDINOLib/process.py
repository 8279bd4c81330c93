"""`ChildProcess`: a `braindino` command (or any command) in a child process, read line by line on a thread.

Long jobs (pretraining, fitting a head on many cases) run in their own process: the user interface never
freezes, their memory is returned when they end, and Cancel is a kill of the whole process tree (torchrun
workers and data loaders included). Plain `subprocess` and one reader thread, no Qt: the Slicer module polls
it from a QTimer, the web page from its event loop, a script with `wait()`.

Lines that start with `PROGRESS_PREFIX` are machine-readable progress (`braindino ... --progress-lines`);
`poll()` hands them to `on_progress` instead of `on_line`.
"""
from __future__ import annotations

import logging
import os
import queue
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import BrainDINOError

log = logging.getLogger(__name__)

PROGRESS_PREFIX = "braindino-progress "  # followed by JSON: {"stage": str, "done": int, "total": int}
_FINISHED = object()


def engine_folder() -> Path:
    """The folder that holds the `BrainDINOLib` package (put on the child's PYTHONPATH)."""
    return Path(__file__).resolve().parent.parent


def braindino_command(task: str, arguments: Sequence[str] | str = (), progress_lines: bool = False) -> list[str]:
    """`braindino <task> <arguments>` run by this Python (inside Slicer, `sys.executable` is PythonSlicer);
    `progress_lines` asks for machine-readable progress (see `PROGRESS_PREFIX`)."""
    if isinstance(arguments, str):
        arguments = shlex.split(arguments)
    return [sys.executable, "-m", "BrainDINOLib.cli", *(["--progress-lines"] if progress_lines else []), task,
            *arguments]


class ChildProcess:
    """One running command. Output lines (stdout and stderr, merged) are queued by a reader thread and handed
    to the callbacks by `poll()` on the caller's thread; `on_finished(exit_code)` comes once, last.

    `kill()` ends the process and every process it started; the exit code then reads as cancelled.
    """

    def __init__(self, command: Sequence[str], on_line: Callable[[str], None] | None = None,
                 on_finished: Callable[[int], None] | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None):
        self.command = [str(part) for part in command]
        self.on_line, self.on_finished, self.on_progress = on_line, on_finished, on_progress
        self.exit_code: int | None = None
        self.cancelled = False
        self._lines: queue.Queue = queue.Queue()
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(engine_folder()), environment.get("PYTHONPATH", "")) if p)
        environment["PYTHONUNBUFFERED"] = "1"
        try:
            self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                                             env=environment, cwd=cwd)
        except OSError as error:
            raise BrainDINOError(self.command[0], f"could not be started: {error.strerror or error}") from None
        self._reader = threading.Thread(target=self._read, name="BrainDINO child output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def running(self) -> bool:
        """Started and not yet reported finished by `poll()`."""
        return self.exit_code is None

    def describe(self) -> str:
        return shlex.join(self.command)

    def poll(self) -> bool:
        """Deliver queued output and, once, the exit code; True while the process has not been reported finished."""
        while True:
            try:
                item = self._lines.get_nowait()
            except queue.Empty:
                return self.running
            if item is _FINISHED:
                self.exit_code = self._process.wait()
                if self.on_finished:
                    self.on_finished(self.exit_code)
                return False
            self._deliver(item)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends (delivering its output here); its exit code."""
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise TimeoutError(f"{self.describe()} still runs after {timeout} s")
        self.poll()
        return self.exit_code

    def kill(self) -> None:
        """End the process and everything it started (children first, so none is left orphaned)."""
        if self._process.poll() is not None:
            return
        self.cancelled = True
        import psutil

        try:
            parent = psutil.Process(self._process.pid)
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for process in [*children, parent]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=10)
        try:  # our own child is reaped by Popen, which then keeps its exit code (psutil would take it: 0)
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("%s did not end within 10 s of being killed", self.describe())

    def _deliver(self, line: str) -> None:
        if line.startswith(PROGRESS_PREFIX) and self.on_progress:
            import json

            try:
                report = json.loads(line[len(PROGRESS_PREFIX):])
                self.on_progress(str(report["stage"]), int(report["done"]), int(report["total"]))
                return
            except (ValueError, KeyError, TypeError):
                pass  # not ours after all: show it
        if self.on_line:
            self.on_line(line)

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._process.stdout.close()
        self._process.wait()
        self._lines.put(_FINISHED)
