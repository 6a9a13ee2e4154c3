"""The whole pipeline from the CLI, killed mid-training and re-run (deployments: tests/test_deployments.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    assert max(killed_at) < min(p.name for p in dit_dir.glob("ckpt-*"))  # newer ones, the newest 3 kept
    assert (dit_dir / "latest").read_text().strip() == "ckpt-0000040"
    assert list((tmp_path / "runs/tiny/eval").glob("*/metrics.json"))
