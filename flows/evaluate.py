"""evaluate flow: grids + tag-fidelity metrics for a run's latest DiT checkpoint, as a Prefect artifact.

    python -m flows.evaluate --config configs/demo.yaml [--set run.name=NAME]

The nightly deployment (`evaluate/nightly`) runs this with `nightly=True`: it evaluates whatever
checkpoint the run's `dit/latest` points at, even while training is still going on.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger

from tagdit.cli import flow_main
from tagdit.config import PipelineConfig, load_config
from tagdit.stage import StageRecord, require_stamp, run_stage


def upstream_records(cfg: PipelineConfig, latest_dit: bool) -> dict[str, StageRecord]:
    """The finished stages' records, read from their stamps on disk."""
    from tagdit.files import sha256_file
    from tagdit.training import resolve_checkpoint

    shards = require_stamp(cfg.dataset_dir, "shard", "prepare-data")
    vae = require_stamp(cfg.run_dir / "vae", "train_vae", "train-vae")
    latents = require_stamp(cfg.dataset_dir / f"latents-{vae.info['vae_id']}", "encode", "encode-latents")
    if latest_dit:
        ckpt = resolve_checkpoint(cfg.run_dir / "dit")
        dit = StageRecord(stage="train_dit", key=ckpt.name, out_dir=str(cfg.run_dir / "dit"),
                          fingerprint=sha256_file(ckpt / "ema.safetensors"), info={"checkpoint": str(ckpt)})
    else:
        dit = require_stamp(cfg.run_dir / "dit", "train_dit", "train-dit")
    return {"shards": shards, "vae": vae, "latents": latents, "dit": dit}


def publish(cfg: PipelineConfig, record: StageRecord) -> None:
    """Markdown artifact: small embedded grid, metrics table, links to the full-size files."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.evaluate import artifact_markdown

    key = re.sub(r"[^a-z0-9-]+", "-", f"tagdit-eval-{cfg.run.name}".lower())
    create_markdown_artifact(markdown=artifact_markdown(record), key=key,
                             description=f"tagdit evaluation of run {cfg.run.name}")
    get_run_logger().info("evaluation: grids %s, metrics %s", record.info["grids"], record.info["metrics"])


@flow(name="evaluate")
def evaluate_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    force: list[str] | None = None,
    nightly: bool = False,
) -> dict:
    """Evaluate the run's DiT (the last finished training, or with `nightly` its latest checkpoint)."""
    from tasks.evaluate import EVALUATE, evaluate_task

    cfg = load_config(config, overrides)
    records = upstream_records(cfg, latest_dit=nightly)
    record = run_stage(evaluate_task, EVALUATE, cfg, force=bool(force), **records)
    publish(cfg, record)
    return {"grids": record.info["grids"], "metrics": str(Path(record.info["metrics"]))}


if __name__ == "__main__":
    flow_main(evaluate_flow, "Render evaluation grids and tag-fidelity metrics for a run.")
