"""encode flow: image shards + trained VAE -> latent shards and `stats.json` (scale factor).

    python -m flows.encode --config configs/demo.yaml

Needs finished prepare-data and train-vae runs. Cached on the shards, the VAE checkpoint, the
`latents` config and the code; a killed run resumes at the first shard not yet written.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tagdit.config import load_config
from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.runner import expand_force, run_stage
from tagdit.orchestrate.stage import StageRecord
from tasks.records import shard_record, vae_record


@flow(name="encode", flow_run_name=run_namer("encode"))
def encode_flow(
    config: str | None = None, overrides: list[str] | None = None, force: list[str] | None = None
) -> StageRecord:
    """Encode every image shard with the run's EMA VAE; returns the encode stage's record."""
    from tasks.encode import ENCODE, encode_task

    cfg = load_config(config, overrides)
    vae = vae_record(cfg)
    forced = ENCODE.name in expand_force(force, (ENCODE.name,))  # --force encode
    record = run_stage(encode_task, ENCODE, cfg, force=forced, shards=shard_record(cfg), vae=vae)
    get_run_logger().info("encode: %s (scale factor %.5f over %d train images)", record.info["latents"],
                          record.info["scale_factor"], record.info["count"])
    return record


if __name__ == "__main__":
    flow_main(encode_flow, "Encode the image shards into VAE latents + the latent scale factor.")
