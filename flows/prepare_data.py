"""prepare-data flow: image folder -> crops -> tags -> WebDataset shards (each stage cached).

    python -m flows.prepare_data --config configs/demo.yaml --set data.source=DIR
"""

from __future__ import annotations

from collections.abc import Iterable

from prefect import flow

from tagdit.config import PipelineConfig, load_config
from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.runner import expand_force, run_stage
from tagdit.orchestrate.stage import StageRecord
from tasks.crop import CROP, crop_task
from tasks.shard import SHARD, shard_task
from tasks.tag import TAG, tag_task

STAGES = ("crop", "tag", "shard")


def prepare_data(cfg: PipelineConfig, force: Iterable[str] | None = None) -> dict[str, StageRecord]:
    """Run crop -> tag -> shard inside the calling flow; returns every stage's record."""
    from tagdit.orchestrate.locks import exclusive

    f = expand_force(list(force or []), STAGES)  # a named stage and every stage after it
    with exclusive(cfg.dataset_dir, "prepare-data"):  # crop, tag and shard of one run never interleave with another's
        crop = run_stage(crop_task, CROP, cfg, force="crop" in f)
        tag = run_stage(tag_task, TAG, cfg, force="tag" in f, crop=crop)
        shard = run_stage(shard_task, SHARD, cfg, force="shard" in f, crop=crop, tag=tag)
    return {"crop": crop, "tag": tag, "shard": shard}


@flow(name="prepare-data", flow_run_name=run_namer("prepare-data", "dataset"))
def prepare_data_flow(
    config: str | None = None, overrides: list[str] | None = None, force: list[str] | None = None
) -> StageRecord:
    """Crop, tag and shard `data.source`; returns the shard stage's record."""
    return prepare_data(load_config(config, overrides), force)["shard"]


if __name__ == "__main__":
    flow_main(prepare_data_flow, "Crop, tag and shard an image folder into WebDataset shards.")
