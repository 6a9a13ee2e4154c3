"""Training the tag-conditioned DiT: latent shards + tag vocabulary -> DiT checkpoints (raw + EMA).

Streams the encode stage's latent shards (one posterior sample per step, a random flip when the
flipped posterior is stored, times the scale factor the run started with: `started_stats`; straight from
the store when `data.root` is a URL, `data.shard_cache`), tokenises the tags with
conditioning augmentation, and trains ε-prediction (`dit_loss`, DDPM's L_simple, or Min-SNR-γ
weighted) with `tagdit.train.loop.fit`; the checkpoints carry the noise schedule. One step reads
top to bottom here, in `tagdit.train.loop` and in `models.diffusion` / `models.dit`.
"""

from __future__ import annotations

import logging
import random
from functools import partial
from pathlib import Path
from typing import Any

from tagdit.config import DiTConfig, PipelineConfig
from tagdit.data.vocab import VOCAB_FILE, Vocab, augment_tags
from tagdit.formats.image_shards import shard_sources
from tagdit.formats.latent_shards import (
    STATS_FILE,
    LatentSource,
    LatentStats,
    has_flip,
    read_meta,
    read_posterior,
)
from tagdit.stores import working_dir

log = logging.getLogger(__name__)


def shard_urls(latents_dir: Path, split: str, cache: bool = False) -> list[str]:
    """What to open for the latent shards of one split: local files, or a store's, streamed (`shard_sources`)."""
    return shard_sources(latents_dir, split, cache)


def latent_sample_count(url: str) -> int:
    """A latent shard's number of samples: from its `.source.json` (written with it, in the working copy of
    a streamed shard), else from its tar headers."""
    from tagdit.train.tar_samples import tar_sample_count

    source = LatentSource.load(working_dir(url))
    return len(source.images) if source is not None else tar_sample_count(url)


def val_latents(latents_dir: Path, limit: int, cache: bool = False) -> list[dict[str, Any]]:
    """The first `limit` raw validation latents, in shard order (read from the store when streamed)."""
    from tagdit.train.tar_samples import first_samples

    return first_samples(shard_urls(latents_dir, "val", cache), limit)


def decode_latent(raw: dict[str, Any], *, vocab: Vocab, dit: DiTConfig, augment: bool = True) -> dict[str, Any]:
    """Raw sample -> {"mean", "logvar" (z, h, w) fp16, "tags" (max_tags+1,) long}; flip and tags seeded.

    The posterior sample z = mean + exp(logvar / 2) · noise is drawn on the device in the loss.
    """
    import torch

    rng = random.Random(raw.get("__seed__", 0))
    flipped = augment and has_flip(raw) and rng.random() < 0.5
    mean, logvar = read_posterior(raw, flipped)
    tags = read_meta(raw)["tags"]
    if augment:
        tags = augment_tags(tags, rng, caption_drop=dit.caption_drop, tag_drop=dit.tag_drop,
                            shuffle=dit.shuffle_tags, max_tags=dit.model.max_tags)
    return {
        "mean": torch.from_numpy(mean),
        "logvar": torch.from_numpy(logvar),
        "tags": torch.tensor(vocab.encode(tags, dit.model.max_tags), dtype=torch.long),
    }


class StepNoise:
    """One rank's noise and timestep draws: a generator seeded with (seed, step, rank) at each optimiser step.

    The ranks' draws differ, a step's micro-batches continue one generator, and a resume on any number
    of ranks draws what an uninterrupted run would have (no rank's RNG state is copied to another).
    """

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank
        self._step: int | None = None
        self._generator = None

    def at(self, step: int, device):
        """The generator of optimiser step `step` on `device` (the same one for each of its micro-batches)."""
        import torch

        from tagdit.train.resume import step_seed

        if step != self._step:
            self._generator = torch.Generator(device=device).manual_seed(step_seed(self.seed, step, self.rank))
            self._step = step
        return self._generator


