"""train-vae flow: image shards -> KL-VAE checkpoints in `runs/RUN/vae/` (cached, resumable).

    python -m flows.train_vae --config configs/demo.yaml [--set vae.train.steps=3000]

Needs a finished prepare-data run for the same `data.root`/`data.name`. A re-run with unchanged
inputs is a cache hit; a killed run resumes from its latest checkpoint.
"""

from __future__ import annotations

from typing import Any

from prefect import State, flow, get_run_logger

from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.params import (
    ConfigRef,
    FolderName,
    Gpus,
    Override,
    Steps,
    TrainVaeStage,
    Unset,
    flow_config,
    with_common_args,
)
from tagdit.orchestrate.runner import cancelled, expand_force, run_stage
from tagdit.orchestrate.stage import StageRecord
from tagdit.train.stop import TrainingStopped
from tasks.records import shard_record


@flow(name="train-vae", flow_run_name=run_namer("train-vae"))
@with_common_args
def train_vae_flow(
    config: ConfigRef | Unset = None, overrides: list[Override] | Unset = None,
    force: list[TrainVaeStage] | Unset = None,
    dataset: FolderName | Unset = None, run: FolderName | Unset = None,
    vae_steps: Steps | Unset = None, gpus: Gpus | Unset = None,
) -> StageRecord | State:
    """Train (or resume, or reuse) the VAE on the dataset's image shards; returns its record.

    Args:
        dataset: the dataset to train on, shards/DATASET/ (data.name).
        run: the run to train, runs/RUN/ (run.name).
        vae_steps: optimizer steps (vae.train.steps).
        gpus: GPUs to train on with torchrun (vae.train.nproc and dit.train.nproc).
    """
    from tasks.train_vae import TRAIN_VAE, train_vae_task

    cfg = flow_config(config, overrides, dataset=dataset, run=run, vae_steps=vae_steps, gpus=gpus)
    forced = TRAIN_VAE.name in expand_force(force, (TRAIN_VAE.name,))  # --force train-vae
    try:
        record = run_stage(train_vae_task, TRAIN_VAE, cfg, force=forced, shards=shard_record(cfg))
    except TrainingStopped as e:  # the run is being cancelled: training stopped at a checkpoint
        return cancelled(e)
    get_run_logger().info("train-vae: %s (vae_id %s, val PSNR %s dB, %s parameters)", record.info["checkpoint"],
                          record.info["vae_id"], record.info["val_psnr"], record.info["params"])
    return record


def main(argv: list[str] | None = None) -> Any:
    """The command line: `python -m flows.train_vae` or `tagdit ...`."""
    return flow_main(train_vae_flow, "Train the KL-VAE on the image shards (cached, resumable).", argv)


if __name__ == "__main__":
    main()
