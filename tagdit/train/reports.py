"""What training shows in Prefect, from one process or from torchrun's ranks.

In one process, progress and sample grids go straight to Prefect artifacts (`ProgressArtifact`,
`publish_grid`). torchrun's ranks have no Prefect run context, so the launching task gives them a
report folder (`TAGDIT_REPORT_DIR`): rank 0 writes its progress and grids there, every rank writes
its exception and traceback there when it fails, and the launcher's `Relay` turns the files into the
same artifacts and log lines while the ranks run.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from PIL import Image

from tagdit.files import atomic_path, write_json_atomic
from tagdit.train.stop import forward_stop, stop_file

log = logging.getLogger(__name__)

REPORT_DIR_ENV = "TAGDIT_REPORT_DIR"
RELAY_SECONDS = 2.0


def in_prefect_run() -> bool:
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        return TaskRunContext.get() is not None or FlowRunContext.get() is not None
    except Exception:
        return False


def report_dir() -> Path | None:
    """The folder this rank reports into, when launched by a training task under torchrun."""
    d = os.environ.get(REPORT_DIR_ENV)
    return Path(d) if d else None


class ProgressArtifact:
    """A Prefect progress artifact (percent of steps) for the current run; silent outside one."""

    def __init__(self, desc: str, step: int, total: int):
        self.total, self.id = total, None
        try:
            from prefect.artifacts import create_progress_artifact

            if in_prefect_run():
                self.id = create_progress_artifact(100 * step / total, description=desc)
        except Exception as e:  # progress reporting must never break training
            log.warning("could not create the progress artifact: %s", e)

    def update(self, step: int) -> None:
        if self.id is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, 100 * step / self.total)
        except Exception as e:  # e.g. the server is restarting: try again at the next step
            log.debug("could not update the progress artifact: %s", e)


def publish_grid(grid: Image.Image, step: int, key: str, report_to: Path | None = None) -> bool:
    """A sample grid as the markdown artifact `key` of this Prefect run, or as files in `report_to` for the relay."""
    if report_to is not None:
        with atomic_path(report_to / f"grid-{step:09d}.png") as tmp:
            grid.save(tmp, format="PNG")
        write_json_atomic(report_to / f"grid-{step:09d}.json", {"step": step, "key": key})
        return True
    if not in_prefect_run():
        return False
    try:
        from prefect.artifacts import create_markdown_artifact

        from tagdit.sampling.grid import image_data_uri

        create_markdown_artifact(key=key, markdown=f"# DiT samples, step {step}\n\n![samples]({image_data_uri(grid)})",
                                 description=f"EMA samples at step {step}")
        return True
    except Exception as e:  # monitoring must never stop training
        log.warning("could not publish the sample grid artifact: %s", e)
        return False


class Progress:
    """Training progress of rank 0: an artifact in a Prefect run, a file for the relay under torchrun."""

    def __init__(self, desc: str, step: int, total: int):
        self.desc, self.total = desc, total
        self.file = (d / f"progress-{desc}.json") if (d := report_dir()) is not None else None
        self.artifact = None if self.file else ProgressArtifact(desc, step, total)
        self.update(step)

    def update(self, step: int) -> None:
        if self.file is not None:
            write_json_atomic(self.file, {"desc": self.desc, "step": step, "total": self.total})
        elif self.artifact is not None:
            self.artifact.update(step)


def write_rank_error(exc: BaseException) -> None:
    """This rank's exception and traceback for the launcher (no-op outside torchrun)."""
    d = report_dir()
    if d is None:
        return
    rank = int(os.environ.get("RANK", "0"))
    write_json_atomic(d / f"error-rank{rank}.json", {
        "rank": rank, "time": time.time(), "type": type(exc).__name__, "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    })


def rank_errors(d: Path) -> list[dict[str, Any]]:
    """The failed ranks' reports, first failure first (the others are usually its consequence)."""
    errors = []
    for p in sorted(d.glob("error-rank*.json")):
        try:
            errors.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(errors, key=lambda e: (e.get("time", 0), e.get("rank", 0)))


class Relay:
    """Turns the ranks' report files into artifacts while torchrun runs (a thread in the launcher).

    Runs in a copy of the launcher's context, so the artifacts belong to the launching task run. It
    also hands the ranks a stop asked in the launcher (`tagdit.train.stop.forward_stop`).
    """

    def __init__(self, d: Path):
        self.dir = d
        self.progress: dict[str, ProgressArtifact] = {}
        self.stop = threading.Event()
        ctx = contextvars.copy_context()
        self.thread = threading.Thread(target=ctx.run, args=(self._loop,), name="tagdit-report-relay", daemon=True)

    def __enter__(self) -> Relay:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    def _loop(self) -> None:
        while True:
            stopping = self.stop.wait(RELAY_SECONDS)
            try:
                forward_stop(stop_file(self.dir))
                self.relay()
            except Exception as e:  # reporting must never stop training
                log.warning("could not relay training reports: %s", e)
            if stopping:
                return

    def relay(self) -> None:
        """Publish what the ranks wrote since the last call."""
        for p in sorted(self.dir.glob("progress-*.json")):
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            art = self.progress.get(rec["desc"])
            if art is None:
                self.progress[rec["desc"]] = ProgressArtifact(rec["desc"], rec["step"], rec["total"])
            else:
                art.update(rec["step"])
        for meta in sorted(self.dir.glob("grid-*.json")):
            png = meta.with_suffix(".png")
            try:
                rec = json.loads(meta.read_text())
                with Image.open(png) as grid:
                    publish_grid(grid, rec["step"], rec["key"])  # logs its own failure: one grid is not retried
            except (OSError, ValueError):
                continue
            meta.unlink(missing_ok=True)
            png.unlink(missing_ok=True)

