"""Training on several nodes: the rendezvous from `launch:` or SLURM's environment, the batch split,
and two agents on 127.0.0.1 (nnodes 2, gloo, c10d) training one run led by a flow run."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tagdit.config import ConfigError, LaunchConfig, load_config
from tagdit.train.nodes import Rendezvous, first_host, resolve_rendezvous
from tests.run_fixtures import TINY, config, records

ROOT = Path(__file__).resolve().parents[1]

SLURM = {"SLURM_JOB_NUM_NODES": "4", "SLURM_NNODES": "3", "SLURM_JOB_ID": "81234",
         "SLURM_JOB_NODELIST": "gpu[007-010],cpu1", "SLURM_NODEID": "2"}


def test_slurm_job_gives_the_rendezvous_and_launch_settings_win():
    r = resolve_rendezvous(LaunchConfig(), "demo", "train-dit", SLURM)
    assert r == Rendezvous(nnodes=4, endpoint="gpu007:29400", run_id="81234-train-dit")  # the job's nodes, not the step's
    explicit = LaunchConfig(nnodes=2, rdzv_endpoint="head:1234", rdzv_id="mine", max_restarts=3)
    assert resolve_rendezvous(explicit, "demo", "train-vae", SLURM) == Rendezvous(2, "head:1234", "mine-train-vae",
                                                                                 max_restarts=3)
    assert resolve_rendezvous(LaunchConfig(nnodes=2), "demo", "train-dit", {"MASTER_ADDR": "10.0.0.5"}) == \
        Rendezvous(2, "10.0.0.5:29400", "demo-train-dit")
    assert resolve_rendezvous(LaunchConfig(), "demo", "train-dit", {}) is None  # one node: torchrun --standalone
    assert resolve_rendezvous(LaunchConfig(nnodes=1), "demo", "train-dit", SLURM) is None
    with pytest.raises(ValueError, match="launch.rdzv_endpoint"):
        resolve_rendezvous(LaunchConfig(nnodes=2), "demo", "train-dit", {})


def test_first_host_of_a_slurm_node_list():
    assert first_host("gpu[003-005,010],cpu1") == "gpu003"
    assert first_host("node-a,node-b") == "node-a"
    assert first_host("n[12]") == "n12"


def test_torchrun_gets_the_c10d_options_instead_of_standalone():
    opts = Rendezvous(2, "127.0.0.1:29500", "demo-train-dit", max_restarts=1, join_timeout=30).torchrun_options()
    assert opts == ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29500", "--rdzv-id=demo-train-dit",
                    "--max-restarts=1", "--rdzv-conf=join_timeout=30,read_timeout=30"]


def test_config_refuses_a_global_batch_the_world_size_does_not_divide():
    with pytest.raises(ConfigError, match=r"dit.train.batch_size 32 does not divide by the world size 6 "
                                          r"\(launch.nnodes 3 x dit.train.nproc 2\)"):
        load_config(None, ["launch.nnodes=3", "dit.train.nproc=2", "vae.train.batch_size=6"])
    assert load_config(None, ["launch.nnodes=2", "dit.train.nproc=2"]).launch.nnodes == 2


def test_the_launcher_refuses_a_batch_the_slurm_job_cannot_split(tmp_path, monkeypatch):
    from tasks.train_dit import TRAINER

    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    cfg = config(tmp_path, "dit.train.nproc=3", "dit.train.batch_size=18")  # 18 = 6 x 3 on one node
    with pytest.raises(ValueError, match="world size 12 .launch.nnodes 4 x dit.train.nproc 3"):
        TRAINER.rendezvous(cfg)


# ---------------------------------------------------------------- two agents on this machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(root: Path, *extra: str) -> list[str]:
    """The settings of a run of 2 nodes x 1 rank on 127.0.0.1 (a fresh rendezvous port)."""
    return [f"data.root={root}", "data.name=ds", f"run.root={root}/runs", *TINY, "dit.train.batch_size=8",
            "dit.train.loader_workers=0", "dit.train.log_every=1", "dit.train.checkpoint_every=2", "launch.nnodes=2",
            f"launch.rdzv_endpoint=127.0.0.1:{free_port()}", "launch.join_timeout=60", *extra]


def start_agent(settings: list[str], log_file: Path) -> subprocess.Popen:
    """`tagdit train-agent` as a second node would run it (here: the same machine)."""
    cmd = [sys.executable, "-m", "flows.command", "train-agent", *(a for s in settings for a in ("--set", s))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=log_file.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


@pytest.fixture
def one_thread_ranks(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the flow's torchrun ranks: 2 ranks on shared cores


class Lines(logging.Handler):
    """The messages of one logger, whatever Prefect's logging set-up does with propagation and streams."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.logger, self.lines = logging.getLogger(name), []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> list[str]:
        self.logger.addHandler(self)
        self.level_was, self.logger.level = self.logger.level, logging.INFO
        return self.lines

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.level = self.level_was


