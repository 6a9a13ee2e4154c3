"""prepare-data flow: image folder -> crops -> tags -> WebDataset shards (each stage cached).

    python -m flows.prepare_data --config configs/demo.yaml --set data.source=DIR
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from prefect import flow

from tagdit.config import PipelineConfig
from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.params import (
    ConfigRef,
    FolderName,
    Override,
    PrepareStage,
    Unset,
    flow_config,
    with_common_args,
)
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
    publish(cfg, shard)
    return {"crop": crop, "tag": tag, "shard": shard}


def publish(cfg: PipelineConfig, shard: StageRecord) -> None:
    """Artifacts of what went into the shards: 32 random crops with their tags, and the rejects by reason."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tagdit.data.preview import preview, rejects_by_reason
    from tagdit.sampling.grid import image_data_uri

    key = re.sub(r"[^a-z0-9-]+", "-", cfg.data.name.lower())
    info = shard.info
    create_markdown_artifact(key=f"tagdit-shards-{key}", description=f"32 random crops of dataset {cfg.data.name}",
                             markdown=(f"# Dataset {cfg.data.name}: {info['sharded']} samples, "
                                       f"{info['rejected']} rejected, {info['vocab_size']} vocabulary ids\n\n"
                                       f"![crops]({image_data_uri(preview(cfg.dataset_dir), 1100, jpeg_quality=85)})"))
    rejects = rejects_by_reason(cfg.dataset_dir) or [{"reason": "(none)", "count": 0}]
    create_table_artifact(key=f"tagdit-rejects-{key}", table=rejects,
                          description=f"files of {cfg.data.source} not in dataset {cfg.data.name}, by reason")


@flow(name="prepare-data", flow_run_name=run_namer("prepare-data", "dataset"))
@with_common_args
def prepare_data_flow(
    config: ConfigRef | Unset = None, overrides: list[Override] | Unset = None,
    force: list[PrepareStage] | Unset = None,
    source: str | Unset = None, dataset: FolderName | Unset = None,
) -> StageRecord:
    """Crop, tag and shard `data.source`; returns the shard stage's record.

    Args:
        source: the folder of your images, walked recursively (data.source).
        dataset: the dataset's name: shards go to shards/DATASET/ (data.name).
    """
    return prepare_data(flow_config(config, overrides, source=source, dataset=dataset), force)["shard"]


def main(argv: list[str] | None = None) -> Any:
    """The command line: `python -m flows.prepare_data` or `tagdit ...`."""
    return flow_main(prepare_data_flow, "Crop, tag and shard an image folder into WebDataset shards.", argv)


if __name__ == "__main__":
    main()
