"""A cancel that works without Prefect's worker: the flow run's own process notices it, training stops
at a step with a checkpoint, the flow run ends Cancelled (the real server: tests/test_deployments.py)."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from prefect.client.schemas.objects import StateType

from tagdit.formats.checkpoints import Checkpoints
from tagdit.orchestrate.cancel import CancelWatch
from tagdit.train.stop import TrainingStopped, clear_stop, request_stop, stop_requested
from tests.test_training import loss_fn, run_fit, write_shards


@pytest.fixture(autouse=True)
def no_stop_left_behind():
    clear_stop()
    yield
    clear_stop()


class FakeClient:
    """Prefect's sync client as the watch and the lease thread use it: an outage, then a run's states."""

    def __init__(self, states: list[str | None], lease_gone: bool = False):
        self.states = list(states)  # None: the server cannot be reached
        self.lease_gone = lease_gone
        self.polls = 0

    def read_flow_run(self, flow_run_id):
        self.polls += 1
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if state is None:
            raise ConnectionError("All connection attempts failed")
        return SimpleNamespace(state=SimpleNamespace(type=StateType[state.upper()], name=state.title()))

    def renew_concurrency_lease(self, lease_id, lease_duration):
        if self.lease_gone:  # a restarted server forgot the lease
            raise type("Gone", (Exception,), {"response": SimpleNamespace(status_code=410)})("Lease not found")


def test_a_cancel_read_after_an_outage_asks_training_to_stop_and_the_outage_is_logged_once(caplog):
    client = FakeClient([None, None, None, "running", "cancelling"])
    watch = CancelWatch("run-1", "stage train-dit")
    with caplog.at_level(logging.INFO):
        asked = [watch.poll(client) for _ in range(5)]
    assert asked == [False, False, False, False, True] and stop_requested()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot read the state of flow run run-1" in m for m in messages) == 1, messages
    assert any("answers again" in m for m in messages)
    assert any("stop at its next step" in m and "Cancelling" in m for m in messages)
    assert watch.poll(client) and client.polls == 5  # asked once: no more polling


def test_a_running_or_finished_run_is_not_stopped():
    client = FakeClient(["running", "completed", "failed"])
    watch = CancelWatch("run-1", "x")
    assert not any(watch.poll(client) for _ in range(3)) and not stop_requested()


def test_the_lease_thread_keeps_watching_after_the_server_forgot_its_lease(monkeypatch):
    """After a restart the lease is gone (410) and the first polls fail; the thread still reads the cancel."""
    import prefect.client.orchestration

    import tagdit.orchestrate.locks as locks

    client = FakeClient([None, None, "running", "cancelling"], lease_gone=True)

    @contextmanager
    def get_client(sync_client=False):
        yield client

    monkeypatch.setattr(prefect.client.orchestration, "get_client", get_client)
    monkeypatch.setattr(locks, "_current_flow_run_id", lambda: "run-1")
    monkeypatch.setattr(locks, "RENEW_SECONDS", 0.05)
    monkeypatch.setattr(locks, "WATCH_SECONDS", 0.05)
    lease = locks._Lease("tagdit-x", "lease-1", "stage train-dit")
    deadline = time.monotonic() + 10
    while not stop_requested() and time.monotonic() < deadline:
        time.sleep(0.02)
    lease.stop.set()
    lease.thread.join(timeout=5)
    assert lease.lost and lease.watch.asked and stop_requested()


def test_training_asked_to_stop_checkpoints_the_step_and_the_next_run_resumes_there(tmp_path):
    urls = write_shards(tmp_path)

    def asks_at_step_4(model, batch, step):
        if step == 4:  # while step 5 runs: the loop stops after it
            request_stop("test")
        return loss_fn(model, batch, step)

    with pytest.raises(TrainingStopped, match="stopped at step 5 of 10"):
        run_fit(tmp_path, tmp_path / "c", 10, urls, loss=asks_at_step_4)
    assert Checkpoints(tmp_path / "c").latest().name == "ckpt-0000005"  # checkpoint_every=3: not a regular one
    clear_stop()
    assert run_fit(tmp_path, tmp_path / "c", 10, urls).step == 10


def test_a_stop_on_a_checkpoint_step_writes_it_once(tmp_path):
    urls = write_shards(tmp_path)

    def asks_at_step_2(model, batch, step):
        if step == 2:
            request_stop("test")
        return loss_fn(model, batch, step)

    with pytest.raises(TrainingStopped, match="stopped at step 3 of 10"):
        run_fit(tmp_path, tmp_path / "d", 10, urls, loss=asks_at_step_2)
    assert [p.name for p in (tmp_path / "d").glob("ckpt-*")] == ["ckpt-0000003"]  # the regular one


def test_ranks_that_stopped_raise_training_stopped_which_is_never_retried():
    from tagdit.orchestrate.runner import _never_retry
    from tagdit.train.launch import raise_rank_failure

    stopped = [{"rank": r, "time": 1.0, "type": "TrainingStopped", "message": "train-dit: stopped at step 7",
                "traceback": "Traceback …"} for r in (0, 1)]
    with pytest.raises(TrainingStopped, match="stopped at step 7") as e:
        raise_rank_failure("tasks.train_dit", 1, stopped)
    assert _never_retry(e.value)
    with pytest.raises(RuntimeError) as e:  # one rank failed for another reason: a failure, retried
        raise_rank_failure("tasks.train_dit", 1, [*stopped, {**stopped[0], "type": "OSError", "rank": 1}])
    assert not isinstance(e.value, TrainingStopped)

