"""One at a time, the newcomer skipped: the nightly evaluation of a run never stacks on a slow one.

The holder keeps an exclusive `flock` on a file in the run folder and writes who it is into it. The
operating system drops the lock when the holder's process ends, however it ends (SIGKILL, a crash,
a worker restart), and a Prefect server restart does not touch it: no lease to leak, so a stuck
slot can never cancel every later nightly. The lock is per host: runs on other machines sharing
the folder over NFS are not excluded reliably.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _me() -> dict[str, Any]:
    me: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                          "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with contextlib.suppress(Exception):  # outside a flow run: no run to name
        from prefect.runtime import flow_run

        if flow_run.id:
            me.update(flow_run_id=flow_run.id, flow_run_name=flow_run.name)
    return me


@contextlib.contextmanager
def unless_running(path: str | Path) -> Iterator[dict[str, Any] | None]:
    """Hold `path` for the block and yield None, or yield the live holder's record if another holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {}
            yield holder or {"pid": "?"}
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps(_me()))
            f.flush()
            yield None
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
