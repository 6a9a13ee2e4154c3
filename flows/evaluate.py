"""evaluate flow: grids + tag-fidelity metrics for a run's DiT, as Prefect artifacts.

    python -m flows.evaluate --config configs/demo.yaml [--set run.name=NAME] [--nightly]

The nightly deployment (`evaluate/nightly`) runs this with `nightly=True`: it evaluates the
checkpoint the run's `dit/latest` points at when it starts, even while training goes on beside it
(evaluation has its own concurrency slot, `prefect.eval_tag`). That checkpoint is pinned while the
evaluation runs (checkpoint pruning skips it), then for as long as the evaluation's record names it,
and named in metrics.json and in the artifacts.
A nightly that starts while the previous one still runs is skipped (Cancelled, saying why): they
never stack (tagdit.orchestrate.single).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Cancelled

from tagdit.config import PipelineConfig
from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.params import (
    ConfigRef,
    EvaluateStage,
    FolderName,
    GuidanceScale,
    Override,
    SamplerChoice,
    Steps,
    Unset,
    flow_config,
    with_common_args,
)
from tagdit.orchestrate.runner import expand_force, pull_roots, run_stage
from tagdit.orchestrate.single import unless_running
from tagdit.orchestrate.stage import StageRecord
from tasks.records import upstream_records

NIGHTLY_LOCK = ".nightly.lock"  # held by the running nightly evaluation of a run


def artifact_key(kind: str, cfg: PipelineConfig) -> str:
    """A stable artifact key per run, so successive evaluations line up in the UI."""
    return re.sub(r"[^a-z0-9-]+", "-", f"tagdit-{kind}-{cfg.run.name}".lower())


def publish(cfg: PipelineConfig, record: StageRecord) -> None:
    """Markdown artifact (embedded grid, metrics, file paths) and the run's trend (table and plot)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tagdit.evaluation.report import artifact_markdown, ratio_text
    from tagdit.evaluation.trend import trend_plot, trend_rows
    from tagdit.formats.eval_metrics import EvalMetrics
    from tagdit.sampling.grid import image_data_uri

    checkpoint = record.info.get("dit_checkpoint", "?")
    create_markdown_artifact(markdown=artifact_markdown(record.info["metrics"]), key=artifact_key("eval", cfg),
                             description=f"tagdit evaluation of run {cfg.run.name}, {checkpoint}")
    rows = trend_rows(Path(record.info["metrics"]).parent.parent)
    create_table_artifact(table=rows, key=artifact_key("metrics", cfg),
                          description=f"tagdit metrics of run {cfg.run.name}: one row per evaluated checkpoint")
    tensorboard = f"Every number of every evaluation: `tensorboard --logdir {cfg.run_dir / 'eval' / 'tb'}` (eval/*)."
    create_markdown_artifact(key=artifact_key("trend", cfg), description=f"tag recall of run {cfg.run.name} by step",
                             markdown=f"# Run {cfg.run.name}: tag recall by step\n\n![trend]({image_data_uri(trend_plot(rows))})"
                                      f"\n\n{tensorboard}")
    get_run_logger().info("evaluation of %s: tag_recall_ratio %s, grids %s, metrics %s", checkpoint,
                          ratio_text(EvalMetrics.read(record.info["metrics"])), record.info["grids"],
                          record.info["metrics"])


@flow(name="evaluate", flow_run_name=run_namer("evaluate"))
@with_common_args
def evaluate_flow(
    config: ConfigRef | Unset = None,
    overrides: list[Override] | Unset = None,
    force: list[EvaluateStage] | Unset = None,
    dataset: FolderName | Unset = None,
    run: FolderName | Unset = None,
    sampler: SamplerChoice | Unset = None,
    sampling_steps: Steps | Unset = None,
    cfg_scale: GuidanceScale | Unset = None,
    nightly: bool = False,
) -> dict:
    """Evaluate the run's DiT: its finished training, or with `nightly` its latest checkpoint.

    Args:
        dataset: the dataset whose validation images are the reference, shards/DATASET/ (data.name).
        run: the run to evaluate, runs/RUN/ (run.name).
        sampler: draw with this sampler only (ddim, ddpm = DDIM with eta 1, dpmpp_2m) instead of the preset's list.
        sampling_steps: the sampler's steps (with `sampler`, or for the preset's first sampler).
        cfg_scale: classifier-free guidance scale of the evaluation samples (evaluate.cfg_scale).
        nightly: evaluate the latest checkpoint while training may go on, skipped while an earlier nightly runs.
    """
    from tagdit.formats.checkpoints import Checkpoints, resolve_checkpoint
    from tasks.evaluate import EVALUATE, evaluate_task

    cfg = flow_config(config, overrides, dataset=dataset, run=run, sampler=sampler,
                      sampling_steps=sampling_steps, cfg_scale=cfg_scale)
    forced = EVALUATE.name in expand_force(force, (EVALUATE.name,))
    if nightly:
        pull_roots(cfg, small_only=True)  # a run root on a URL: what training uploaded since, but weights
        with unless_running(cfg.run_dir / NIGHTLY_LOCK) as other:
            if other is not None:
                message = (f"the nightly evaluation of run {cfg.run.name} started {other.get('since', '?')} "
                           f"({other.get('flow_run_name', 'pid ' + str(other.get('pid')))}) is still running: "
                           "this one is skipped")
                get_run_logger().warning(message)
                return Cancelled(message=message)
            checkpoints = Checkpoints(cfg.run_dir / "dit")
            with checkpoints.pinned(resolve_checkpoint(checkpoints.root)) as ckpt:  # its weights alone come down
                get_run_logger().info("nightly evaluation of %s (pinned while it runs)", ckpt)
                record = run_stage(evaluate_task, EVALUATE, cfg, force=forced, **upstream_records(cfg, ckpt))
    else:
        record = run_stage(evaluate_task, EVALUATE, cfg, force=forced, **upstream_records(cfg))
    publish(cfg, record)
    return {"checkpoint": record.info.get("dit_checkpoint"), "grids": record.info["grids"],
            "metrics": str(Path(record.info["metrics"]))}


def main(argv: list[str] | None = None) -> Any:
    """The command line: `python -m flows.evaluate` or `tagdit ...`."""
    return flow_main(evaluate_flow, "Render evaluation grids and tag-fidelity metrics for a run.", argv)


if __name__ == "__main__":
    main()
