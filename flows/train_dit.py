"""train-dit flow: latent shards + tag vocabulary -> DiT checkpoints in `<run>/dit/` (cached, resumable).

    python -m flows.train_dit --config configs/demo.yaml [--set dit.train.steps=4000]

Needs finished prepare-data, train-vae and encode runs. A re-run with unchanged inputs is a
cache hit; a killed run resumes from its latest checkpoint; `dit.train.nproc > 1` trains with
torchrun DDP.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tagdit.config import load_config
from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.runner import expand_force, run_stage
from tagdit.orchestrate.stage import StageRecord
from tasks.records import latents_record, shard_record


@flow(name="train-dit", flow_run_name=run_namer("train-dit"))
def train_dit_flow(
    config: str | None = None, overrides: list[str] | None = None, force: list[str] | None = None
) -> StageRecord:
    """Train (or resume, or reuse) the DiT on the encoded latents; returns its record."""
    from tasks.train_dit import TRAIN_DIT, train_dit_task

    cfg = load_config(config, overrides)
    forced = TRAIN_DIT.name in expand_force(force, (TRAIN_DIT.name,))  # --force train_dit
    record = run_stage(train_dit_task, TRAIN_DIT, cfg, force=forced, latents=latents_record(cfg), shards=shard_record(cfg))
    get_run_logger().info("train-dit: %s (step %s, val loss %s, %s parameters)", record.info["checkpoint"],
                          record.info["step"], record.info["val_loss"], record.info["params"])
    return record


if __name__ == "__main__":
    flow_main(train_dit_flow, "Train the tag-conditioned DiT on the latent shards (cached, resumable).")
