"""Engine work for the page, on the Logic's worker thread, with its results, progress and errors brought back to
the server's event loop.

The Slicer module polls the Logic's worker with a QTimer; the page polls it with an asyncio task while it is
busy, so result callbacks (which build MRML nodes) run on the event-loop thread, the only thread that touches
VTK and the page's state. Two rules of the server follow from wslink's design: a button's handler must return
at once (wslink reads a client's next message only after the handler of the previous one is done, so a handler
that waited for the work would hold back the Cancel click and every mouse event of the views), and nothing on
the worker thread may touch the page's state.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often results and progress are collected while work runs
Work = Callable[[Callable[[int, int], None], Callable[[], bool]], Any]  # (progress, cancel) -> result


class PageJobs:
    """Runs `Work` on `worker` (the Logic's `TorchWorker`); `on_progress(label, done, total)` and the result or
    error callbacks are called on the event loop."""

    def __init__(self, worker, job_type: type, on_progress: Callable[[str, int, int], None]):
        self.worker = worker
        self.job_type = job_type
        self.on_progress = on_progress
        self._pump: asyncio.Task | None = None

    @property
    def busy(self) -> bool:
        return self.worker.busy

    def run(self, label: str, work: Work, on_done: Callable[[Any], None],
            on_error: Callable[[BaseException], None]) -> None:
        """Queue `work`; return at once."""
        self.worker.submit(self.job_type(label, work, on_done, on_error))
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._poll())

    def cancel(self) -> None:
        """Stop the running job at its next check (between batches) and drop queued ones."""
        self.worker.cancel()

    async def _poll(self) -> None:
        while True:
            label, done, total = self.worker.status()
            if label:
                self.on_progress(label, done, total)
            self.worker.poll()  # result and error callbacks run here, on the event loop
            if not self.worker.busy:
                return
            await asyncio.sleep(POLL_S)
