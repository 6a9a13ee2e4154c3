"""A real Prefect server (and workers) on a free loopback port, private to one test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """`prefect server start` with its own PREFECT_HOME (SQLite), result storage and port."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.port = free_port()
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOCAL_STORAGE_PATH": str(self.home / "storage"),
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log_name: str, cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.home / log_name, "ab")
        p = subprocess.Popen([PREFECT, *args], env=self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run([PREFECT, *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
        return r

    def __enter__(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        self.start_server()
        return self

    def start_server(self) -> None:
        """`prefect server start` on this home (database) and port; returns once it answers."""
        self.server = self.spawn(["server", "start"], "server.log")
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"Prefect server did not start:\n{(self.home / 'server.log').read_text()[-3000:]}")

    def stop_server(self) -> None:
        """Stop the server alone (workers and flow runs go on), as an upgrade or a crash would."""
        os.killpg(self.server.pid, signal.SIGTERM)
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
        self.procs.remove(self.server)

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "pipeline.yaml")

def path_overrides(tmp: Path) -> list[str]:
    """Point every input and output of tests/pipeline.yaml into `tmp`."""
    return [f"demo.out={tmp}/world", f"demo.tagger_out={tmp}/tagger", f"data.source={tmp}/world/images",
            f"tagger.path={tmp}/tagger", f"data.root={tmp}/shards", f"run.root={tmp}/runs"]


def api(server: PrefectServer, path: str, body: dict | None = None, method: str | None = None):
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/api{path}", data=data,
                                 method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    for attempt in range(6):  # 503: the server's SQLite database was busy; Prefect's own client retries too
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == 5:
                raise
            time.sleep(2 ** attempt * 0.5)


def start(server: PrefectServer, deployment: str, overrides: list[str], **params) -> str:
    """A flow run of the deployment, as `prefect deployment run NAME --param …` creates it (through the
    API, without the CLI's seconds of start-up), not waited for; returns the flow run id."""
    dep = api(server, f"/deployments/name/{deployment}")
    parameters = {"config": CONFIG, "overrides": overrides, **params}
    return api(server, f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})["id"]


def wait(server: PrefectServer, run_id: str, timeout: float = 600) -> str:
    """The flow run's final state name (Completed, Failed, Cancelled, …)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = api(server, f"/flow_runs/{run_id}")["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state["name"]
        time.sleep(0.5)
    raise TimeoutError(f"flow run {run_id} did not finish in {timeout} s")


def run(server: PrefectServer, deployment: str, overrides: list[str], **params) -> str:
    """Run a deployment to completion (asserted); returns its flow run id."""
    run_id = start(server, deployment, overrides, **params)
    state = wait(server, run_id)
    assert state == "Completed", f"{deployment}: {state}\n" + (server.home / "worker.log").read_text()[-4000:]
    return run_id
