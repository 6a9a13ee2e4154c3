"""Evaluation stage: sample grids (DDIM and DDPM, CFG, unconditional and negative-prompt rows),
tag-fidelity metrics (the tagger reads the prompted tags back from generated pixels) with their
standard error, and the Inception KIDs (`evaluate.kid_images` samples, each named variant).

Outputs under `<run>/eval/<dit checkpoint>-<key>/`: `grid-<sampler>.png` (one per sampler, the unit
of resume) and `metrics.json`. The flow publishes them as a Prefect markdown artifact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from prefect import task

from tagdit.config import PipelineConfig, SamplerConfig
from tagdit.evaluation.fidelity import reconstruct, tag_fidelity
from tagdit.evaluation.kid import inception_kids
from tagdit.evaluation.report import log_to_tensorboard
from tagdit.files import atomic_path
from tagdit.formats.eval_metrics import EvalMetrics
from tagdit.formats.image_shards import open_image, read_samples
from tagdit.orchestrate.stage import Stage, StageRecord, stage_cache_key
from tagdit.sampling.painter import Painter, load_painter
from tagdit.sampling.prompts import prompt_rows

log = logging.getLogger(__name__)


def _extra_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """The tagger's resolved commit and file hashes (resolved once per process: no Hub request here),
    and the Inception-v3 weights' sha256 when they are found (they decide whether the Inception KIDs exist)."""
    from models.inception import find_inception_weights
    from tagdit.data.tagger import resolve_tagger
    from tagdit.files import file_fingerprint

    inputs = resolve_tagger(cfg.tagger).key_inputs()
    if (weights := find_inception_weights(cfg.evaluate.inception_weights)) is not None:
        inputs["inception_v3"] = file_fingerprint(weights)
    return inputs


EVALUATE = Stage(
    name="evaluate",
    modules=("tasks.evaluate", "tagdit.evaluation.fidelity", "tagdit.evaluation.kid", "tagdit.sampling.painter",
             "tagdit.sampling.prompts", "tagdit.sampling.grid", "models.sampling", "models.interpolate",
             "models.diffusion", "models.dit", "models.vae", "models.config", "models.kid", "models.inception", "tagdit.data.vocab",
             "tagdit.data.tagger:TagResult", "tagdit.data.tagger:mcut_threshold", "tagdit.data.tagger:select_tags",
             "tagdit.formats.image_shards", "tagdit.formats.latent_shards", "tagdit.formats.wd_image",
             "tagdit.formats.selected_tags", "tagdit.formats.eval_metrics", "tagdit.formats.checkpoints",
             "tagdit.formats.trained_models", "tagdit.devices", "tagdit.data.metrics"),
    sections=("evaluate", "tagger"),
    out_dir=lambda cfg, up: cfg.run_dir / "eval",
    extra_inputs=_extra_inputs,
)


def val_samples(dataset_dir: Path, limit: int = 512) -> list[tuple[Image.Image, dict]]:
    """(RGB image, json) of the validation split, in shard order."""
    return list(iter_val_samples(dataset_dir, limit))


def iter_val_samples(dataset_dir: Path, limit: int) -> Iterator[tuple[Image.Image, dict]]:
    """`val_samples`, decoded one at a time (the KID's real set may be thousands of images)."""
    return ((open_image(data), meta) for data, meta in read_samples(dataset_dir, "val", limit))


def render_sampler_grid(cfg: PipelineConfig, painter: Painter, rows: list[tuple[list[str], list[str], str]],
                        sampler: SamplerConfig, dst: Path) -> None:
    from tagdit.sampling.grid import render_grid

    seeds = cfg.evaluate.seeds
    imgs = painter.draw([r[0] for r in rows], [r[1] for r in rows], sampler, cfg.evaluate.cfg, seeds)
    tiles = [[imgs[j * len(rows) + i] for j in range(len(seeds))] for i in range(len(rows))]  # row i, seed j
    grid = render_grid(tiles, [r[2] for r in rows], [f"seed {s}" for s in cfg.evaluate.seeds])
    with atomic_path(dst) as tmp:
        grid.save(tmp, format="PNG")


