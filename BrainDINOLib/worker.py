"""`TorchWorker`: one persistent thread that runs model work one job at a time, so a user interface never blocks.

Qt-free on purpose: the Slicer module polls it from a QTimer, the web page from its event loop, a script
calls `wait()`. Results and errors are queued and handed to the job's callbacks by `poll()`, on the thread
that polls, so MRML nodes are only ever touched from that (main) thread. Every submitted job ends in one of its
callbacks: a job dropped by `cancel` before it ran gets `on_error(CancelledError)` like a stopped one, so a user
interface that waits for a job's end never waits forever.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import CancelledError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]


@dataclass
class Job:
    """`work(progress, cancel)` to run on the worker; `on_done(result)` or `on_error(error)` run in `poll()`."""

    label: str
    work: Callable[[Progress, Cancel], Any]
    on_done: Callable[[Any], None] | None = None
    on_error: Callable[[BaseException], None] | None = None


class TorchWorker:
    """Runs submitted jobs in order on one daemon thread.

    Jobs get `progress(done, total)` and `cancel()` (the cooperative flag that `cancel` sets, checked by the
    engine between batches). `status()` tells what runs and how far it is.
    """

    def __init__(self, name: str = "BrainDINO torch worker"):
        self._jobs: queue.Queue[tuple[int, Job | None]] = queue.Queue()  # (cancel generation at submit, job)
        self._finished: queue.Queue[tuple[Job, Any, BaseException | None]] = queue.Queue()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._progress = (0, 0)
        self._current: Job | None = None
        self._generation = 0  # how many times `cancel` was called; a job submitted before the last call is dropped
        self._unfinished = 0  # jobs submitted whose callbacks `poll()` has not run yet
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            self._unfinished += 1
            self._jobs.put((self._generation, job))

    def cancel(self) -> None:
        """Stop the running job at its next check and drop the queued ones (each ends in `CancelledError`).

        The worker checks a job's generation under the same lock as it starts it, so a job it took from the
        queue just before this call is dropped too, never started with a cleared flag."""
        with self._lock:
            self._generation += 1
            self._cancel.set()

    @property
    def busy(self) -> bool:
        """A job runs, waits, or has finished and waits for `poll()` to take it. One count, changed under the lock by
        `submit` and `poll`: reading the queues and the running job one by one could read False in the instant
        between the worker taking a job and marking it as running, and a poller would stop with work left."""
        return self._unfinished > 0

    def status(self) -> tuple[str, int, int]:
        """(label of the running job or "", done, total)."""
        with self._lock:
            return (self._current.label if self._current else "", *self._progress)

    def poll(self) -> int:
        """Run the callbacks of finished jobs on the calling thread; return how many finished."""
        count = 0
        while True:
            try:
                job, result, error = self._finished.get_nowait()
            except queue.Empty:
                return count
            count += 1
            with self._lock:  # before the callbacks, which may read `busy` to tell a user interface it is idle
                self._unfinished -= 1
            if error is None:
                if job.on_done:
                    job.on_done(result)
            elif job.on_error:
                job.on_error(error)
            else:
                log.error("%s failed: %s", job.label, error)

    def wait(self) -> None:
        """Block until every submitted job finished, then run their callbacks here (scripts and tests)."""
        self._jobs.join()
        self.poll()

    def shutdown(self) -> None:
        """Cancel what runs and end the thread (after the running job notices)."""
        self.cancel()
        with self._lock:
            self._jobs.put((self._generation, None))

    def _report(self, done: int, total: int) -> None:
        with self._lock:
            self._progress = (int(done), int(total))

    def _run(self) -> None:
        while True:
            generation, job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            with self._lock:
                dropped = generation != self._generation
                if not dropped:
                    self._cancel.clear()
                    self._current, self._progress = job, (0, 0)
            if dropped:
                outcome = (job, None, CancelledError(f"{job.label}: cancelled before it started"))
            else:
                try:
                    outcome = (job, job.work(self._report, self._cancel.is_set), None)
                except BaseException as error:  # handed to the polling thread, which shows it
                    outcome = (job, None, error)
            self._finished.put(outcome)
            with self._lock:
                self._current = None
            self._jobs.task_done()
