"""Exclusive access to a dataset or run folder across flow runs, through Prefect global concurrency limits.

Two flow runs that write the same folder must not interleave (one's stale-temp clean-up would
delete the other's live files). Each folder gets a global concurrency limit of 1 named after it
(`tagdit-<folder name>-<hash of its absolute path>`, created on first use; see it in the UI under
*Concurrency*). A second flow run waits for the slot and says in its log what it waits for.

A holder file beside the folder (`.<folder name>.tagdit-lock.json`, outside it so that a stage may
move or delete its folder) names the flow run, host and process holding the slot. When a holder
died without releasing (SIGKILL, a lost machine, an ephemeral server that went down with it), the
slot is taken back: the holder's process is gone (same host), its flow run is in a final state, or
no holder file has appeared for `ORPHAN_SECONDS` while the slot stays taken. Within one process the same folder may be locked again (nested stages): a no-op.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tagdit.files import sha256_text, write_json_atomic

log = logging.getLogger(__name__)

HOLDER_SUFFIX = ".tagdit-lock.json"
ORPHAN_SECONDS = 30.0  # a taken slot with no holder file for this long has lost its holder
POLL_SECONDS = 5.0  # how often a waiting flow run re-checks (and logs) the holder
LEASE_SECONDS = 120  # a dead holder's slot expires after this, where the server keeps its lease
_held = threading.local()  # names this thread holds (re-entry is a no-op)


def lock_name(folder: str | Path) -> str:
    """The global concurrency limit's name for a folder (Prefect names allow no '/' or '%')."""
    p = Path(folder).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", p.name)[:40] or "root"
    return f"tagdit-{slug}-{sha256_text(str(p))[:10]}"


def _ensure_limit(client: Any, name: str) -> None:
    """Create the limit (1 slot) unless it exists; two creators racing is fine."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def holder_file(folder: Path) -> Path:
    """Where the holder of `folder`'s slot is recorded (beside the folder, not in it)."""
    return folder.parent / f".{folder.name}{HOLDER_SUFFIX}"


def _holder(folder: Path) -> dict[str, Any]:
    try:
        return json.loads(holder_file(folder).read_text())
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_is_dead(client: Any, holder: dict[str, Any]) -> bool:
    """True when the recorded holder can no longer hold the slot."""
    if not holder:
        return False
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0))):
        return True
    run_id = holder.get("flow_run_id")
    if run_id:
        from prefect.exceptions import ObjectNotFound

        try:
            state = client.read_flow_run(run_id).state
        except ObjectNotFound:
            return False
        return state is not None and state.is_final()
    return False


def _current_flow_run_id() -> str | None:
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        return str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    except Exception:  # outside a flow run
        return None


def _wait_for_slot(client: Any, name: str, folder: Path, purpose: str) -> None:
    """Poll until the slot is free (or its dead holder's slot is taken back)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    started = time.monotonic()
    orphan_since: float | None = None
    while True:
        limit = client.read_global_concurrency_limit_by_name(name)
        if limit.active_slots < limit.limit:
            return
        holder = _holder(folder)
        orphan_since = (orphan_since or time.monotonic()) if not holder else None
        if _holder_is_dead(client, holder) or (orphan_since and time.monotonic() - orphan_since > ORPHAN_SECONDS):
            log.warning("%s: the holder of %s (%s) is gone; taking its slot back", purpose, folder, holder)
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
            return
        log.info("%s: waiting for exclusive access to %s (concurrency limit %r, held by flow run %s "
                 "on %s, pid %s, for %.0f s)", purpose, folder, name, holder.get("flow_run_id"),
                 holder.get("host"), holder.get("pid"), time.monotonic() - started)
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def exclusive(folder: str | Path, purpose: str = "tagdit") -> Iterator[None]:
    """Hold `folder`'s global concurrency slot for the block; waits (and logs why) while another run has it."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    folder = Path(folder).resolve()
    name = lock_name(folder)
    held: set[str] = getattr(_held, "names", set())
    if name in held:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with get_client(sync_client=True) as client:
        _ensure_limit(client, name)
        _wait_for_slot(client, name, folder, purpose)
    with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_SECONDS):
        write_json_atomic(holder_file(folder), {"flow_run_id": _current_flow_run_id(), "host": socket.gethostname(),
                                                 "pid": os.getpid(), "since": time.time(), "purpose": purpose})
        _held.names = held | {name}
        try:
            yield
        finally:
            _held.names = held
            holder_file(folder).unlink(missing_ok=True)
