"""Latent loader samples/s (EpochStream + decode_latent + collate) vs the demo DiT step's consumption.

The loader must never be what a DiT step waits on: goal >= 10x the images/s one training step of
the demo preset consumes on the same machine, in the same run. Shards are synthetic but in the
shared latent format (fp16 mean/logvar + flipped pair + json tags), at the demo's 4x16x16 size.

    python benchmarks/latent_loader.py [--samples 4000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from models.diffusion import make_alpha_bar
from models.dit import DiT
from tagdit.config import load_config
from tagdit.data.vocab import Vocab
from tagdit.formats.latent_shards import LatentShardWriter, LatentStats, latent_shard_name
from tagdit.train.dit import StepNoise, decode_latent, dit_loss, shard_urls
from tagdit.train.optim import make_optimizer
from tagdit.train.stream import EpochStream

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def write_shards(root: Path, n: int, per_shard: int = 500, shape=(4, 16, 16), n_tags: int = 60) -> Vocab:
    rng = np.random.default_rng(0)
    tags = [f"tag {i}" for i in range(n_tags)]
    for s in range((n + per_shard - 1) // per_shard):
        with LatentShardWriter(root / latent_shard_name("train", s)) as w:
            for i in range(min(per_shard, n - s * per_shard)):
                meta = json.dumps({"tags": list(rng.choice(tags, 8, replace=False))}).encode()
                mean, flip_mean = (rng.normal(size=shape).astype(np.float16) for _ in range(2))
                logvar = np.full(shape, -4, np.float16)
                w.write(f"k{s:03d}{i:05d}", meta, mean, logvar, flip_mean, logvar)
    return Vocab.from_tags(tags)


def unit_stats(shape: tuple[int, int, int], n: int) -> LatentStats:
    """`stats.json` of the synthetic latents: already unit variance, so scale factor 1."""
    return LatentStats(scale_factor=1.0, mean=0.0, std=1.0, count=n, values=n * int(np.prod(shape)),
                       latent_shape=list(shape), vae_checkpoint_sha256="", vae_id="synthetic", vae_checkpoint="",
                       weights="ema", seed=0, samples="synthetic")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--steps", type=int, default=5, help="DiT steps timed per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--workers", type=int, default=None, help="loader worker processes (default: dit.train.loader_workers)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(DEMO, ["dit.train.device=cpu"])
    batch = cfg.dit.train.batch_size
    workers = cfg.dit.train.loader_workers if a.workers is None else a.workers
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_shards(Path(tmp), a.samples)
        urls = shard_urls(Path(tmp), "train")
        decode = partial(decode_latent, vocab=vocab, dit=cfg.dit)

        def loader_rate() -> float:
            stream = EpochStream(urls, decode, batch_size=batch, seed=0, shuffle_buffer=cfg.dit.train.shuffle_buffer,
                                 workers=workers)
            it = iter(stream)
            next(it)  # start-up (processes, first shards) is not throughput
            start = time.perf_counter()
            n = 0
            while n < a.samples:
                n += len(next(it)["tags"])
            rate = n / (time.perf_counter() - start)
            it.close()
            return rate

        torch.manual_seed(0)
        model = DiT(cfg.dit.model, vocab_size=len(vocab), latent_size=16).train()
        opt = make_optimizer(model, cfg.dit.train, torch.device("cpu"))
        loss_fn = partial(dit_loss, alpha_bar=make_alpha_bar(cfg.dit.schedule, cfg.dit.timesteps), stats=unit_stats((4, 16, 16), a.samples),
                          noise=StepNoise(0, 0))
        fixed = next(iter(EpochStream(urls, decode, batch_size=batch, seed=1)))

        def step_rate() -> float:
            start = time.perf_counter()
            for s in range(a.steps):
                loss, _ = loss_fn(model, fixed, s)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return batch * a.steps / (time.perf_counter() - start)

        step_rate()  # warm-up
        loads, steps = [], []
        for _ in range(a.rounds):
            loads.append(loader_rate())
            steps.append(step_rate())
    ours, need = statistics.median(loads), statistics.median(steps)
    print(f"loader ({workers} workers): {ours:.0f} samples/s (rounds {[round(x) for x in loads]}); demo DiT step (batch {batch}): "
          f"{need:.0f} images/s (rounds {[round(x) for x in steps]})")
    print(f"RESULT latent_loader ours={ours:.0f} samples/s baseline={need:.0f} ratio={ours / need:.1f}")


if __name__ == "__main__":
    main()
