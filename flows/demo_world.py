"""demo-world flow: build (or reuse) the synthetic demo world and its WD-interface demo tagger.

    python -m flows.demo_world --config configs/demo.yaml [--set demo.n_images=500 ...]

Writes `demo.out` (images/ + labels.json) and `demo.tagger_out` (model.onnx, selected_tags.csv,
report.json) and logs the tagger's per-tag precision / recall on held-out world images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.params import (
    ConfigRef,
    DemoStage,
    Override,
    Unset,
    flow_config,
    with_common_args,
)
from tagdit.orchestrate.runner import expand_force, run_stage
from tagdit.orchestrate.stage import StageRecord


@flow(name="demo-world", flow_run_name=run_namer("demo-world", "dataset"))
@with_common_args
def demo_world_flow(
    config: ConfigRef | Unset = None, overrides: list[Override] | Unset = None,
    force: list[DemoStage] | Unset = None,
) -> StageRecord:
    """Build the demo world + demo tagger (cached); returns the stage record."""
    from prefect.artifacts import create_markdown_artifact

    from tagdit.demo.tagger import summary_table
    from tasks.demo import DEMO, build_demo_task

    cfg = flow_config(config, overrides)
    record = run_stage(build_demo_task, DEMO, cfg, force=DEMO.name in expand_force(force, (DEMO.name,)))
    report = json.loads(Path(cfg.demo.tagger_out, "report.json").read_text())
    table = summary_table(report)
    logger = get_run_logger()
    logger.info("demo world: %s images in %s, formats %s, modes %s, %s broken files",
                record.info["images"], cfg.demo.out, record.info["formats"], record.info["modes"], record.info["broken"])
    logger.info("demo tagger (%s held-out world images, thresholds general 0.35 / character 0.85):\n%s",
                report["n_eval"], table)
    create_markdown_artifact(key="demo-tagger", markdown=f"# Demo tagger\n\n```\n{table}\n```\n",
                             description="per-tag precision / recall of the demo tagger")
    return record


def main(argv: list[str] | None = None) -> Any:
    """The command line: `python -m flows.demo_world` or `tagdit ...`."""
    return flow_main(demo_world_flow, "Build the synthetic demo world and its WD-interface demo tagger.", argv)


if __name__ == "__main__":
    main()
