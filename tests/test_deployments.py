"""Every use the deployments exist for, on a real Prefect server with a process worker.

One server, work pool and worker for the module (`prefect deploy --all` from the clone, as the
README does). Each test sets up what it needs and runs in any order: the `pipeline` fixture runs
the full pipeline twice (run `tiny`; later tests train it further), every deployment with `force`
works in a folder of its own, two experiments on one dataset, two prepare-data runs at once, the
nightly evaluation of a run that is still training (then cancelled and resumed), and a server restart
followed by a cancel that the worker, having lost the server, no longer carries out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.prefect_server import ROOT, PrefectServer, api, path_overrides, run, start, wait

RENEW_SECONDS = 2  # the workers' flow runs renew folder leases this often (default 60 s)


def task_states(server: PrefectServer, run_id: str, timeout: float = 60) -> dict[str, str]:
    """Task run name -> state name of a finished flow run (task states reach the server as events, a
    moment after the flow run's own: read until every one is final)."""
    deadline = time.time() + timeout
    while True:
        runs = api(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
        if all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs) \
                or time.time() > deadline:
            return {r["name"]: r["state"]["name"] for r in runs}
        time.sleep(0.5)


def records(tmp: Path, run: str) -> list[dict]:
    """Every stage stamp of a run and its dataset."""
    stamps = list((tmp / "runs" / run).rglob(".stage-*.json")) + list((tmp / "shards/tiny").rglob(".stage-*.json"))
    return [json.loads(p.read_text())["record"] for p in stamps]


def log_records(server: PrefectServer, run_id: str, expect: str, timeout: float = 30) -> list[dict]:
    """The flow run's log records, read until one contains `expect` (or `timeout` s): a flow run's
    logs reach the server in batches, the last ones after its final state."""
    deadline = time.time() + timeout
    while True:
        logs, page = [], None
        while page is None or len(page) == 200:  # the server answers 200 records at most per request
            page = api(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC",
                                                "limit": 200, "offset": len(logs)})
            logs += page
        if any(expect in x["message"] for x in logs) or time.time() > deadline:
            return logs
        time.sleep(0.5)


def flow_logs(server: PrefectServer, run_id: str, expect: str) -> list[str]:
    return [x["message"] for x in log_records(server, run_id, expect)]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deployments")
    with PrefectServer(tmp / "prefect") as server:
        server.env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
        server.env["TAGDIT_LEASE_RENEW_SECONDS"] = str(RENEW_SECONDS)  # the worker hands it to its flow runs
        server.cli("work-pool", "create", "tagdit", "--type", "process")
        server.cli("--no-prompt", "deploy", "--all", cwd=ROOT)
        server.spawn(["worker", "start", "--pool", "tagdit"], "worker.log", cwd=tmp)  # any cwd works
        yield server, tmp


@pytest.fixture(scope="module")
def pipeline(deployed) -> dict:
    """The full pipeline run twice on dataset and run `tiny`: both flow run ids and the first run's metrics."""
    server, tmp = deployed
    first = run(server, "full-pipeline/demo", path_overrides(tmp))
    metrics = json.loads(next((tmp / "runs/tiny/eval").glob("*/metrics.json")).read_text())
    second = run(server, "full-pipeline/demo", path_overrides(tmp))
    return {"first": first, "second": second, "metrics": metrics}


def test_the_full_pipeline_runs_then_hits_every_cache(deployed, pipeline):
    server, tmp = deployed
    first, second = pipeline["first"], pipeline["second"]
    assert list((tmp / "shards/tiny/images").glob("train-*.tar"))
    assert {"tag_recall_ratio", "cfg", "unconditional", "real", "reconstructed", "vae_psnr_db"} <= pipeline["metrics"].keys()
    tags = {r["name"].rsplit("-", 1)[0]: set(r["tags"]) for r in api(server, "/task_runs/filter", {
        "flow_runs": {"id": {"any_": [first]}}})}
    assert {k for k, v in tags.items() if "gpu" in v} == {"tag", "train-vae", "encode", "train-dit"}, tags
    assert "eval" in tags["evaluate"] and "gpu" not in tags["evaluate"]
    artifact = api(server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["tagdit-eval-tiny"]},
                                                               "flow_run_id": {"any_": [first]}}})[0]
    assert "data:image/png;base64," in artifact["data"] and "file://" not in artifact["data"]
    table = api(server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["tagdit-metrics-tiny"]},
                                                            "flow_run_id": {"any_": [first]}}})
    assert table and table[0]["type"] == "table"

    states = task_states(server, second)
    assert len(states) >= 8 and set(states.values()) == {"Cached"}, states
    nightly = api(server, "/deployments/name/evaluate/nightly")
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert nightly["schedules"][0]["active"] and nightly["parameters"]["nightly"] is True


