"""export: a trained run -> one folder that draws on its own (and, with --push, a Hugging Face model repo).

    python -m flows.export --config demo [--run NAME] [--set k=v] --to exports/demo [--overwrite] [--push user/tagdit-demo]

The folder holds the DiT and the VAE (EMA weights, huggingface_hub's config.json + model.safetensors),
the vocabulary, the latent scale factor, the sampling settings and a model card with the run's latest
evaluation grid and metrics (layout: tagdit/formats/exported_model.py). `python -m flows.sample --model DIR`
and `python -m flows.serve --model DIR` draw from it alone. It exports the run's latest DiT checkpoint,
pinned against pruning while it is read, so a run still training can be exported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from tagdit.config import PipelineConfig
from tagdit.orchestrate.cli import flow_parser, parse_config
from tagdit.orchestrate.naming import run_namer
from tagdit.orchestrate.params import (
    ConfigRef,
    FolderName,
    HubRepo,
    Override,
    flow_config,
    with_common_args,
)


def export_run(cfg: PipelineConfig, to: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the run's latest DiT checkpoint, its VAE, vocabulary and latent statistics to `to`."""
    from tagdit.data.vocab import Vocab
    from tagdit.formats.checkpoints import Checkpoints, read_checkpoint_meta
    from tagdit.formats.exported_model import ExportIndex, write_export
    from tagdit.formats.latent_shards import LatentStats
    from tagdit.formats.trained_models import load_dit, load_vae
    from tasks.records import latest_evaluation, run_files, training_settings

    files = run_files(cfg)
    with Checkpoints(files.dit_checkpoint.parent).pinned(files.dit_checkpoint) as ckpt:
        dit = load_dit(ckpt, schedule=cfg.dit.schedule, timesteps=cfg.dit.timesteps)  # fallback only
        step = read_checkpoint_meta(ckpt).step
    if dit.vocab_size != (n := len(Vocab.load(files.vocab))):
        raise ValueError(f"{ckpt} was trained with {dit.vocab_size} tokens, {files.vocab} has {n}")
    vae, _ = load_vae(files.vae_checkpoint)
    stats = LatentStats.of_run(ckpt.parent, files.latents_dir)  # the scale factor the DiT trained with
    sampler, evaluation = cfg.evaluate.samplers[0], latest_evaluation(cfg, ckpt)
    index = ExportIndex(
        resolution=stats.latent_shape[-1] * vae.downsample_factor, latent_shape=stats.latent_shape,
        schedule=dit.schedule, timesteps=dit.timesteps, max_tags=dit.cfg.max_tags,
        sampler={"sampler": sampler.sampler, "steps": sampler.steps, "eta": sampler.eta}, cfg_scale=cfg.evaluate.cfg_scale,
        source={"run": cfg.run.name, "dataset": cfg.data.name, "dit_checkpoint": ckpt.name, "dit_step": step,
                "vae_checkpoint": files.vae_checkpoint.name, "vae_id": stats.vae_id})
    folder = write_export(to, dit=dit, vae=vae, stats=stats, vocab_file=files.vocab, index=index,
                          settings=training_settings(files), evaluation=evaluation, overwrite=overwrite)
    return {"folder": str(folder), "checkpoint": str(ckpt), "step": step,
            "evaluation": str(evaluation) if evaluation else None}


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """A network failure or a busy Hub, never a refusal (no token, not your repo: 4xx)."""
    try:
        state.result()
    except Exception as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status is None or status == 429 or status >= 500
    return False


@task(name="push-export", retries=2, retry_delay_seconds=30, retry_condition_fn=_worth_retrying)
def push_task(folder: str, repo_id: str) -> str:
    """Upload the exported folder to the Hub (network: retried)."""
    from tagdit.formats.exported_model import push_export

    return push_export(folder, repo_id)


@flow(name="export", flow_run_name=run_namer("export"))
@with_common_args
def export_flow(config: ConfigRef | None = None, overrides: list[Override] | None = None, *, to: str,
                run: FolderName | None = None, push: HubRepo | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export the run's latest DiT checkpoint as one self-contained folder; optionally push it to the Hub.

    Args:
        to: the folder to write (absent or empty, or an earlier export with overwrite).
        run: the run to export, runs/<run>/ (run.name).
        push: a Hugging Face model repository (user/name) to upload the folder to; needs a token.
        overwrite: replace `to` when it holds an earlier export.
    """
    cfg = flow_config(config, overrides, run=run)
    result = export_run(cfg, to, overwrite)
    get_run_logger().info("export: %s (step %s) -> %s", result["checkpoint"], result["step"], result["folder"])
    if push:
        result["url"] = push_task(result["folder"], push)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser, extras = flow_parser(export_flow, "Export a trained run as one folder that draws on its own.")
    a = parser.parse_args(argv)
    cfg = parse_config(a, run=a.run)
    from tagdit.formats.exported_model import check_destination
    from tasks.records import run_files

    try:  # refuse before any Prefect machinery starts
        check_destination(a.to, a.overwrite)
        run_files(cfg)
    except (FileNotFoundError, FileExistsError) as e:
        parser.exit(2, f"error: {e}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = export_flow(config=a.config, overrides=a.overrides,
                         **{name: getattr(a, name) for name in extras if getattr(a, name) is not None})
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
