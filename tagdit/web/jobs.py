"""Drawing requests as jobs: one draws at a time, each reports its sampler step, and a cancel stops it
at the next step (the sampler's step callback raises `Cancelled`). The page polls a job's `view`."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tagdit.web.forms import FormError

log = logging.getLogger(__name__)

KEEP_FINISHED = 32  # finished jobs still answered by id (a page that polls late still hears the end)


class Cancelled(Exception):
    """The person cancelled the drawing; raised from the sampler's step callback."""


class Busy(Exception):
    """Too many drawings are waiting already."""


@dataclass
class Job:
    """One drawing: its state (queued -> running -> done | cancelled | failed), step and outcome."""

    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"
    step: int = 0
    steps: int = 0
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {"error": message, "status": http status, ...}
    cancel_asked: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    def progress(self, i: int, n: int) -> None:
        """The sampler's step callback: i of n steps done; raises Cancelled once a cancel was asked."""
        if self.cancel_asked.is_set():
            raise Cancelled
        self.step, self.steps = i, n

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started

    def view(self) -> dict[str, Any]:
        """What the page shows of the job: state, step i of n, seconds, and the result or the error."""
        out = {"id": self.id, "state": self.state, "step": self.step, "steps": self.steps,
               "elapsed": round(self.elapsed(), 2), "cancelling": self.cancel_asked.is_set()}
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out |= self.error
        return out


class Jobs:
    """The jobs of one page server: each runs in its own thread, one at a time under `lock`."""

    def __init__(self, max_waiting: int = 4):
        self.lock = threading.Lock()
        self.max_waiting = max_waiting
        self.jobs: dict[str, Job] = {}

    def submit(self, work: Callable[[Job], dict[str, Any]]) -> Job:
        """Queue `work(job)` (it passes `job.progress` to the sampler); Busy when too many wait."""
        if len(self.unfinished()) >= self.max_waiting:
            raise Busy(f"{self.max_waiting} drawings are already queued; wait for one to finish or cancel it.")
        job = Job()
        self.jobs[job.id] = job
        finished = [j for j in self.jobs.values() if j.ended.is_set()]
        for old in finished[:-KEEP_FINISHED]:
            del self.jobs[old.id]
        # `work` (the form and its init image) lives in the thread only: a finished job keeps just its result
        threading.Thread(target=self.run, args=(job, work), name=f"draw-{job.id}", daemon=True).start()
        return job

    def unfinished(self) -> list[Job]:
        return [j for j in list(self.jobs.values()) if not j.ended.is_set()]

    def run(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        """Run one job to its end, whatever happens; a crash is logged here and reported without its text."""
        with self.lock:
            job.started = time.monotonic()
            try:
                if job.cancel_asked.is_set():
                    raise Cancelled
                job.state = "running"
                job.result = work(job)
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except Exception as e:  # noqa: BLE001 (reported to the page, logged here)
                job.error = failure(e)
                job.state = "failed"
            finally:
                job.finished = time.monotonic()
                job.ended.set()


def failure(e: Exception) -> dict[str, Any]:
    """A failed job's report: a refusal the page can show (FormError, ValueError) or a logged crash."""
    if isinstance(e, FormError):
        return {"error": str(e), "status": 422, "fields": e.fields, **e.extra}
    if isinstance(e, ValueError):
        return {"error": str(e), "status": 422}
    log.exception("drawing failed")
    return {"error": f"The server failed ({type(e).__name__}); the details are in its log.", "status": 500}