def test_a_bad_parameter_is_refused_when_the_run_is_created(deployed):
    server, _ = deployed
    train_dit_runs = {"flows": {"name": {"any_": ["train-dit"]}}}  # not the nightly's, which its schedule creates
    count = len(api(server, "/flow_runs/filter", train_dit_runs))
    for param, named in (('force=["trian_dit"]', "'trian_dit' is not one of"), ("dit_steps=0", "0 is less than"),
                         ("config=demo.json", "'demo.json'"),
                         ('overrides=["dit.train.stpes=5"]', "'dit.train.stpes=5' does not match")):
        r = subprocess.run([str(Path(sys.executable).with_name("prefect")), "deployment", "run", "train-dit/default",
                            "--param", param], env=server.env, capture_output=True, text=True, timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and named in out and "Validation" in out, out
    assert len(api(server, "/flow_runs/filter", train_dit_runs)) == count  # none created, so no worker picked one up


DEPLOYMENTS = [  # the deployments in prefect.yaml run with `force`, and the stage it names
    ("demo-world/default", ["demo-world"]),
    ("prepare-data/default", ["crop"]),
    ("train-vae/default", ["train-vae"]),
    ("encode/default", ["encode"]),
    ("train-dit/default", ["train-dit"]),
    ("evaluate/default", ["evaluate"]),
    ("evaluate/nightly", ["evaluate"]),
    ("full-pipeline/demo", ["evaluate"]),
]
OTHER_DEPLOYMENTS = {  # deployed too, run elsewhere or alike
    "full-pipeline/original-256",  # with the tests' tiny config it would be full-pipeline/demo again
    "export/default",  # run below, after the forced stages
}


def test_every_deployment_reruns_its_forced_stage(deployed):
    """In a folder of its own, so that the forced stages change no other test's dataset or run."""
    server, root = deployed
    tmp = root / "forced"
    flows = {f["id"]: f["name"] for f in api(server, "/flows/filter", {})}
    deployed_names = {f"{flows[d['flow_id']]}/{d['name']}" for d in api(server, "/deployments/filter", {})}
    assert deployed_names == {d for d, _ in DEPLOYMENTS} | OTHER_DEPLOYMENTS
    for deployment, force in DEPLOYMENTS:
        extra = {"nightly": True} if deployment == "evaluate/nightly" else {}
        run_id = run(server, deployment, path_overrides(tmp), force=force, **extra)
        states = task_states(server, run_id)
        task_name = force[0]
        forced = [name for name in states if name.rsplit("-", 1)[0] == task_name]
        assert forced and all(states[n] == "Completed" for n in forced), (deployment, states)
    run(server, "export/default", path_overrides(tmp), to=str(tmp / "exported"))  # the trained model's way out
    assert json.loads((tmp / "exported/tagdit.json").read_text())["source"]["run"] == "tiny"
    assert (tmp / "exported/dit/model.safetensors").is_file() and (tmp / "exported/README.md").is_file()


def test_two_experiments_on_one_dataset_keep_to_their_own_folders(deployed, pipeline):
    server, tmp = deployed
    a = path_overrides(tmp) + ["run.name=a"]
    b = path_overrides(tmp) + ["run.name=b"]
    run(server, "full-pipeline/demo", a)
    ckpts = {p: p.stat().st_mtime_ns for p in (tmp / "runs/a").rglob("*.safetensors")}
    run(server, "full-pipeline/demo", b)
    again = run(server, "full-pipeline/demo", a)
    states = task_states(server, again)
    assert set(states.values()) == {"Cached"}, states
    for rec in records(tmp, "a"):
        assert not Path(rec["out_dir"]).is_relative_to(tmp / "runs/b"), rec
    result = api(server, f"/flow_runs/{again}")
    assert result["state"]["type"] == "COMPLETED"
    assert {p: p.stat().st_mtime_ns for p in (tmp / "runs/a").rglob("*.safetensors")} == ckpts
    assert not list((tmp / "runs").glob("[ab].superseded-*"))


def waiting_logs(server: PrefectServer, ids: list[str]) -> list[str]:
    logs = api(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": ids}}})
    return [log["message"] for log in logs if "waiting for exclusive access" in log["message"]]


def test_two_prepare_data_runs_at_once_give_the_single_runs_shards(deployed, pipeline):
    server, tmp = deployed
    twin = path_overrides(tmp) + ["data.name=twin"]
    # hold the dataset folder's slot until a run says it waits, so the runs surely meet the lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tagdit.orchestrate.locks import exclusive\n"
         f"with exclusive({str(tmp / 'shards/twin')!r}, 'test'):\n    print('held', flush=True); sys.stdin.read()"],
        env=server.env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        ids = [start(server, "prepare-data/default", twin) for _ in range(2)]
        deadline = time.time() + 300
        while not waiting_logs(server, ids) and time.time() < deadline:
            time.sleep(1)
    finally:
        holder.communicate("", timeout=60)
    assert [wait(server, i) for i in ids] == ["Completed", "Completed"]
    shards = sorted(p.relative_to(tmp / "shards/tiny").as_posix() for p in (tmp / "shards/tiny/images").glob("*.tar"))
    assert sorted(p.relative_to(tmp / "shards/twin").as_posix() for p in (tmp / "shards/twin/images").glob("*.tar")) \
        == shards and any(s.startswith("images/val-") for s in shards)
    for name in (*shards, "manifest.parquet", "tags.parquet", "vocab.json"):
        assert (tmp / "shards/twin" / name).read_bytes() == (tmp / "shards/tiny" / name).read_bytes(), name
    assert waiting_logs(server, ids)


def rank_processes(out_dir: Path) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "tasks.train_dit" in line and str(out_dir) in line]


