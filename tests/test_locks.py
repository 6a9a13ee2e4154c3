"""Folder locks through Prefect global concurrency limits: waiting, re-entry, dead holders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from tagdit.orchestrate.locks import exclusive, holder_file, lock_name


def test_lock_names_are_stable_valid_prefect_names(tmp_path):
    a, b = lock_name(tmp_path / "shards" / "demo"), lock_name(tmp_path / "shards" / "demo" / ".")
    assert a == b and a.startswith("tagdit-demo-")
    assert "/" not in a and "%" not in a
    assert lock_name(tmp_path / "other" / "demo") != a


def test_a_second_holder_waits_until_the_first_releases(prefect_env, monkeypatch):
    import tagdit.orchestrate.locks

    monkeypatch.setattr(tagdit.orchestrate.locks, "POLL_SECONDS", 0.2)
    folder = prefect_env / "dataset"
    events: list[tuple[str, float]] = []

    def hold(name: str, seconds: float) -> None:
        with exclusive(folder, name):
            events.append((f"{name} in", time.monotonic()))
            time.sleep(seconds)
            events.append((f"{name} out", time.monotonic()))

    first = threading.Thread(target=hold, args=("a", 1.5))
    first.start()
    while not events:
        time.sleep(0.05)
    second = threading.Thread(target=hold, args=("b", 0.0))
    second.start()
    first.join(30)
    second.join(30)
    order = [e for e, _ in events]
    assert order == ["a in", "a out", "b in", "b out"]
    assert not holder_file(folder).exists()


def test_the_same_folder_can_be_locked_again_inside_its_own_lock(prefect_env):
    with exclusive(prefect_env / "run", "outer"), exclusive(prefect_env / "run", "inner"):
        assert json.loads(holder_file(prefect_env / "run").read_text())["purpose"] == "outer"


def test_a_dead_holders_slot_is_taken_back(prefect_env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    folder = prefect_env / "killed-run"
    folder.mkdir()
    name = lock_name(folder)
    with get_client(sync_client=True) as client:  # a run that was SIGKILLed while holding the slot
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1, active_slots=1))
    import socket

    holder_file(folder).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 17}))
    done = threading.Event()

    def take() -> None:
        with exclusive(folder, "rerun"):
            done.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    assert done.wait(30), "the slot of a dead holder was never taken back"


def test_the_zombie_automation_is_created_once(prefect_env, capsys):
    from prefect.automations import Automation

    from tagdit.orchestrate import zombies

    zombies.main(["--heartbeat-seconds", "45"])
    zombies.main([])
    assert "exists already" in capsys.readouterr().out
    auto = Automation.read(name=zombies.NAME)
    assert auto.trigger.within.total_seconds() == 135 and auto.actions[0].state.value == "CRASHED"


def test_a_taken_slot_without_any_holder_is_taken_back(prefect_env, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    import tagdit.orchestrate.locks

    monkeypatch.setattr(tagdit.orchestrate.locks, "POLL_SECONDS", 0.2)
    monkeypatch.setattr(tagdit.orchestrate.locks, "ORPHAN_SECONDS", 1.0)
    folder = prefect_env / "orphan"
    with get_client(sync_client=True) as client:  # e.g. a holder file lost with a deleted folder
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=lock_name(folder), limit=1,
                                                                            active_slots=1))
    done = threading.Event()
    t = threading.Thread(target=lambda: exclusive(folder, "x").__enter__() and None or done.set(), daemon=True)
    t.start()
    assert done.wait(30), "an orphaned slot was never taken back"


def test_a_lost_lease_keeps_the_holder_going_and_frees_the_slot_by_name(prefect_env, monkeypatch):
    """What a server restart does to a lease: renewals answer 410, the block carries on, the slot ends free."""
    from prefect.client.orchestration import SyncPrefectClient, get_client

    import tagdit.orchestrate.locks as locks

    class Gone(Exception):
        response = type("R", (), {"status_code": 410})()

    def forgotten(self, lease_id, lease_duration):
        raise Gone("Lease not found")

    monkeypatch.setattr(locks, "RENEW_SECONDS", 0.2)
    monkeypatch.setattr(SyncPrefectClient, "renew_concurrency_lease", forgotten)
    folder = prefect_env / "run"
    with exclusive(folder, "train"):
        time.sleep(1.0)  # a few renewals are due, all refused
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(lock_name(folder)).active_slots == 1
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(lock_name(folder)).active_slots == 0
    with exclusive(folder, "next run"):  # never blocked
        pass


def test_tag_limits_are_created_on_first_use_and_leaked_slots_taken_back(prefect_env, monkeypatch, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    import tagdit.orchestrate.locks as locks

    tag = f"gpu-{time.time_ns()}"
    locks.prepare_tag_limits({tag})
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
        assert limit.limit == 1 and limit.active_slots == 0
        client.update_global_concurrency_limit(f"tag:{tag}", GlobalConcurrencyLimitUpdate(active_slots=1))  # leaked
        locks.prepare_tag_limits({tag})
        assert client.read_global_concurrency_limit_by_name(f"tag:{tag}").active_slots == 0
    assert "taking the other 1 back" in caplog.text


def test_the_renewal_interval_is_set_by_the_environment():
    """TAGDIT_LEASE_RENEW_SECONDS (tests) renews and retries that often; unset, every 60 s of a 120 s lease."""
    code = "import tagdit.orchestrate.locks as m; print(m.LEASE_SECONDS, m.RENEW_SECONDS, m.RETRY_SECONDS)"
    env = {k: v for k, v in os.environ.items() if k != "TAGDIT_LEASE_RENEW_SECONDS"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert default.stdout.split() == ["120", "60.0", "10.0"]
    short = subprocess.run([sys.executable, "-c", code], env={**env, "TAGDIT_LEASE_RENEW_SECONDS": "2"},
                           capture_output=True, text=True, check=True)
    assert short.stdout.split() == ["120", "2.0", "2.0"]
