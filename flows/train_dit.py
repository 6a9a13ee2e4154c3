"""train-dit flow: latent shards + tag vocabulary -> DiT checkpoints in `<run>/dit/` (cached, resumable).

    python -m flows.train_dit --config configs/demo.yaml [--set dit.train.steps=4000]

Needs finished prepare-data, train-vae and encode-latents runs. A re-run with unchanged inputs is a
cache hit; a killed run resumes from its latest checkpoint; `dit.train.nproc > 1` trains with
torchrun DDP.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.train_vae import shard_record
from tagdit.cli import flow_main
from tagdit.config import PipelineConfig, load_config
from tagdit.stage import StageRecord, require_stamp, run_stage


def latents_record(cfg: PipelineConfig) -> StageRecord:
    """The encode stage's record, found through the VAE run that names its latents folder."""
    from tasks.encode import STAGE as ENCODE
    from tasks.train_vae import STAGE as VAE

    vae = require_stamp(VAE.out_dir(cfg, {}), VAE.name, "train-vae")
    return require_stamp(ENCODE.out_dir(cfg, {"vae": vae}), ENCODE.name, "encode-latents")


@flow(name="train-dit")
def train_dit_flow(config: str | None = None, overrides: list[str] | None = None, force: bool = False) -> StageRecord:
    """Train (or resume, or reuse) the DiT on the encoded latents; returns its record."""
    from tasks.train_dit import STAGE, train_dit_task

    cfg = load_config(config, overrides)
    record = run_stage(train_dit_task, STAGE, cfg, force=force, latents=latents_record(cfg), shards=shard_record(cfg))
    get_run_logger().info("train-dit: %s (step %s, val loss %s, %s parameters)", record.info["checkpoint"],
                          record.info["step"], record.info["val_loss"], record.info["params"])
    return record


if __name__ == "__main__":
    flow_main(train_dit_flow, "Train the tag-conditioned DiT on the latent shards (cached, resumable).")
