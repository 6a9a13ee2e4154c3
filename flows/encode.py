"""encode flow: image shards + trained VAE -> latent shards and `stats.json` (scale factor).

    python -m flows.encode --config configs/demo.yaml

Needs finished prepare-data and train-vae runs. Cached on the shards, the VAE checkpoint, the
`latents` config and the code; a killed run resumes at the first shard not yet written.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.params import (
    ConfigRef,
    EncodeStage,
    FolderName,
    Override,
    Unset,
    flow_config,
    with_common_args,
)
from tagdit.orchestrate.runner import expand_force, run_stage
from tagdit.orchestrate.stage import StageRecord
from tasks.records import shard_record, vae_record


@flow(name="encode", flow_run_name=run_namer("encode"))
@with_common_args
def encode_flow(
    config: ConfigRef | Unset = None, overrides: list[Override] | Unset = None,
    force: list[EncodeStage] | Unset = None,
    dataset: FolderName | Unset = None, run: FolderName | Unset = None,
) -> StageRecord:
    """Encode every image shard with the run's EMA VAE; returns the encode stage's record.

    Args:
        dataset: the dataset to encode, shards/DATASET/ (data.name).
        run: the run whose VAE encodes, runs/RUN/ (run.name).
    """
    from tasks.encode import ENCODE, encode_task

    cfg = flow_config(config, overrides, dataset=dataset, run=run)
    vae = vae_record(cfg)
    forced = ENCODE.name in expand_force(force, (ENCODE.name,))  # --force encode
    record = run_stage(encode_task, ENCODE, cfg, force=forced, shards=shard_record(cfg), vae=vae)
    get_run_logger().info("encode: %s (scale factor %.5f over %d train images)", record.info["latents"],
                          record.info["scale_factor"], record.info["count"])
    return record


def main(argv: list[str] | None = None) -> Any:
    """The command line: `python -m flows.encode` or `tagdit ...`."""
    return flow_main(encode_flow, "Encode the image shards into VAE latents + the latent scale factor.", argv)


if __name__ == "__main__":
    main()
