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

A Prefect server restart does not stop the holder: lease renewals that fail are logged and retried,
and a lease the restarted server forgot is released by name at the end (`_Lease`). The same thread
watches the holding flow run for a cancel that the worker, after such a restart, no longer carries
out (`tagdit.orchestrate.cancel`). The same restart
leaks the slots of task-tag limits (`gpu`, `eval`), which Prefect holds through leases too;
`prepare_tag_limits` creates those limits on first use and takes back slots no live lease holds.
"""

from __future__ import annotations

import contextlib
import contextvars
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
from tagdit.orchestrate.cancel import CancelWatch
from tagdit.stores import LOCAL_ONLY_SUFFIXES, remote_of
from tagdit.train.stop import clear_stop

log = logging.getLogger(__name__)

HOLDER_SUFFIX = LOCAL_ONLY_SUFFIXES[0]  # ".tagdit-lock.json": never uploaded to a store
ORPHAN_SECONDS = 30.0  # a taken slot with no holder file for this long has lost its holder
POLL_SECONDS = 5.0  # how often a waiting flow run re-checks (and logs) the holder
LEASE_SECONDS = 120  # a dead holder's slot expires after this, where the server keeps its lease (>= 60)
# Renew well before expiry. TAGDIT_LEASE_RENEW_SECONDS renews more often (tests: a renewal meets a
# restarted server within seconds instead of a minute); the lease itself cannot be shorter than 60 s.
RENEW_SECONDS = float(os.environ.get("TAGDIT_LEASE_RENEW_SECONDS", LEASE_SECONDS / 2))
RETRY_SECONDS = min(10.0, RENEW_SECONDS)  # renewal retries while the server cannot be reached
WATCH_SECONDS = min(10.0, RENEW_SECONDS)  # how often the holding flow run's state is read (a cancel stops it)
_held = threading.local()  # names this thread holds (re-entry is a no-op)


def lock_name(folder: str | Path) -> str:
    """The global concurrency limit's name for a folder (Prefect names allow no '/' or '%')."""
    p = Path(folder).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", p.name)[:40] or "root"
    return f"tagdit-{slug}-{sha256_text(remote_of(p) or str(p))[:10]}"  # a URL folder: one slot on every machine


def _ensure_limit(client: Any, name: str, slots: int = 1) -> None:
    """Create the limit (`slots` slots) unless it exists; two creators racing is fine."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))


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


class _Lease:
    """One slot of limit `name`, held through a server lease that a thread keeps renewing.

    Prefect keeps leases in the server's memory by default, so a server restart forgets them while
    the slot stays taken. A renewal that cannot reach the server is logged and retried; one the
    server answers with 410 Gone (the lease was forgotten) is logged once, and the slot, still
    counted as taken, is released by name at the end. Training never stops for either. In a flow
    run the thread also polls the run's state every `WATCH_SECONDS` (`CancelWatch`), lease lost or not.
    """

    def __init__(self, name: str, lease_id: Any, purpose: str):
        self.name, self.lease_id, self.purpose = name, lease_id, purpose
        run_id = _current_flow_run_id()
        self.watch = CancelWatch(run_id, purpose) if run_id else None
        self.lost = False
        self.since = time.monotonic()
        self.stop = threading.Event()
        ctx = contextvars.copy_context()  # the flow run's context: the thread's log lines reach its log
        self.thread = threading.Thread(target=ctx.run, args=(self._renew_loop,), name=f"lease-{name}", daemon=True)
        self.thread.start()

    def _renew_once(self, client: Any) -> bool:
        """Renew; True when the server answered (renewed, or said the lease is gone)."""
        try:
            client.renew_concurrency_lease(self.lease_id, LEASE_SECONDS)
            return True
        except Exception as e:
            if _status(e) in (404, 410):
                self.lost = True
                log.warning("%s: the server no longer knows the lease on %s (it restarted?); keeping the "
                            "folder and releasing its slot by name at the end", self.purpose, self.name)
                return True
            log.warning("%s: could not renew the lease on %s (%s: %s); carrying on, retrying in %.0f s",
                        self.purpose, self.name, type(e).__name__, e, RETRY_SECONDS)
            return False

    def _renew_loop(self) -> None:
        """Renew when due, poll the flow run's state (`CancelWatch`) in between; until released."""
        from prefect.client.orchestration import get_client

        renew_at = time.monotonic() + RENEW_SECONDS
        while not (self.lost and self.watch is None) and not self.stop.wait(self._next_wait(renew_at)):
            try:
                with get_client(sync_client=True) as client:
                    if self.watch is not None:
                        self.watch.poll(client)
                    if not self.lost and time.monotonic() >= renew_at:
                        renew_at = time.monotonic() + (RENEW_SECONDS if self._renew_once(client) else RETRY_SECONDS)
            except Exception as e:  # the client itself could not start: same as unreachable
                log.warning("%s: lease renewal on %s failed (%s); retrying in %.0f s", self.purpose, self.name, e,
                            RETRY_SECONDS)
                renew_at = time.monotonic() + RETRY_SECONDS

    def _next_wait(self, renew_at: float) -> float:
        renewal = max(0.0, renew_at - time.monotonic())
        if self.watch is None:
            return renewal
        return WATCH_SECONDS if self.lost else min(renewal, WATCH_SECONDS)

    def release(self, client: Any, folder: Path, me: dict[str, Any]) -> None:
        """Give the slot back: through the lease, or by name when the server lost the lease."""
        self.stop.set()
        self.thread.join(timeout=5)
        if not self.lost:
            self._renew_once(client)  # did the server forget the lease since the last renewal?
        if not self.lost:
            client.release_concurrency_slots_with_lease(self.lease_id)
        elif _holder(folder) == me:  # still ours: nobody took the slot over in the meantime
            client.release_concurrency_slots(names=[self.name], slots=1,
                                             occupancy_seconds=time.monotonic() - self.since)
            log.info("%s: released %s by name (its lease was lost)", self.purpose, self.name)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _acquire(client: Any, name: str, folder: Path, purpose: str) -> Any:
    """Wait for the slot, then take it with a lease; returns the lease id."""
    while True:
        _wait_for_slot(client, name, folder, purpose)
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS, holder=_lease_holder())
        except Exception as e:
            if _status(e) == 423:  # another run took it between the check and the increment
                continue
            raise
        return response.json()["lease_id"]


