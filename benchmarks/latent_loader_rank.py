"""Samples/s one rank's latent loader delivers at world size 8 on 2 cores vs the original DiT's per-GPU demand.

Rank 0 of 8 (rank arguments, no process group) streams synthetic latent shards at the original's shape
(mean + logvar 4x32x32 fp16 plus the flipped pair, flips on, tags) through `EpochStream` +
`decode_latent` + collate with `train.loader_workers` worker processes, pinned to at most 2 cores.
The demand is what one H100 trains on: bf16 dense peak 989 TFLOP/s at 50% MFU over the original DiT's
training FLOPs per image (3x its forward FLOPs, counted by torch's FlopCounterMode on the meta
device: 32x32x4 latents, patch 2 -> 256 tokens). Goal: ratio >= 2. The RESULT is wall-clock, so on a
busy machine it is low; the line before it also gives the rate from CPU time.

    python benchmarks/latent_loader_rank.py [--workers 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tagdit.config import DIT_PRESETS, load_config
from tagdit.data.vocab import Vocab
from tagdit.formats.latent_shards import LatentShardWriter, latent_shard_name
from tagdit.train.dit import decode_latent, shard_urls
from tagdit.train.stream import EpochStream

H100_BF16_DENSE = 989e12  # FLOP/s
MFU = 0.5
SHAPE = (4, 32, 32)  # the original's latents: 256 px images, f = 8, z = 4


def train_flops_per_image(vocab_size: int) -> float:
    """3 x the original DiT's forward FLOPs at batch 1 (matmuls and attention; counted, not run)."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.dit import DiT

    model_cfg = DIT_PRESETS["original-264m"]
    with torch.device("meta"):
        model = DiT(model_cfg, vocab_size=vocab_size, latent_size=SHAPE[1], in_channels=SHAPE[0])
        x_t, t = torch.zeros(1, *SHAPE), torch.zeros(1, dtype=torch.long)
        tags = torch.zeros(1, model_cfg.max_tags + 1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x_t, t, tags)
    return 3.0 * counter.get_total_flops()


def write_shards(root: Path, n_shards: int, per_shard: int, n_tags: int = 1000) -> Vocab:
    """Synthetic latent shards at the original's shape, with flipped posteriors and 8-30 tags each."""
    rng = np.random.default_rng(0)
    tags = [f"tag_{i}" for i in range(n_tags)]
    for s in range(n_shards):
        with LatentShardWriter(root / latent_shard_name("train", s)) as w:
            for i in range(per_shard):
                meta = json.dumps({"tags": list(rng.choice(tags, rng.integers(8, 31), replace=False))}).encode()
                mean, flip_mean = (rng.normal(size=SHAPE).astype(np.float16) for _ in range(2))
                logvar = rng.normal(-4, 0.5, size=SHAPE).astype(np.float16)
                w.write(f"k{s:04d}{i:05d}", meta, mean, logvar, flip_mean, logvar)
    return Vocab.from_tags(tags)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def rank_rate(stream: EpochStream, samples: int) -> tuple[float, float]:
    """(samples/s of the stream after its first batch, the same from CPU time: per 2 busy cores).

    The CPU-time figure is what 2 otherwise idle cores would give (the consumer process needing at
    most one of them); it counts the workers' start-up and read-ahead, and does not depend on what
    else runs on the machine.
    """
    it = iter(stream)
    next(it)
    main0, children0 = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
    start, n = time.perf_counter(), 0
    while n < samples:
        n += len(next(it)["tags"])
    rate = n / (time.perf_counter() - start)
    main = _cpu_seconds(resource.RUSAGE_SELF) - main0
    it.close()  # joins the workers: their CPU time is counted from here
    total = main + _cpu_seconds(resource.RUSAGE_CHILDREN) - children0
    return rate, min(2 * n / total, n / main)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: train.loader_workers)")
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="per-rank batch")
    p.add_argument("--epochs", type=int, default=3, help="rank-0 epochs timed per round")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # workers inherit it
    torch.set_num_threads(1)
    cfg = load_config(None, [])
    workers = cfg.dit.train.loader_workers if a.workers is None else a.workers
    n_shards = 4 * a.world * max(1, workers)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        vocab = write_shards(Path(tmp), n_shards, a.per_shard)
        print(f"wrote {n_shards} shards x {a.per_shard} samples in {time.perf_counter() - start:.0f} s")
        urls = shard_urls(Path(tmp), "train")
        decode = partial(decode_latent, vocab=vocab, dit=cfg.dit)
        per_epoch = n_shards * a.per_shard // a.world
        rounds = [rank_rate(EpochStream(urls, decode, a.batch, seed=r, shuffle_buffer=cfg.dit.train.shuffle_buffer,
                                        rank=0, world_size=a.world, workers=workers), a.epochs * per_epoch)
                  for r in range(a.rounds)]
    flops = train_flops_per_image(len(vocab))
    demand = H100_BF16_DENSE * MFU / flops
    ours, by_cpu = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
    print(f"original DiT: {flops / 3e9:.1f} GFLOP forward, {flops / 1e9:.1f} GFLOP per trained image -> "
          f"{demand:.0f} images/s per H100 at {MFU:.0%} MFU")
    print(f"rank 0 of {a.world}, {workers} loader workers, <= 2 cores, batch {a.batch}: {ours:.0f} samples/s "
          f"(rounds {[round(r[0]) for r in rounds]}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores); from CPU time, on 2 idle cores: {by_cpu:.0f} samples/s "
          f"(ratio {by_cpu / demand:.2f})")
    print(f"RESULT latent_loader_rank ours={ours:.0f} samples/s baseline={demand:.0f} samples/s "
          f"ratio={ours / demand:.2f}")


if __name__ == "__main__":
    main()
