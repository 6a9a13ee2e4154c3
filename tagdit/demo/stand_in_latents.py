"""Tiny synthetic latent shards in the encode stage's format (shards, stats.json, vocab.json), for tests and benchmarks.

Each latent is a learnable function of its tags: every tag adds a fixed pattern, so a DiT can
learn the tag -> latent mapping and a model that ignores its tags cannot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tagdit.data.vocab import Vocab
from tagdit.formats.latent_shards import LatentShardWriter, LatentStats, latent_shard_name

TAGS = ["red hair", "blue hair", "smile", "hat", "glasses", "^_^"]


def fixture_stats(scale_factor: float, shape: tuple[int, int, int], count: int) -> LatentStats:
    """A `stats.json` for synthetic latents: the given scale factor, fake provenance."""
    return LatentStats(scale_factor=scale_factor, mean=0.0, std=1 / scale_factor, count=count,
                       values=count * int(np.prod(shape)), latent_shape=list(shape), vae_checkpoint_sha256="0" * 64,
                       vae_id="fixture", vae_checkpoint="", weights="ema", seed=0, samples="synthetic")


def write_latent_fixture(
    dataset_dir: Path,
    n_train: int = 32,
    n_val: int = 8,
    shape: tuple[int, int, int] = (4, 8, 8),
    per_shard: int = 16,
    flip: bool = True,
    scale_factor: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write `<dataset_dir>/vocab.json` and `<dataset_dir>/latents-fixture/` (shards + stats.json)."""
    rng = np.random.default_rng(seed)
    patterns = {t: rng.normal(0, 2.0, shape).astype(np.float32) for t in TAGS}
    out = Path(dataset_dir) / "latents-fixture"
    out.mkdir(parents=True, exist_ok=True)
    Vocab.from_tags(TAGS).save(Path(dataset_dir) / "vocab.json")
    index = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for shard in range((n + per_shard - 1) // per_shard):
            with LatentShardWriter(out / latent_shard_name(split, shard)) as w:
                for _ in range(min(per_shard, n - shard * per_shard)):
                    tags = [t for t in TAGS if rng.random() < 0.4] or [TAGS[0]]
                    mean = sum(patterns[t] for t in tags) / len(tags)
                    logvar = np.full(shape, -6.0, np.float32)
                    meta = json.dumps({"tags": tags + ["rare tag"], "scores": [0.9] * (len(tags) + 1)}).encode()
                    flipped = (mean[:, :, ::-1], logvar) if flip else ()
                    w.write(f"img{index:05d}", meta, mean, logvar, *flipped)
                    index += 1
    fixture_stats(scale_factor, shape, n_train).save(out)
    return out