def dit_loss(model, batch: dict[str, Any], step: int, *, alpha_bar, stats: LatentStats, noise: StepNoise,
             min_snr_gamma: float | None = None):
    """L_simple (or Min-SNR-γ weighted) on one batch: t ~ U{0..T-1}, ε ~ N(0, I), x_t = q_sample(z, t, ε)."""
    import torch

    from models.diffusion import eps_loss, min_snr_weight, q_sample
    from models.vae import AutoencoderKL

    g = noise.at(step, batch["mean"].device)
    z = stats.to_model(AutoencoderKL.sample(batch["mean"].float(), batch["logvar"].float(), g))  # (B, C, H, W)
    t = torch.randint(0, len(alpha_bar), (z.shape[0],), device=z.device, generator=g)
    eps = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=g)
    weight = None if min_snr_gamma is None else min_snr_weight(t, alpha_bar, min_snr_gamma)
    return eps_loss(model(q_sample(z, t, eps, alpha_bar), t, batch["tags"]), eps, weight), {}


def make_val_fn(latents_dir: Path, vocab: Vocab, cfg: PipelineConfig, alpha_bar, stats: LatentStats, device):
    """Validation loss on fixed (latent, t, noise) triples from the val shards (posterior means)."""
    import torch

    from models.diffusion import eps_loss, q_sample

    raws = val_latents(latents_dir, cfg.dit.val_samples, cfg.data.shard_cache == "local")
    if not raws:
        log.warning("no validation latents in %s: validation loss is off", latents_dir)
        return None
    examples = [decode_latent(r, vocab=vocab, dit=cfg.dit, augment=False) for r in raws]
    z = stats.to_model(torch.stack([e["mean"] for e in examples]).float())  # (N, C, H, W)
    tags = torch.stack([e["tags"] for e in examples])  # (N, L)
    g = torch.Generator().manual_seed(cfg.dit.train.seed)
    T = len(alpha_bar)
    t = torch.linspace(0, T - 1, len(examples)).round().long()[torch.randperm(len(examples), generator=g)]
    eps = torch.randn(z.shape, generator=g)
    x_t = q_sample(z, t, eps, alpha_bar.cpu())
    bs = cfg.dit.train.batch_size

    def val_fn(ema_model, step: int, writer) -> dict[str, float]:
        total = 0.0
        for i in range(0, len(x_t), bs):
            sl = slice(i, i + bs)
            pred = ema_model(x_t[sl].to(device), t[sl].to(device), tags[sl].to(device))
            total += eps_loss(pred, eps[sl].to(device)).item() * len(x_t[sl])
        return {"val_loss": total / len(x_t)}

    return val_fn


def build_dit(cfg: PipelineConfig, vocab_size: int, latent_shape: tuple[int, int, int] | list[int]):
    """A fresh DiT as `cfg.dit` describes it, for a vocabulary and latents of shape (z, h, w).

    (`models.dit.build_dit` rebuilds a trained one from its checkpoint's config.)
    """
    from models.dit import DiT

    z_ch, h, _ = latent_shape
    return DiT(cfg.dit.model, vocab_size=vocab_size, latent_size=h, in_channels=z_ch, schedule=cfg.dit.schedule,
               timesteps=cfg.dit.timesteps)


def started_stats(latents_dir: Path, out_dir: Path, is_main: bool) -> LatentStats:
    """The latent stats of this run: those it started with (its own `stats.json`, kept once it has a
    checkpoint), never a newer scale factor measured on grown latents; a new run takes the latents'."""
    from tagdit.formats.checkpoints import Checkpoints

    latents = LatentStats.load(latents_dir)
    if Checkpoints(out_dir).latest() is None or not (out_dir / STATS_FILE).is_file():
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            latents.save(out_dir)
        return latents
    kept = LatentStats.load(out_dir)
    if is_main and kept.scale_factor != latents.scale_factor:
        log.warning("train-dit: %s continues with the scale factor it started with, %.6f; %s now measures "
                    "%.6f (grown or re-encoded latents): a new run uses that one", out_dir, kept.scale_factor,
                    latents_dir / STATS_FILE, latents.scale_factor)
    return kept


