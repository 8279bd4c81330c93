"""`TorchWorker` as a poller sees it: `busy` stays True from `submit` until `poll()` has taken the job's outcome,
whenever the worker thread happens to be paused. The web page's poll loop stops when `busy` reads False, so one
False read too early leaves a result undelivered and the page waiting forever (a Save that never ends)."""
from __future__ import annotations

import queue
import threading
import types

from BrainDINOLib import worker as worker_module
from BrainDINOLib.worker import Job, TorchWorker


class PausingQueue(queue.Queue):
    """A job queue whose consumer pauses right after taking a job, as a thread the OS deschedules there would."""

    def __init__(self) -> None:
        super().__init__()
        self.taken, self.resume = threading.Event(), threading.Event()

    def get(self, block: bool = True, timeout: float | None = None):
        item = super().get(block, timeout)
        if block and item[1] is not None:
            self.taken.set()
            self.resume.wait(30)
        return item


def test_busy_holds_between_taking_a_job_and_running_it(monkeypatch):
    monkeypatch.setattr(worker_module, "queue", types.SimpleNamespace(Queue=PausingQueue, Empty=queue.Empty))
    worker = TorchWorker("paused worker")
    jobs = worker._jobs
    results: list[int] = []
    try:
        assert not worker.busy
        worker.submit(Job("answer", lambda progress, cancel: 42, results.append))
        assert jobs.taken.wait(30)  # the worker holds the job, and has not marked it as running yet
        assert worker.busy
        jobs.resume.set()
        worker.wait()
        assert results == [42] and not worker.busy
    finally:
        jobs.resume.set()
        worker.shutdown()


def test_busy_reads_false_inside_the_last_callback_and_true_after_a_new_submit():
    """A user interface re-enables its buttons from the last job's callback, and a callback may queue more work."""
    worker = TorchWorker("callback worker")
    seen: list[bool] = []

    def then(result: int) -> None:
        seen.append(worker.busy)
        if result < 2:
            worker.submit(Job("next", lambda progress, cancel: result + 1, then))
            seen.append(worker.busy)
    try:
        worker.submit(Job("first", lambda progress, cancel: 0, then))
        while worker.busy:
            worker.poll()
            threading.Event().wait(0.01)
        assert seen == [False, True, False, True, False]
    finally:
        worker.shutdown()
