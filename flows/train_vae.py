"""train-vae flow: image shards -> KL-VAE checkpoints in `<run>/vae/` (cached, resumable).

    python -m flows.train_vae --config configs/demo.yaml [--set vae.train.steps=3000]

Needs a finished prepare-data run for the same `data.root`/`data.name`. A re-run with unchanged
inputs is a cache hit; a killed run resumes from its latest checkpoint.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tagdit.config import load_config
from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.runner import expand_force, run_stage
from tagdit.orchestrate.stage import StageRecord
from tasks.records import shard_record


@flow(name="train-vae", flow_run_name=run_namer("train-vae"))
def train_vae_flow(
    config: str | None = None, overrides: list[str] | None = None, force: list[str] | None = None
) -> StageRecord:
    """Train (or resume, or reuse) the VAE on the dataset's image shards; returns its record."""
    from tasks.train_vae import TRAIN_VAE, train_vae_task

    cfg = load_config(config, overrides)
    forced = TRAIN_VAE.name in expand_force(force, (TRAIN_VAE.name,))  # --force train_vae
    record = run_stage(train_vae_task, TRAIN_VAE, cfg, force=forced, shards=shard_record(cfg))
    get_run_logger().info("train-vae: %s (vae_id %s, val PSNR %s dB, %s parameters)", record.info["checkpoint"],
                          record.info["vae_id"], record.info["val_psnr"], record.info["params"])
    return record


if __name__ == "__main__":
    flow_main(train_vae_flow, "Train the KL-VAE on the image shards (cached, resumable).")
