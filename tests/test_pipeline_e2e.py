"""The whole pipeline, as users run it: through a real Prefect server + worker, and killed mid-run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "pipeline.yaml"

pytestmark = pytest.mark.slow


def path_overrides(tmp: Path) -> list[str]:
    """Point every input and output of tests/pipeline.yaml into `tmp`."""
    return [
        f"demo.out={tmp}/world",
        f"demo.tagger_out={tmp}/tagger",
        f"data.source={tmp}/world/images",
        f"tagger.path={tmp}/tagger",
        f"data.root={tmp}/shards",
        f"run.root={tmp}/runs",
    ]


def api(server: PrefectServer, path: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/api{path}", data=data,
                                 method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def run_deployment(server: PrefectServer, overrides: list[str]) -> str:
    """`prefect deployment run full-pipeline/demo --watch`; returns the flow run id."""
    r = server.cli("deployment", "run", "full-pipeline/demo", "--param", f"config={CONFIG}",
                   "--param", f"overrides={json.dumps(overrides)}", "--watch", "--watch-timeout", "600",
                   cwd=ROOT, timeout=660)
    assert "Completed" in r.stdout, r.stdout[-3000:]
    return re.search(r"UUID: ([0-9a-f-]{36})", r.stdout).group(1)


def test_deployment_runs_the_pipeline_then_hits_every_cache(tmp_path):
    overrides = path_overrides(tmp_path)
    with PrefectServer(tmp_path / "prefect") as server:
        server.env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
        server.cli("work-pool", "create", "tagdit", "--type", "process")
        server.cli("concurrency-limit", "create", "gpu", "1")  # as the README sets it up
        server.env["PWD"] = str(ROOT)  # prefect.yaml's pull step is `{{ $PWD }}` at deploy time
        server.cli("--no-prompt", "deploy", "--all", cwd=ROOT)
        server.spawn(["worker", "start", "--pool", "tagdit"], "worker.log")

        first = run_deployment(server, overrides)
        assert list((tmp_path / "shards/tiny/images").glob("train-*.tar"))
        assert (tmp_path / "runs/tiny/vae/latest").is_file() and (tmp_path / "runs/tiny/dit/latest").is_file()
        assert len(list((tmp_path / "runs/tiny/eval").glob("*/grid-*.png"))) == 2
        metrics = json.loads(next((tmp_path / "runs/tiny/eval").glob("*/metrics.json")).read_text())
        assert {"tag_recall_ratio", "cfg", "unconditional", "real", "reconstructed", "vae_psnr_db"} <= metrics.keys()
        gpu_tasks = {r["name"].rsplit("-", 1)[0] for r in api(server, "/task_runs/filter", {
            "flow_runs": {"id": {"any_": [first]}}, "task_runs": {"tags": {"all_": ["gpu"]}}})}
        assert gpu_tasks == {"train_vae", "encode", "train_dit", "evaluate"}, gpu_tasks
        artifacts = api(server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["tagdit-eval-tiny"]}}})
        assert artifacts and "data:image/png;base64," in artifacts[0]["data"]

        second = run_deployment(server, overrides)
        assert second != first
        runs = api(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [second]}}})
        states = {r["name"]: r["state"]["name"] for r in runs}
        assert len(runs) >= 8 and set(states.values()) == {"Cached"}, states

        nightly = api(server, "/deployments/name/evaluate/nightly")
        assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert nightly["schedules"][0]["active"] and nightly["parameters"]["nightly"] is True


def cli_pipeline(tmp: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "results"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    cmd = [sys.executable, "-m", "flows.full_pipeline", "--config", str(CONFIG)]
    for o in path_overrides(tmp):
        cmd += ["--set", o]
    log = open(tmp / "pipeline.log", "ab")
    return subprocess.Popen([*cmd, *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def data_bytes(tmp: Path) -> dict[str, bytes]:
    root = tmp / "shards/tiny"
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted((root / "images").glob("*.tar")) + sorted(root.glob("*.parquet")) + [root / "vocab.json"]}


def test_killed_pipeline_resumes_training_from_its_checkpoint(tmp_path):
    overrides = ["--set", "dit.train.steps=40", "--set", "dit.train.checkpoint_every=4"]
    proc = cli_pipeline(tmp_path, *overrides)
    dit_dir = tmp_path / "runs/tiny/dit"
    deadline = time.time() + 400
    while not list(dit_dir.glob("ckpt-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "pipeline.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # mid-training, right after its first checkpoint
    proc.wait()
    killed_at = {p.name for p in dit_dir.glob("ckpt-*")}
    before = data_bytes(tmp_path)

    log_size = (tmp_path / "pipeline.log").stat().st_size
    assert cli_pipeline(tmp_path, *overrides).wait(timeout=600) == 0, (tmp_path / "pipeline.log").read_text()[-3000:]
    rerun_log = (tmp_path / "pipeline.log").read_text()[log_size:]
    assert "resumed from" in rerun_log
    assert data_bytes(tmp_path) == before  # same data outputs
    assert killed_at < {p.name for p in dit_dir.glob("ckpt-*")}
    assert (dit_dir / "latest").read_text().strip() == "ckpt-0000040"
    assert list((tmp_path / "runs/tiny/eval").glob("*/metrics.json"))
