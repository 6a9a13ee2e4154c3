"""A trained run, ready to draw: DiT checkpoint + VAE + vocabulary + latent statistics.

The evaluation stage, the sample CLI and anything else that turns tag prompts into images load a
run through `load_painter` (explicit files) or `painter_for_run` (a run's finished records).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tagdit.config import PipelineConfig, SamplerConfig
from tagdit.formats.latent_shards import LatentStats

log = logging.getLogger(__name__)


def to_pil(x: Any) -> list[Image.Image]:
    """Images (B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@dataclass
class Painter:
    """Everything needed to turn tag lists into images; `checkpoint` names the DiT weights used."""

    dit: Any
    vae: Any
    vocab: Any
    stats: LatentStats  # latent shape and scale factor
    device: Any
    checkpoint: Path

    @property
    def max_tags(self) -> int:
        return self.dit.cfg.max_tags

    def ids(self, tags: list[str]) -> Any:
        """(1, max_tags + 1) token ids of a tag list."""
        import torch

        return torch.tensor([self.vocab.encode(tags, self.max_tags)], dtype=torch.long)

    def decode(self, z: Any) -> list[Image.Image]:
        """Scaled latents (B, C, h, w) -> images."""
        return to_pil(self.vae.decode(self.stats.to_vae(z.float())))

    def draw(self, conds: list[list[str]], negs: list[list[str]], sampler: SamplerConfig,
             cfg_scale: float, seeds: int | list[int]) -> list[Image.Image]:
        """One image per (cond, neg) row and seed, seed-major (all rows of the first seed, then the
        next), in one batch; each seed's noise is what sampling its rows alone would draw."""
        import torch

        from models.sampling import sample_latents
        from tagdit.train.devices import autocast

        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        tags = torch.cat([self.ids(c) for c in conds]).repeat(len(seeds), 1)  # (S·B, L)
        neg = torch.cat([self.ids(n) for n in negs]).repeat(len(seeds), 1)
        noise = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        with autocast(self.device):
            z = sample_latents(self.dit, tags, neg, alpha_bar=self.dit.alpha_bar,
                               shape=(len(tags), *self.stats.latent_shape), steps=sampler.steps,
                               eta=sampler.eta, scale=cfg_scale, generator=noise, sampler=sampler.sampler)
            return self.decode(z)


def load_painter(cfg: PipelineConfig, checkpoint: str | Path, vae_checkpoint: str | Path,
                 latents_dir: str | Path) -> Painter:
    """A painter from explicit files; the DiT's noise schedule comes from its checkpoint."""
    from models.dit import load_dit
    from models.vae import load_vae
    from tagdit.train.checkpoints import resolve_checkpoint
    from tagdit.train.devices import select_device
    from tagdit.vocab import Vocab

    device = select_device(cfg.evaluate.device)
    ckpt = resolve_checkpoint(checkpoint)
    vocab = Vocab.load(cfg.dataset_dir / "vocab.json")
    dit = load_dit(ckpt, map_location=device, schedule=cfg.dit.schedule, timesteps=cfg.dit.timesteps)  # fallback only
    if dit.vocab_size != len(vocab):
        raise ValueError(f"{ckpt} was trained with {dit.vocab_size} tokens, {cfg.dataset_dir}/vocab.json has {len(vocab)}")
    vae, _ = load_vae(Path(vae_checkpoint))
    return Painter(dit=dit, vae=vae.to(device).eval(), vocab=vocab, stats=LatentStats.load(latents_dir),
                   device=device, checkpoint=ckpt)


def painter_for_run(cfg: PipelineConfig, checkpoint: str | Path | None = None) -> Painter:
    """The run's painter: its latest DiT checkpoint (or `checkpoint`), its VAE and latents."""
    from tagdit.records import latents_record, vae_record

    vae = vae_record(cfg)
    return load_painter(cfg, checkpoint or cfg.run_dir / "dit", vae.info["checkpoint"],
                        latents_record(cfg, vae).out_dir)
