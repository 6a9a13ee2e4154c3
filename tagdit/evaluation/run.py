"""One evaluation of a DiT checkpoint: sample grids, tag fidelity, Inception KIDs -> metrics.json.

Grids (one per `evaluate.samplers` entry: CFG, unconditional and negative-prompt rows x
`evaluate.seeds`) are the unit of resume: a grid already in the folder is kept unless forced. Tag
fidelity reads the prompted tags back from generated pixels with the tagger (with its standard
error); the KIDs score `evaluate.kid_images` samples per named variant. The Prefect stage around it
is tasks/evaluate.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from tagdit.config import PipelineConfig, SamplerConfig
from tagdit.evaluation.fidelity import reconstruct, tag_fidelity
from tagdit.evaluation.kid import inception_kids
from tagdit.evaluation.report import log_to_tensorboard
from tagdit.files import atomic_path
from tagdit.formats.checkpoints import read_checkpoint_meta
from tagdit.formats.eval_metrics import EvalMetrics
from tagdit.formats.image_shards import open_image, read_samples
from tagdit.sampling.painter import Painter
from tagdit.sampling.prompts import prompt_rows

log = logging.getLogger(__name__)


def val_samples(dataset_dir: Path, limit: int = 512) -> list[tuple[Image.Image, dict]]:
    """(RGB image, json) of the validation split, in shard order."""
    return list(iter_val_samples(dataset_dir, limit))


def iter_val_samples(dataset_dir: Path, limit: int) -> Iterator[tuple[Image.Image, dict]]:
    """`val_samples`, decoded one at a time (the KID's real set may be thousands of images)."""
    return ((open_image(data), meta) for data, meta in read_samples(dataset_dir, "val", limit))


def render_sampler_grid(cfg: PipelineConfig, painter: Painter, rows: list[tuple[list[str], list[str], str]],
                        sampler: SamplerConfig, dst: Path) -> None:
    """One grid: a row per (prompt, negative, caption), a column per evaluation seed."""
    from tagdit.sampling.grid import render_grid

    seeds = cfg.evaluate.seeds
    imgs = painter.draw([r[0] for r in rows], [r[1] for r in rows], sampler, cfg.evaluate.cfg_scale, seeds)
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


def evaluate_checkpoint(cfg: PipelineConfig, painter: Painter, out: Path, force: bool = False) -> EvalMetrics:
    """Grids and metrics of the painter's checkpoint in `out` (metrics.json, TensorBoard under the run)."""
    from tagdit.data.tagger import WDTagger, resolve_tagger

    out.mkdir(parents=True, exist_ok=True)
    reals = val_samples(cfg.dataset_dir)
    prompts, rows = prompt_rows(cfg, painter, reals)
    grids = render_grids(cfg, painter, rows, out, force)
    recs, vae_psnr = reconstruct(painter, reals)
    fidelity = tag_fidelity(cfg, painter, WDTagger.from_config(cfg.tagger), prompts, reals, recs)
    kids = inception_kids(cfg, painter, iter_val_samples(cfg.dataset_dir, cfg.evaluate.kid_real_images))
    dit_meta = read_checkpoint_meta(painter.checkpoint)
    metrics = EvalMetrics(
        **fidelity,
        kid=kids,
        vae_psnr_db=vae_psnr,
        dit_val_loss=dit_meta.metrics.get("val_loss"),
        dit_checkpoint=painter.checkpoint.name,
        dit_step=dit_meta.step,
        prompts=[", ".join(r[0]) for r in rows[:len(prompts)]],
        negative_example={"prompt": ", ".join(rows[-1][0]), "negative": ", ".join(rows[-1][1])},
        grids=grids,
        **resolve_tagger(cfg.tagger).record_info(),
    )
    metrics.write(out / "metrics.json")
    log_to_tensorboard(cfg, metrics)
    return metrics
