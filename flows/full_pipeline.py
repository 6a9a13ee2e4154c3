"""full-pipeline flow: (demo world) -> prepare-data -> train-vae -> encode -> train-dit -> evaluate.

    python -m flows.full_pipeline --config configs/demo.yaml [--set key=value ...] [--force STAGE]

Every stage is a cached task: a re-run with nothing changed is all cache hits; `--force STAGE`
recomputes that stage and everything after it.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import State, flow, get_run_logger

from tagdit.orchestrate.cli import flow_main
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.params import (
    ConfigRef,
    FolderName,
    Gpus,
    Override,
    PipelineStage,
    Steps,
    Unset,
    flow_config,
    with_common_args,
)
from tagdit.orchestrate.runner import PIPELINE_ORDER, cancelled, expand_force, run_stage
from tagdit.orchestrate.stage import StageRecord
from tagdit.train.stop import TrainingStopped


@flow(name="full-pipeline", flow_run_name=run_namer("full-pipeline"))
@with_common_args
def full_pipeline_flow(
    config: ConfigRef | Unset = None, overrides: list[Override] | Unset = None,
    force: list[PipelineStage] | Unset = None,
    source: str | Unset = None, dataset: FolderName | Unset = None, run: FolderName | Unset = None,
    vae_steps: Steps | Unset = None, dit_steps: Steps | Unset = None, gpus: Gpus | Unset = None,
) -> dict[str, Any] | State:
    """Run every stage in order; returns where the outputs are and the headline numbers.

    Args:
        source: the folder of your images, walked recursively (data.source).
        dataset: the dataset's name: shards go to shards/DATASET/ (data.name).
        run: the run's name: models go to runs/RUN/ (run.name).
        vae_steps: VAE optimizer steps (vae.train.steps).
        dit_steps: DiT optimizer steps (dit.train.steps).
        gpus: GPUs to train on with torchrun (vae.train.nproc and dit.train.nproc).
    """
    from flows.evaluate import publish
    from flows.prepare_data import prepare_data
    from tasks import encode, evaluate, train_dit, train_vae
    from tasks.demo import DEMO, build_demo_task

    cfg = flow_config(config, overrides, source=source, dataset=dataset, run=run, vae_steps=vae_steps,
                      dit_steps=dit_steps, gpus=gpus)
    forced = expand_force(force)
    started = time.perf_counter()
    records: dict[str, StageRecord] = {}
    if cfg.demo.enabled:
        records["demo-world"] = run_stage(build_demo_task, DEMO, cfg, force="demo-world" in forced)
    records.update(prepare_data(cfg, force=[s for s in ("crop", "tag", "shard") if s in forced][:1]))
    shards = records["shard"]
    try:
        vae = run_stage(train_vae.train_vae_task, train_vae.TRAIN_VAE, cfg, force="train-vae" in forced, shards=shards)
        latents = run_stage(encode.encode_task, encode.ENCODE, cfg, force="encode" in forced, shards=shards, vae=vae)
        dit = run_stage(train_dit.train_dit_task, train_dit.TRAIN_DIT, cfg, force="train-dit" in forced,
                        latents=latents, shards=shards)
    except TrainingStopped as e:  # the run is being cancelled: training stopped at a checkpoint
        return cancelled(e)
    ev = run_stage(evaluate.evaluate_task, evaluate.EVALUATE, cfg, force="evaluate" in forced,
                   shards=shards, vae=vae, latents=latents, dit=dit)
    records.update({"train-vae": vae, "encode": latents, "train-dit": dit, "evaluate": ev})
    publish(cfg, ev)
    summary = {
        "seconds": round(time.perf_counter() - started, 1),
        "cached": {name: records[name].cached for name in PIPELINE_ORDER if name in records},
        "shards": str(cfg.dataset_dir),
        "run": str(cfg.run_dir),
        "grids": ev.info["grids"],
        "metrics": ev.info["metrics"],
        "tag_recall_ratio": round(ev.info["tag_recall_ratio"], 3),
        "tag_recall_ratio_se": ev.info.get("tag_recall_ratio_se"),
        "tag_recall": {k: round(v, 3) for k, v in ev.info["recall"].items()},
        "vae_psnr_db": round(ev.info["vae_psnr_db"], 2),
    }
    get_run_logger().info("full-pipeline done: %s", summary)
    return summary


def main(argv: list[str] | None = None) -> Any:
    """The command line: `python -m flows.full_pipeline` or `tagdit ...`."""
    return flow_main(full_pipeline_flow, "Run the whole tagdit pipeline (cached, resumable).", argv)


if __name__ == "__main__":
    main()
