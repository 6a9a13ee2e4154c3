"""Every use the deployments exist for, on a real Prefect server with a process worker.

One server, work pool and worker for the module (`prefect deploy --all` from the clone, as the
README does); the tests run in order and build on each other's outputs: the full pipeline twice,
every deployment with `force`, two experiments on one dataset, two prepare-data runs at once, and
the nightly evaluation of a run that is still training (then cancelled and resumed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "pipeline.yaml")

pytestmark = pytest.mark.slow


def path_overrides(tmp: Path) -> list[str]:
    """Point every input and output of tests/pipeline.yaml into `tmp`."""
    return [f"demo.out={tmp}/world", f"demo.tagger_out={tmp}/tagger", f"data.source={tmp}/world/images",
            f"tagger.path={tmp}/tagger", f"data.root={tmp}/shards", f"run.root={tmp}/runs"]


def api(server: PrefectServer, path: str, body: dict | None = None, method: str | None = None):
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/api{path}", data=data,
                                 method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def start(server: PrefectServer, deployment: str, overrides: list[str], **params) -> str:
    """`prefect deployment run NAME --param …` without waiting; returns the flow run id."""
    args = ["deployment", "run", deployment, "--param", f"config={CONFIG}",
            "--param", f"overrides={json.dumps(overrides)}"]
    for k, v in params.items():
        args += ["--param", f"{k}={json.dumps(v)}"]
    out = server.cli(*args, cwd=ROOT).stdout
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def wait(server: PrefectServer, run_id: str, timeout: float = 600) -> str:
    """The flow run's final state name (Completed, Failed, Cancelled, …)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = api(server, f"/flow_runs/{run_id}")["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state["name"]
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} did not finish in {timeout} s")


def run(server: PrefectServer, deployment: str, overrides: list[str], **params) -> str:
    """Run a deployment to completion (asserted); returns its flow run id."""
    run_id = start(server, deployment, overrides, **params)
    state = wait(server, run_id)
    assert state == "Completed", f"{deployment}: {state}\n" + (server.home / "worker.log").read_text()[-4000:]
    return run_id


def task_states(server: PrefectServer, run_id: str) -> dict[str, str]:
    runs = api(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return {r["name"]: r["state"]["name"] for r in runs}


def records(tmp: Path, run: str) -> list[dict]:
    """Every stage stamp of a run and its dataset."""
    stamps = list((tmp / "runs" / run).rglob(".stage-*.json")) + list((tmp / "shards/tiny").rglob(".stage-*.json"))
    return [json.loads(p.read_text())["record"] for p in stamps]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deployments")
    with PrefectServer(tmp / "prefect") as server:
        server.env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
        server.cli("work-pool", "create", "tagdit", "--type", "process")
        server.cli("concurrency-limit", "create", "gpu", "1")  # as the README sets it up
        server.cli("concurrency-limit", "create", "eval", "1")
        server.cli("--no-prompt", "deploy", "--all", cwd=ROOT)
        server.spawn(["worker", "start", "--pool", "tagdit"], "worker.log", cwd=tmp)  # any cwd works
        yield server, tmp


def test_the_full_pipeline_runs_then_hits_every_cache(deployed):
    server, tmp = deployed
    first = run(server, "full-pipeline/demo", path_overrides(tmp))
    assert list((tmp / "shards/tiny/images").glob("train-*.tar"))
    metrics = json.loads(next((tmp / "runs/tiny/eval").glob("*/metrics.json")).read_text())
    assert {"tag_recall_ratio", "cfg", "unconditional", "real", "reconstructed", "vae_psnr_db"} <= metrics.keys()
    tags = {r["name"].rsplit("-", 1)[0]: set(r["tags"]) for r in api(server, "/task_runs/filter", {
        "flow_runs": {"id": {"any_": [first]}}})}
    assert {k for k, v in tags.items() if "gpu" in v} == {"train_vae", "encode", "train_dit"}, tags
    assert "eval" in tags["evaluate"] and "gpu" not in tags["evaluate"]
    artifact = api(server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["tagdit-eval-tiny"]}}})[0]
    assert "data:image/png;base64," in artifact["data"] and "file://" not in artifact["data"]
    table = api(server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["tagdit-metrics-tiny"]}}})
    assert table and table[0]["type"] == "table"

    second = run(server, "full-pipeline/demo", path_overrides(tmp))
    states = task_states(server, second)
    assert len(states) >= 8 and set(states.values()) == {"Cached"}, states
    nightly = api(server, "/deployments/name/evaluate/nightly")
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert nightly["schedules"][0]["active"] and nightly["parameters"]["nightly"] is True


