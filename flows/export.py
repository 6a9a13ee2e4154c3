"""export: a trained run -> one folder that draws on its own (and, with --push, a Hugging Face model repo).

    python -m flows.export --config demo [--run NAME] [--set k=v] --to exports/demo [--overwrite]
        [--push user/tagdit-demo [--private] [--revision BRANCH] [--commit-message TEXT]] [--hub-dataset user/images]

The folder holds the DiT and the VAE (EMA weights, huggingface_hub's config.json + model.safetensors),
the noise schedule for diffusers, the vocabulary, the latent scale factor, the sampling settings and a
model card with the run's latest evaluation grid and metrics (layout: tagdit/formats/exported_model.py).
`tagdit sample --model DIR|USER/NAME`, `tagdit serve --model …` and `tagdit.from_pretrained(…)` draw
from it alone. It exports the run's latest DiT checkpoint, pinned against pruning while it is read, so a
run still training can be exported.
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
    GitRevision,
    HubRepo,
    Override,
    Unset,
    flow_config,
    with_common_args,
)


def _tagger(cfg: PipelineConfig) -> str:
    """Which tagger labelled the run's training images, as the card credits it."""
    if cfg.demo.enabled:
        return "tagdit's demo tagger (a WD-interface stand-in trained on the synthetic demo world)"
    return f"a local tagger ({cfg.tagger.path.name})" if cfg.tagger.path else cfg.tagger.repo


def export_run(cfg: PipelineConfig, to: str | Path, overwrite: bool = False, *, repo_id: str | None = None,
               hub_dataset: str | None = None) -> dict[str, Any]:
    """Write the run's latest DiT checkpoint, its VAE, vocabulary and latent statistics to `to` (a card
    whose examples load from `repo_id` when given, naming `hub_dataset` as its training data)."""
    from tagdit.data.vocab import Vocab
    from tagdit.formats.checkpoints import Checkpoints, read_checkpoint_meta
    from tagdit.formats.exported_model import ExportIndex, write_export
    from tagdit.formats.latent_shards import LatentStats
    from tagdit.formats.model_card import code_source
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
                "vae_checkpoint": files.vae_checkpoint.name, "vae_id": stats.vae_id, "tagger": _tagger(cfg),
                "code": code_source(), **({"hub_dataset": hub_dataset} if hub_dataset else {})})
    folder = write_export(to, dit=dit, vae=vae, stats=stats, vocab_file=files.vocab, index=index, repo_id=repo_id,
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
def push_task(folder: str, repo_id: str, private: bool = False, revision: str | None = None,
              commit_message: str | None = None) -> str:
    """Upload the exported folder to the Hub (network: retried)."""
    from tagdit.formats.exported_model import push_export

    return push_export(folder, repo_id, private=private, revision=revision, commit_message=commit_message)


@flow(name="export", flow_run_name=run_namer("export"))
@with_common_args
def export_flow(config: ConfigRef | Unset = None, overrides: list[Override] | Unset = None, *, to: str,
                run: FolderName | Unset = None, push: HubRepo | Unset = None, private: bool = False,
                revision: GitRevision | Unset = None, commit_message: str | Unset = None,
                hub_dataset: HubRepo | Unset = None, overwrite: bool = False) -> dict[str, Any]:
    """Export the run's latest DiT checkpoint as one self-contained folder; optionally push it to the Hub.

    Args:
        to: the folder to write (absent or empty, or an earlier export with overwrite).
        run: the run to export, runs/RUN/ (run.name).
        push: a Hugging Face model repository (user/name) to upload the folder to; needs a token.
        private: with push: create the repository private (an existing one keeps its visibility).
        revision: with push: the branch to commit to, created from main if missing (default: main).
        commit_message: with push: the commit's message (default: run, checkpoint and step).
        hub_dataset: the Hub dataset (user/name) the training images came from, listed in the card.
        overwrite: replace `to` when it holds an earlier export.
    """
    if (private or revision or commit_message) and not push:
        raise ValueError("private, revision and commit_message apply to push: name the repository with --push")
    cfg = flow_config(config, overrides, run=run)
    result = export_run(cfg, to, overwrite, repo_id=push, hub_dataset=hub_dataset)
    get_run_logger().info("export: %s (step %s) -> %s", result["checkpoint"], result["step"], result["folder"])
    if push:
        result["url"] = push_task(result["folder"], push, private, revision, commit_message)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser, extras = flow_parser(export_flow, "Export a trained run as one folder that draws on its own.")
    a = parser.parse_args(argv)
    cfg = parse_config(a, run=a.run)
    from tagdit.formats.exported_model import check_destination
    from tasks.records import run_files

    if (a.private or a.revision or a.commit_message) and not a.push:
        parser.error("--private, --revision and --commit-message apply to --push: name the repository with --push")
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