def test_nightly_evaluation_runs_beside_training_which_cancels_cleanly(deployed, pipeline):
    server, tmp = deployed
    a = path_overrides(tmp)
    dit = tmp / "runs/tiny/dit"
    done = {p.name for p in dit.glob("ckpt-*")}
    training = start(server, "train-dit/default", a + ["dit.train.steps=100000", "dit.train.nproc=2",
                                                        "dit.train.checkpoint_every=20", "dit.train.keep_checkpoints=1"])
    deadline = time.time() + 300
    while not ({p.name for p in dit.glob("ckpt-*")} - done) and time.time() < deadline:
        time.sleep(1)
    assert {p.name for p in dit.glob("ckpt-*")} - done, (server.home / "worker.log").read_text()[-4000:]

    nightly = run(server, "evaluate/nightly", a, nightly=True)
    assert api(server, f"/flow_runs/{training}")["state"]["type"] == "RUNNING"
    metrics = json.loads(max((tmp / "runs/tiny/eval").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime).read_text())
    # pinned while evaluated (pruning to 1 checkpoint skipped it); the evaluation's record keeps it afterwards
    evaluated = int(metrics["dit_checkpoint"].removeprefix("ckpt-"))
    assert 0 < evaluated <= int((dit / "latest").read_text().strip().removeprefix("ckpt-"))
    artifact = api(server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [nightly]}}})
    assert any(metrics["dit_checkpoint"] in (x["data"] or "") for x in artifact)

    assert rank_processes(dit)
    server.cli("flow-run", "cancel", training)
    assert wait(server, training, timeout=120) == "Cancelled"
    deadline = time.time() + 30
    while rank_processes(dit) and time.time() < deadline:
        time.sleep(0.5)
    assert not rank_processes(dit), rank_processes(dit)

    last = int((dit / "latest").read_text().strip().split("-")[1])
    resumed = run(server, "train-dit/default", a + [f"dit.train.steps={last + 4}", "dit.train.checkpoint_every=2"])
    logs = flow_logs(server, resumed, f"resumed from {dit}/ckpt-{last:07d}")
    assert any(f"resumed from {dit}/ckpt-{last:07d}" in m for m in logs), logs[-20:]


