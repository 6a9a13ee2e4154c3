"""Stopping training early, at a step boundary and with a checkpoint, when its flow run is cancelled.

Prefect's worker cancels a flow run by stopping its process, which it no longer does once it lost
the server for a while (a restart). So the flow run's process watches its own state too
(`tagdit.orchestrate.cancel`) and, once it reads Cancelling, calls `request_stop`. `fit` checks
`stop_agreed` after every step: it writes a checkpoint there and raises `TrainingStopped`, which
is never retried; the training flows then return a Cancelled state (`tagdit.orchestrate.runner.cancelled`).

torchrun's ranks are other processes: the launcher's report relay creates the file that
`TAGDIT_STOP_FILE` names in their environment (`forward_stop`), and under DDP the ranks agree on the
step to stop at through one scalar all-reduce per step, so every rank takes the same checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STOP_FILE_ENV = "TAGDIT_STOP_FILE"  # torchrun's ranks: a file whose existence asks them to stop
_asked = threading.Event()


class TrainingStopped(RuntimeError):
    """Training stopped early because its flow run is being cancelled; its checkpoint is written."""


def request_stop(reason: str) -> None:
    """Ask training in this process (and the torchrun ranks it launched) to stop at the next step."""
    if not _asked.is_set():
        log.warning("asking training to stop at its next step, after a checkpoint: %s", reason)
    _asked.set()


def clear_stop() -> None:
    """Forget a stop request (its flow run's stage is over; a later run in this process trains on)."""
    _asked.clear()


def stop_requested() -> bool:
    """True once a stop was asked in this process, or, in a torchrun rank, by its launcher."""
    if _asked.is_set():
        return True
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)


def stop_agreed(world: int, device: torch.device) -> bool:
    """Whether to stop after this step: asked on any rank (a collective under DDP: call it on every rank)."""
    if world <= 1:
        return stop_requested()
    import torch  # here: the flow process imports this module to ask, without torch
    import torch.distributed as dist

    flag = torch.tensor(float(stop_requested()), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def stop_file(reports: Path) -> Path:
    """The stop file of the ranks that report into `reports` (the launcher sets `TAGDIT_STOP_FILE` to it)."""
    return reports / "stop"


def forward_stop(path: Path) -> None:
    """In the launcher: create the ranks' stop file once a stop was asked in this process."""
    if _asked.is_set() and not path.exists():
        path.touch()
        log.info("asked torchrun's ranks to stop (%s)", path)