@pytest.mark.slow
def test_two_agents_train_one_run_from_a_flow_and_one_node_resumes_it(prefect_env, one_thread_ranks, tmp_path):
    from prefect import flow
    from prefect.runtime import flow_run

    from tagdit.demo.stand_in_latents import write_latent_fixture
    from tasks.train_dit import train_dit_stage
    from tests.test_rank_reports import flow_artifacts

    latents = write_latent_fixture(tmp_path / "ds", n_train=16, n_val=4, per_shard=4)
    settings = two_nodes(tmp_path, "dit.train.steps=4", "dit.train.val_every=4")
    agent = start_agent(settings, tmp_path / "agent.log")
    cfg = load_config(None, settings)

    @flow
    def train_in_a_flow() -> tuple[str, int]:
        return flow_run.id, train_dit_stage(cfg, *records(latents)).info["step"]

    with Lines("tagdit.train.launch") as launch_log:
        run_id, step = train_in_a_flow()
    assert agent.wait(timeout=60) == 0, (tmp_path / "agent.log").read_text()
    assert step == 4 and "--rdzv-backend=c10d" in launch_log[0]
    assert any(line.startswith("[local rank 0]") for line in launch_log)  # the ranks' output reaches the flow's log
    progress = [a for a in flow_artifacts(run_id) if a.type == "progress"]
    assert progress and progress[-1].data == 100.0  # relayed from rank 0, wherever it ran
    run = cfg.run_dir / "dit"
    assert (run / "ckpt-0000004").is_dir() and (run / ".shared-token").is_file()

    one = config(tmp_path, "dit.train.batch_size=8", "dit.train.loader_workers=0", "dit.train.steps=6",
                 "dit.train.checkpoint_every=2", "dit.train.val_every=6")
    with Lines("tagdit.train.loop") as loop_log:
        assert train_dit_stage(one, *records(latents)).info["step"] == 6
    assert f"train-dit: resumed from {run / 'ckpt-0000004'} (step 4)" in loop_log
    assert not list(run.parent.glob("dit.superseded-*"))  # kept, not moved aside


@pytest.mark.slow
def test_an_agent_pointed_at_another_run_folder_fails_fast_naming_it(one_thread_ranks, tmp_path):
    from tagdit.demo.stand_in_latents import write_latent_fixture
    from tasks.train_dit import train_dit_stage

    latents = write_latent_fixture(tmp_path / "ds", n_train=8, n_val=4, per_shard=4)
    settings = two_nodes(tmp_path, "dit.train.steps=2")
    agent = start_agent([*settings, f"run.root={tmp_path}/elsewhere"], tmp_path / "agent.log")  # same run, another folder
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"run folder .* is not shared between nodes: rank 0 wrote a token"):
        train_dit_stage(load_config(None, settings), *records(latents))
    assert agent.wait(timeout=30) != 0
    assert time.monotonic() - started < 60
    assert "is not shared between nodes" in (tmp_path / "agent.log").read_text()
    assert not list((tmp_path / "runs" / "demo" / "dit").glob("ckpt-*"))  # stopped before any training
