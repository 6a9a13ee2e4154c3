"""How stages run and trainers span nodes: the `prefect` and `launch` sections (part of no cache key)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from tagdit.config_base import Section


class PrefectConfig(Section):
    """How stages run under Prefect (not part of any cache key)."""

    retries: int = Field(1, ge=0)  # train-vae, encode, train-dit re-run after a crash and resume
    retry_delay_seconds: float = Field(10, ge=0)
    timeout_seconds: dict[str, float] = {}  # optional per-stage limits, e.g. {train-dit: 86400}
    eval_tag: str = "eval"  # evaluation's own concurrency slot, so a nightly run never waits for training
    # where crop chunks, tag chunks and encode shards run (tagdit.orchestrate.chunks): this machine's threads and
    # forked processes, or a Dask cluster (needs the `dask` extra; every worker must see the same paths)
    task_runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None  # an existing Dask scheduler (tcp://host:8786); None = a local cluster
    dask_workers: int = Field(2, ge=1)  # worker processes of that local cluster
    # where the local runner runs tag chunks and encode shards: a worker process per device, each with its
    # own ONNX session / VAE on it. auto = one per visible CUDA device when there are several, else in this
    # process; or a list: [cuda:0, cuda:2], or fake [cpu:0, cpu:1] (a one-thread CPU worker each: tests)
    devices: Literal["auto"] | list[str] = "auto"

    @field_validator("devices")
    @classmethod
    def _device_names(cls, v: str | list[str]) -> str | list[str]:
        if v == "auto":
            return v
        bad = [d for d in v if not re.fullmatch(r"(cuda|cpu):\d+", d)]
        if not v or bad or len(set(v)) < len(v):
            raise ValueError(f"prefect.devices must be auto or distinct cuda:N / cpu:N names, got {v}")
        return v


class LaunchConfig(Section):
    """How a trainer's torchrun spans nodes (not part of any cache key). Unset = the scheduler's (SLURM)
    environment, else one node; the other nodes join with `tagdit train-agent` (docs/guide.md)."""

    nnodes: int | None = Field(None, ge=1)  # nodes training together; None = SLURM_JOB_NUM_NODES, else 1
    # host:port of the c10d rendezvous (the flow run's node hosts it); None = MASTER_ADDR[:MASTER_PORT],
    # else the first host of SLURM_JOB_NODELIST, port 29400
    rdzv_endpoint: str | None = Field(None, pattern=r"^[^:\s]+(:\d+)?$")
    rdzv_id: str | None = None  # the rendezvous' name (+ -<stage>), the same on every node; None = SLURM_JOB_ID, else run.name
    max_restarts: int = Field(0, ge=0)  # torchrun restarts all ranks after a failure this often (each resumes)
    join_timeout: float = Field(600, gt=0)  # seconds a node waits for the others to join
