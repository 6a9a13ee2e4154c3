"""Sample grids from the EMA weights while the DiT trains: TensorBoard `samples/grid` + a Prefect artifact
(`tagdit.train.reports`: directly in one process, relayed by the launcher under torchrun).

`SampleMonitor` is `fit`'s rank-0 `monitor`. It draws with a `Painter` whose DiT is the current EMA
module, inside `torch.random.fork_rng` and with explicit per-seed generators, so a run with
sampling on writes bit-identical checkpoints to one with it off, and resumes just the same.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from tagdit.config import PipelineConfig, SamplerConfig
from tagdit.sampling.painter import Painter
from tagdit.train.reports import publish_grid, report_dir

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = 4  # grid rows when dit.sample_prompts is empty
CAPTION_POOL = 512  # val captions the default prompts are picked from


def val_captions(latents_dir: Path, limit: int = CAPTION_POOL, cache: bool = False) -> list[dict]:
    """The json of the first `limit` validation latents (their tags and scores)."""
    from tagdit.formats.image_shards import shard_sources
    from tagdit.formats.latent_shards import read_meta
    from tagdit.train.tar_samples import first_samples

    return [read_meta(raw) for raw in first_samples(shard_sources(latents_dir, "val", cache), limit)]


def sample_prompts(cfg: PipelineConfig, vocab: Any, latents_dir: Path) -> list[list[str]]:
    """The grid's rows: `dit.sample_prompts` parsed, or a few frequent val captions (fixed at start)."""
    from tagdit.sampling.prompts import default_prompts

    max_tags = cfg.dit.model.max_tags
    if cfg.dit.sample_prompts:
        prompts = []
        for p in cfg.dit.sample_prompts:
            known, unknown = vocab.parse_prompt(p)
            if unknown:
                log.warning("sample prompt %r: tags not in the vocabulary are left out: %s", p, unknown)
            prompts.append(known[:max_tags])
        return prompts
    captions = val_captions(latents_dir, cache=cfg.data.shard_cache == "local")
    prompts = default_prompts([(None, m) for m in captions], vocab, DEFAULT_PROMPTS, max_tags)
    return prompts or [[]]  # no tagged val latents: one unconditional row


def artifact_key(run_name: str) -> str:
    """`tagdit-train-samples-<run>` with the run name reduced to what artifact keys allow."""
    return "tagdit-train-samples-" + (re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-") or "run")


@dataclass
class SampleMonitor:
    """Every `every` steps (and at the last), a prompts x seeds grid from the EMA weights."""

    painter: Painter  # VAE, vocabulary, latent stats, device; its `dit` is replaced by the EMA module
    prompts: list[list[str]]
    seeds: list[int]
    sampler: SamplerConfig
    cfg_scale: float
    every: int
    total: int
    key: str  # Prefect artifact key

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def render(self, dit: Any) -> Image.Image:
        """The grid (rows = prompts, columns = seeds); the global RNG state is left untouched."""
        import torch

        from tagdit.sampling.grid import render_grid

        device = torch.device(self.painter.device)
        cuda = [device.index or 0] if device.type == "cuda" else []
        was_training = dit.training
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            dit.eval()
            try:
                negs = [[] for _ in self.prompts]
                images = replace(self.painter, dit=dit).draw(self.prompts, negs, self.sampler, self.cfg_scale,
                                                             self.seeds)
            finally:
                dit.train(was_training)
        n = len(self.prompts)
        rows = [[images[s * n + i] for s in range(len(self.seeds))] for i in range(n)]  # seed-major -> rows
        captions = [", ".join(p) or "(unconditional)" for p in self.prompts]
        return render_grid(rows, captions, [f"seed {s}" for s in self.seeds])

    def __call__(self, ema_module: Any, step: int, writer: Any) -> None:
        if not self.due(step):
            return
        import numpy as np

        try:
            grid = self.render(ema_module)
        except Exception:  # e.g. out of memory: a missing grid must not end a long run
            log.exception("samples: no grid at step %d", step)
            return
        writer.add_image("samples/grid", np.asarray(grid), step, dataformats="HWC")
        publish_grid(grid, step, self.key, report_to=report_dir())
        log.info("samples: grid of %d prompts x %d seeds at step %d", len(self.prompts), len(self.seeds), step)


def make_sample_monitor(cfg: PipelineConfig, vocab: Any, latents_dir: Path, stats: Any,
                        vae_checkpoint: str | Path | None, device: Any) -> SampleMonitor | None:
    """The monitor `dit.sample_every` asks for (None when off); loads the VAE onto `device`.

    `stats` are the run's latent stats (its scale factor). The VAE is the one the latents were
    encoded with (stats.json's `vae_checkpoint`) unless `vae_checkpoint` names another; a missing
    one fails at start, not hours into training.
    """
    from tagdit.formats.trained_models import load_vae

    if cfg.dit.sample_every is None:
        return None
    where = vae_checkpoint or stats.vae_checkpoint
    if not where or not Path(where).exists():
        raise FileNotFoundError(f"dit.sample_every needs the VAE to decode samples, but {where!r} (from "
                                f"{'the caller' if vae_checkpoint else Path(latents_dir) / 'stats.json'}) does not "
                                "exist. Set dit.sample_every=null or restore that checkpoint.")
    vae, ckpt = load_vae(where)
    painter = Painter(dit=None, vae=vae.to(device), vocab=vocab, stats=stats, device=device,
                      checkpoint=ckpt)  # the DiT drawn with is the live EMA module, passed per grid
    return SampleMonitor(painter=painter, prompts=sample_prompts(cfg, vocab, latents_dir),
                         seeds=list(cfg.dit.sample_seeds), sampler=SamplerConfig(name="train", steps=cfg.dit.sample_steps),
                         cfg_scale=cfg.evaluate.cfg_scale, every=cfg.dit.sample_every, total=cfg.dit.train.steps,
                         key=artifact_key(cfg.run.name))