DEPLOYMENTS = [  # every deployment in prefect.yaml with the stage its `force` names
    ("demo-world/default", ["demo"]),
    ("prepare-data/default", ["crop"]),
    ("train-vae/default", ["train_vae"]),
    ("encode/default", ["encode"]),
    ("train-dit/default", ["train_dit"]),
    ("evaluate/default", ["evaluate"]),
    ("evaluate/nightly", ["evaluate"]),
    ("full-pipeline/demo", ["evaluate"]),
    ("full-pipeline/original-256", ["evaluate"]),  # with the tiny config: the deployment, not the model size
]


def test_every_deployment_reruns_its_forced_stage(deployed):
    server, tmp = deployed
    flows = {f["id"]: f["name"] for f in api(server, "/flows/filter", {})}
    deployed_names = {f"{flows[d['flow_id']]}/{d['name']}" for d in api(server, "/deployments/filter", {})}
    assert deployed_names == {d for d, _ in DEPLOYMENTS}
    for deployment, force in DEPLOYMENTS:
        extra = {"nightly": True} if deployment == "evaluate/nightly" else {}
        run_id = run(server, deployment, path_overrides(tmp), force=force, **extra)
        states = task_states(server, run_id)
        task_name = {"demo": "build-demo"}.get(force[0], force[0])
        forced = [name for name in states if name.rsplit("-", 1)[0] == task_name]
        assert forced and all(states[n] == "Completed" for n in forced), (deployment, states)


def test_two_experiments_on_one_dataset_keep_to_their_own_folders(deployed):
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
    assert not list((tmp / "runs").glob("*.superseded-*"))


def waiting_logs(server: PrefectServer, ids: list[str]) -> list[str]:
    logs = api(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": ids}}})
    return [log["message"] for log in logs if "waiting for exclusive access" in log["message"]]


def test_two_prepare_data_runs_at_once_give_the_single_runs_shards(deployed):
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
    for name in ("images/train-000000.tar", "images/val-000000.tar", "manifest.parquet", "tags.parquet",
                 "vocab.json"):
        assert (tmp / "shards/twin" / name).read_bytes() == (tmp / "shards/tiny" / name).read_bytes(), name
    assert waiting_logs(server, ids)


def rank_processes(out_dir: Path) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "tasks.train_dit" in line and str(out_dir) in line]


def test_nightly_evaluation_runs_beside_training_which_cancels_cleanly(deployed):
    server, tmp = deployed
    a = path_overrides(tmp) + ["run.name=a"]
    dit = tmp / "runs/a/dit"
    done = {p.name for p in dit.glob("ckpt-*")}
    training = start(server, "train-dit/default", a + ["dit.train.steps=100000", "dit.train.nproc=2",
                                                        "dit.train.checkpoint_every=20"])
    deadline = time.time() + 300
    while not ({p.name for p in dit.glob("ckpt-*")} - done) and time.time() < deadline:
        time.sleep(1)
    assert {p.name for p in dit.glob("ckpt-*")} - done, (server.home / "worker.log").read_text()[-4000:]

    nightly = run(server, "evaluate/nightly", a, nightly=True)
    assert api(server, f"/flow_runs/{training}")["state"]["type"] == "RUNNING"
    metrics = json.loads(max((tmp / "runs/a/eval").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert (dit / metrics["dit_checkpoint"]).is_dir()
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
    logs = api(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [resumed]}}})
    assert any(f"resumed from {dit}/ckpt-{last:07d}" in log["message"] for log in logs), \
        [log["message"] for log in logs][-20:]