def test_training_survives_a_server_restart_and_a_cancel_after_it_stops_it(deployed, pipeline):
    """The server stops for 5 s while train-dit trains on 2 ranks and comes back on the same database; a
    lease renewal (every RENEW_SECONDS; the client retries one while the server is down) meets a server
    that forgot the lease while training still runs, and training carries on. The worker, having lost
    the server, may no longer watch for a cancel; a cancel is then noticed by the flow run's own process:
    within 60 s every rank checkpoints the same step and stops, and the run ends Cancelled. Later runs
    are not blocked and resume from the last checkpoint."""
    from tagdit.orchestrate.locks import lock_name

    server, tmp = deployed
    a = path_overrides(tmp)
    dit = tmp / "runs/tiny/dit"
    last = int((dit / "latest").read_text().strip().removeprefix("ckpt-"))
    target = last + 100000  # it trains until cancelled
    training = start(server, "train-dit/default", a + [f"dit.train.steps={target}", "dit.train.checkpoint_every=50",
                                                        "dit.train.nproc=2"])
    deadline = time.time() + 120
    while (dit / "latest").read_text().strip() == f"ckpt-{last:07d}" and time.time() < deadline:  # training
        time.sleep(0.5)
    server.stop_server()
    time.sleep(5)
    server.start_server()
    logs = log_records(server, training, "no longer knows the lease", timeout=120)
    gone = [datetime.fromisoformat(x["timestamp"]).timestamp() for x in logs if "no longer knows the lease" in x["message"]]
    assert gone, [x["message"] for x in logs][-20:]
    assert api(server, f"/flow_runs/{training}")["state"]["type"] == "RUNNING"  # survived the restart

    cancelled = time.time()
    cancel = api(server, f"/flow_runs/{training}/set_state", {"state": {"type": "CANCELLING"}})  # as `prefect flow-run cancel`
    assert cancel["status"] == "ACCEPT", cancel
    assert wait(server, training, timeout=60) == "Cancelled", (server.home / "worker.log").read_text()[-4000:]
    # Whether the worker's observer survived the outage depends on timing: when it gave up (the case
    # this is about), only the run's own poll can have ended it, with a checkpoint of the stop step;
    # when it reconnected, Prefect's cancel may win the race (tests/test_cancel.py covers the poll alone).
    stopped = flow_logs(server, training, "because its flow run is cancelled")
    self_stopped = any("because its flow run is cancelled" in m for m in stopped)
    worker_log = (server.home / "worker.log").read_text()
    assert self_stopped or "observer failed" not in worker_log, stopped[-20:]
    step = int((dit / "latest").read_text().strip().removeprefix("ckpt-"))
    assert last < step < target
    if self_stopped:
        assert (dit / f"ckpt-{step:07d}" / "meta.json").stat().st_mtime > cancelled
        assert "Terminating execution" not in worker_log  # the run stopped itself
    deadline = time.time() + 30
    while rank_processes(dit) and time.time() < deadline:
        time.sleep(0.5)
    assert not rank_processes(dit), rank_processes(dit)
    folder = api(server, f"/v2/concurrency_limits/{lock_name(dit)}")
    assert folder["active_slots"] == 0, folder  # released by name: its lease was gone

    after = run(server, "train-dit/default", a + [f"dit.train.steps={step + 4}", "dit.train.checkpoint_every=2"])
    logs = flow_logs(server, after, "taking the other 1 back")
    assert any("taking the other 1 back" in m for m in logs), logs[-20:]
    assert any(f"resumed from {dit}/ckpt-{step:07d}" in m for m in flow_logs(server, after, "resumed from")), logs[-20:]
