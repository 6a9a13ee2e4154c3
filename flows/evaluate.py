"""evaluate flow: grids + tag-fidelity metrics for a run's DiT, as Prefect artifacts.

    python -m flows.evaluate --config configs/demo.yaml [--set run.name=NAME] [--nightly]

The nightly deployment (`evaluate/nightly`) runs this with `nightly=True`: it evaluates the
checkpoint the run's `dit/latest` points at when it starts, even while training goes on beside it
(evaluation has its own concurrency slot, `prefect.eval_tag`). That checkpoint is pinned while the
evaluation runs (checkpoint pruning skips it) and named in metrics.json and in the artifacts.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger

from tagdit.config import PipelineConfig, load_config
from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.runner import expand_force, run_stage
from tagdit.orchestrate.stage import StageRecord
from tasks.records import upstream_records


def artifact_key(kind: str, cfg: PipelineConfig) -> str:
    """A stable artifact key per run, so successive evaluations line up in the UI."""
    return re.sub(r"[^a-z0-9-]+", "-", f"tagdit-{kind}-{cfg.run.name}".lower())


def publish(cfg: PipelineConfig, record: StageRecord) -> None:
    """Markdown artifact (embedded grid, metrics, file paths) and a metrics table artifact."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tagdit.evaluation.report import artifact_markdown, metrics_table

    checkpoint = record.info.get("dit_checkpoint", "?")
    create_markdown_artifact(markdown=artifact_markdown(record), key=artifact_key("eval", cfg),
                             description=f"tagdit evaluation of run {cfg.run.name}, {checkpoint}")
    create_table_artifact(table=metrics_table(record), key=artifact_key("metrics", cfg),
                          description=f"tagdit metrics of run {cfg.run.name}, {checkpoint}")
    get_run_logger().info("evaluation of %s: grids %s, metrics %s", checkpoint, record.info["grids"],
                          record.info["metrics"])


@flow(name="evaluate", flow_run_name=run_namer("evaluate"))
def evaluate_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    force: list[str] | None = None,
    nightly: bool = False,
) -> dict:
    """Evaluate the run's DiT: its finished training, or with `nightly` its latest checkpoint."""
    from tagdit.formats.checkpoints import Checkpoints
    from tasks.evaluate import EVALUATE, evaluate_task

    cfg = load_config(config, overrides)
    forced = EVALUATE.name in expand_force(force, (EVALUATE.name,))
    if nightly:
        checkpoints = Checkpoints(cfg.run_dir / "dit")
        with checkpoints.pinned(checkpoints.require_latest()) as ckpt:
            get_run_logger().info("nightly evaluation of %s (pinned while it runs)", ckpt)
            record = run_stage(evaluate_task, EVALUATE, cfg, force=forced, **upstream_records(cfg, ckpt))
    else:
        record = run_stage(evaluate_task, EVALUATE, cfg, force=forced, **upstream_records(cfg))
    publish(cfg, record)
    return {"checkpoint": record.info.get("dit_checkpoint"), "grids": record.info["grids"],
            "metrics": str(Path(record.info["metrics"]))}


if __name__ == "__main__":
    flow_main(evaluate_flow, "Render evaluation grids and tag-fidelity metrics for a run.")