def _lease_holder() -> Any:
    run_id = _current_flow_run_id()
    if run_id is None:
        return None
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    return ConcurrencyLeaseHolder(type="flow_run", id=run_id)


@contextlib.contextmanager
def exclusive(folder: str | Path, purpose: str = "tagdit") -> Iterator[None]:
    """Hold `folder`'s global concurrency slot for the block; waits (and logs why) while another run has it."""
    from prefect.client.orchestration import get_client

    folder = Path(folder).resolve()
    name = lock_name(folder)
    held: set[str] = getattr(_held, "names", set())
    if name in held:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with get_client(sync_client=True) as client:
        _ensure_limit(client, name)
        lease = _Lease(name, _acquire(client, name, folder, purpose), purpose)
    me = {"flow_run_id": _current_flow_run_id(), "host": socket.gethostname(), "pid": os.getpid(),
          "since": time.time(), "purpose": purpose}
    write_json_atomic(holder_file(folder), me)
    _held.names = held | {name}
    try:
        yield
    finally:
        _held.names = held
        try:
            with get_client(sync_client=True) as client:
                lease.release(client, folder, me)
        except Exception as e:  # the server is away: the next run takes the slot back (no holder file)
            log.warning("%s: could not release %s (%s); the next run on %s takes it back", purpose, name, e, folder)
        holder_file(folder).unlink(missing_ok=True)
        if lease.watch is not None and lease.watch.asked:
            clear_stop()  # the stage it stopped is over; a later flow run in this process trains on


def prepare_tag_limits(tags: set[str] | list[str], slots: int = 1) -> None:
    """The `tag:<tag>` limits of a stage's task: created with `slots` slots if missing, leaked slots taken back.

    A slot is leaked when the limit counts more taken slots than the server has leases for (the
    holders Prefect lists per tag): a restarted server forgets its leases, not the counts.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for tag in sorted(tags):
            name = f"tag:{tag}"
            try:
                taken = client.read_global_concurrency_limit_by_name(name).active_slots  # before the holders
            except ObjectNotFound:
                _ensure_limit(client, name, slots)
                log.info("created the concurrency limit %r (%d slot): tasks tagged %r never overlap", name, slots, tag)
                continue
            held = len(client.read_concurrency_limit_by_tag(tag).active_slots)  # task runs with a live lease
            if taken > held:
                log.warning("concurrency limit %r: %d slot(s) taken but %d held by a live lease (a server restart "
                            "forgets leases); taking the other %d back", name, taken, held, taken - held)
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=held))