def started_vocab(vocab_path: Path, out_dir: Path, is_main: bool) -> Vocab:
    """The run's vocabulary: the one it started with (its own `vocab.json`, kept once it has a checkpoint):
    a run continued on a grown dataset keeps its token ids; tags new to the data are unknown to it."""
    from tagdit.formats.checkpoints import Checkpoints

    data = Vocab.load(vocab_path)
    if Checkpoints(out_dir).latest() is None or not (out_dir / VOCAB_FILE).is_file():
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            data.save(out_dir / VOCAB_FILE)
        return data
    kept = Vocab.load(out_dir / VOCAB_FILE)
    if is_main and kept.tokens != data.tokens:
        new = len(set(data.tokens) - set(kept.tokens))
        log.warning("train-dit: %s continues with the vocabulary it started with (%d tokens); %s now has %d "
                    "(%d tags new to this run: unknown to it): a new run uses that one", out_dir, len(kept),
                    vocab_path, len(data), new)
    return kept


def dit_checkpoint_bytes(cfg: PipelineConfig, vocab_size: int, latent_shape: tuple[int, int, int] | list[int]) -> int:
    """One checkpoint's size, counted on a model built on the meta device (no memory)."""
    import torch

    from tagdit.train.disk import state_bytes

    with torch.device("meta"):
        return state_bytes(build_dit(cfg, vocab_size, latent_shape))


def train_dit(cfg: PipelineConfig, latents_dir: Path, vocab_path: Path, out_dir: Path, *,
              vae_checkpoint: str | Path | None = None):
    """Train in this process: alone, or as one rank under torchrun. Returns fit's TrainResult.

    `vae_checkpoint` decodes the sample grids (`dit.sample_every`); default: the one stats.json names.
    """
    from tagdit.formats.checkpoints import count_parameters
    from tagdit.train.loop import fit
    from tagdit.train.ranks import epoch_stream, start_rank
    from tagdit.train.samples import make_sample_monitor

    tc = cfg.dit.train
    r = start_rank(tc, "dit")
    stats = started_stats(latents_dir, out_dir, r.is_main)
    z_ch, h, w = stats.latent_shape
    if h != w:
        raise ValueError(f"DiT needs square latents, got {h}x{w}")
    vocab = started_vocab(vocab_path, out_dir, r.is_main)
    model = build_dit(cfg, len(vocab), stats.latent_shape)
    if r.is_main:
        log.info("DiT: %.2fM parameters, vocab %d, latents %s", count_parameters(model) / 1e6, len(vocab), stats.latent_shape)
    alpha_bar = model.alpha_bar.to(r.device)  # (T,) float64; stored with the checkpoint
    decode = partial(decode_latent, vocab=vocab, dit=cfg.dit)
    val_fn = make_val_fn(latents_dir, vocab, cfg, alpha_bar, stats, r.device)  # every rank: fit syncs around it
    monitor = make_sample_monitor(cfg, vocab, latents_dir, stats, vae_checkpoint, r.device) if r.is_main else None
    urls = shard_urls(latents_dir, "train", cfg.data.shard_cache == "local")
    return fit(model=model,
               loss_fn=partial(dit_loss, alpha_bar=alpha_bar, stats=stats, noise=StepNoise(tc.seed, r.rank),
                               min_snr_gamma=cfg.dit.min_snr_gamma),
               stream=epoch_stream(urls, decode, tc, r, latent_sample_count), cfg=tc, out_dir=out_dir,
               model_config=model.config_dict(), device=r.device, val_fn=val_fn, monitor=monitor, desc="train-dit")