def render_grids(cfg: PipelineConfig, painter: Painter, rows: list[tuple], out: Path, force: bool) -> dict[str, str]:
    """One grid per sampler (the unit of resume: a grid already rendered is kept)."""
    grids = {}
    for sampler in cfg.evaluate.samplers:
        dst = out / f"grid-{sampler.name}.png"
        if force or not dst.exists():
            log.info("evaluate: rendering %s (%s, %d steps, eta %g)", dst.name, sampler.sampler, sampler.steps,
                     sampler.eta)
            render_sampler_grid(cfg, painter, rows, sampler, dst)
        grids[sampler.name] = str(dst)
    return grids


def evaluate(cfg: PipelineConfig, shards: StageRecord, vae: StageRecord, latents: StageRecord,
             dit: StageRecord, force: bool = False) -> StageRecord:
    """Render every sampler's grid for the DiT checkpoint `dit` names and compute metrics.json."""
    import torch

    from tagdit.data.tagger import WDTagger, resolve_tagger
    from tagdit.formats.checkpoints import read_checkpoint_meta

    upstream = {"shards": shards, "vae": vae, "latents": latents, "dit": dit}
    if not force and (rec := EVALUATE.valid_record(cfg, upstream)):
        return rec
    torch.manual_seed(0)
    painter = load_painter(cfg, dit.info["checkpoint"], vae.info["checkpoint"], latents.out_dir)
    ckpt = painter.checkpoint
    out = EVALUATE.out_dir(cfg, upstream) / f"{ckpt.name}-{EVALUATE.key(cfg, upstream)[-8:]}"
    out.mkdir(parents=True, exist_ok=True)
    reals = val_samples(cfg.dataset_dir)
    prompts, rows = prompt_rows(cfg, painter, reals)
    grids = render_grids(cfg, painter, rows, out, force)
    recs, vae_psnr = reconstruct(painter, reals)
    fidelity = tag_fidelity(cfg, painter, WDTagger.from_config(cfg.tagger), prompts, reals, recs)
    kids = inception_kids(cfg, painter, iter_val_samples(cfg.dataset_dir, cfg.evaluate.kid_real_images))
    dit_meta = read_checkpoint_meta(ckpt)
    metrics = EvalMetrics(
        **fidelity,
        kid=kids,
        vae_psnr_db=vae_psnr,
        dit_val_loss=dit_meta.metrics.get("val_loss"),
        dit_checkpoint=ckpt.name,
        dit_step=dit_meta.step,
        prompts=[", ".join(r[0]) for r in rows[:len(prompts)]],
        negative_example={"prompt": ", ".join(rows[-1][0]), "negative": ", ".join(rows[-1][1])},
        grids=grids,
        **resolve_tagger(cfg.tagger).record_info(),
    )
    metrics.write(out / "metrics.json")
    log_to_tensorboard(cfg, metrics)
    info = {"dir": str(out), "metrics": str(out / "metrics.json"), "grids": grids, "dit_checkpoint": ckpt.name,
            "tag_recall_ratio": metrics.tag_recall_ratio, "tag_recall_ratio_se": metrics.tag_recall_ratio_se,
            "samples_per_prompt": metrics.samples_per_prompt, "vae_psnr_db": metrics.vae_psnr_db,
            "kid_tagger": metrics.kid_tagger,
            "kid": {name: {"mean": k.mean, "std": k.std, "weights": k.weights, "generated": k.generated}
                    for name, k in metrics.kid.items()},
            "recall": {k: getattr(metrics, k).recall for k in ("cfg", "unconditional", "real", "reconstructed")},
            "sampler_recall": {name: r.recall for name, r in metrics.sampler_recall.items()}}
    return EVALUATE.write_stamp(cfg, upstream, [*(Path(g) for g in grids.values()), out / "metrics.json"], info)


@task(name="evaluate", cache_key_fn=stage_cache_key(EVALUATE), persist_result=True, tags=["eval"])
def evaluate_task(cfg: PipelineConfig, shards: StageRecord, vae: StageRecord, latents: StageRecord,
                  dit: StageRecord, force: bool = False) -> StageRecord:
    """Sample grids + tag-fidelity metrics for the DiT checkpoint `dit` names (its own slot: tag `eval`)."""
    return evaluate(cfg, shards, vae, latents, dit, force=force)
