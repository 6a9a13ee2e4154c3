"""encode-latents flow: image shards + trained VAE -> latent shards and `stats.json` (scale factor).

    python -m flows.encode_latents --config configs/demo.yaml

Needs finished prepare-data and train-vae runs. Cached on the shards, the VAE checkpoint, the
`latents` config and the code; a killed run resumes at the first shard not yet written.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tagdit.cli import flow_main
from tagdit.config import load_config
from tagdit.records import shard_record, vae_record
from tagdit.runner import expand_force, run_stage
from tagdit.stage import StageRecord


@flow(name="encode-latents")
def encode_latents_flow(
    config: str | None = None, overrides: list[str] | None = None, force: list[str] | None = None
) -> StageRecord:
    """Encode every image shard with the run's EMA VAE; returns the encode stage's record."""
    from tasks.encode import STAGE, encode_task

    cfg = load_config(config, overrides)
    vae = vae_record(cfg)
    forced = STAGE.name in expand_force(force, (STAGE.name,))  # --force encode
    record = run_stage(encode_task, STAGE, cfg, force=forced, shards=shard_record(cfg), vae=vae)
    get_run_logger().info("encode-latents: %s (scale factor %.5f over %d train images)", record.info["latents"],
                          record.info["scale_factor"], record.info["count"])
    return record


if __name__ == "__main__":
    flow_main(encode_latents_flow, "Encode the image shards into VAE latents + the latent scale factor.")
