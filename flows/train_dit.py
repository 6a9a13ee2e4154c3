"""train-dit flow: latent shards + tag vocabulary -> DiT checkpoints in `runs/RUN/dit/` (cached, resumable).

    python -m flows.train_dit --config configs/demo.yaml [--set dit.train.steps=4000]

Needs finished prepare-data, train-vae and encode runs. A re-run with unchanged inputs is a
cache hit; a killed run resumes from its latest checkpoint; `dit.train.nproc > 1` trains with
torchrun DDP.
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
    TrainDitStage,
    Unset,
    flow_config,
    with_common_args,
)
from tagdit.orchestrate.runner import cancelled, expand_force, run_stage
from tagdit.orchestrate.stage import StageRecord
from tagdit.train.stop import TrainingStopped
from tasks.records import latents_record, shard_record


@flow(name="train-dit", flow_run_name=run_namer("train-dit"))
@with_common_args
def train_dit_flow(
    config: ConfigRef | Unset = None, overrides: list[Override] | Unset = None,
    force: list[TrainDitStage] | Unset = None,
    dataset: FolderName | Unset = None, run: FolderName | Unset = None,
    dit_steps: Steps | Unset = None, gpus: Gpus | Unset = None,
) -> StageRecord | State:
    """Train (or resume, or reuse) the DiT on the encoded latents; returns its record.

    Args:
        dataset: the dataset to train on, shards/DATASET/ (data.name).
        run: the run to train, runs/RUN/ (run.name).
        dit_steps: optimizer steps (dit.train.steps); a finished run given more steps resumes.
        gpus: GPUs to train on with torchrun (vae.train.nproc and dit.train.nproc).
    """
    from tasks.train_dit import TRAIN_DIT, train_dit_task

    cfg = flow_config(config, overrides, dataset=dataset, run=run, dit_steps=dit_steps, gpus=gpus)
    forced = TRAIN_DIT.name in expand_force(force, (TRAIN_DIT.name,))  # --force train-dit
    try:
        record = run_stage(train_dit_task, TRAIN_DIT, cfg, force=forced, latents=latents_record(cfg),
                           shards=shard_record(cfg))
    except TrainingStopped as e:  # the run is being cancelled: training stopped at a checkpoint
        return cancelled(e)
    get_run_logger().info("train-dit: %s (step %s, val loss %s, %s parameters)", record.info["checkpoint"],
                          record.info["step"], record.info["val_loss"], record.info["params"])
    return record


def main(argv: list[str] | None = None) -> Any:
    """The command line: `python -m flows.train_dit` or `tagdit ...`."""
    return flow_main(train_dit_flow, "Train the tag-conditioned DiT on the latent shards (cached, resumable).", argv)


if __name__ == "__main__":
    main()
