"""Time from a DiT stage's start on a fresh machine to its first training batch, latents in a bucket.

A moto S3 server on loopback holds a dataset's latents folder (shards, their `.source.json` records,
stats.json). Each way starts from an empty working copy (its own TAGDIT_STORE_CACHE), side by side:
  pull     the whole folder pulled first (what every stage did before streaming), then read here
  stream   the selective pull (no shards: `Stage.streams`), shards read from the bucket (data.shard_cache=none)
  cache    the same, each shard kept in the working copy on its first read (data.shard_cache=local)
each up to the first batch of `EpochStream` (one rank, loader in a thread). Reported: seconds, and
the bytes each left on local disk. ratio = pull / stream (> 1: streaming starts sooner); on a real
store, where a GET costs tens of ms and a node pulls terabytes, the gap is far larger.

    .venv/bin/python benchmarks/stream_start.py [--shards 96] [--per-shard 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_latents(dataset: Path, shards: int, per_shard: int) -> Path:
    """A latents folder of `shards` train shards of (4, 32, 32) posteriors with their records, and stats.json."""
    from tagdit.demo.stand_in_latents import write_latent_fixture
    from tagdit.formats.latent_shards import LatentSource
    from tagdit.train.tar_samples import tar_samples

    latents = write_latent_fixture(dataset, n_train=shards * per_shard, n_val=per_shard, shape=(4, 32, 32),
                                   per_shard=per_shard)
    for shard in latents.glob("*.tar"):  # what encode writes beside each shard: the sample counts
        LatentSource(image_shard_sha256="-", images={s["__key__"]: "-" for s in tar_samples(str(shard))}).save(shard)
    return latents


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def first_batch(url: str, cache_dir: Path, streams: tuple[str, ...], cache: bool) -> float:
    """Seconds from an empty working copy of `url` to the first batch."""
    import torch

    from tagdit.formats.latent_shards import read_posterior
    from tagdit.stores import pull_tree, working_dir
    from tagdit.train.dit import latent_sample_count, shard_urls
    from tagdit.train.stream import EpochStream

    os.environ["TAGDIT_STORE_CACHE"] = str(cache_dir)
    start = time.perf_counter()
    copy = working_dir(url)
    pull_tree(copy, skip=streams)
    urls = shard_urls(copy, "train", cache)
    stream = EpochStream(urls, lambda raw: torch.from_numpy(read_posterior(raw)[0].copy()), batch_size=32,
                         seed=0, shuffle_buffer=1000, counts=[latent_sample_count(u) for u in urls])
    next(iter(stream))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=96)
    ap.add_argument("--per-shard", type=int, default=64)
    args = ap.parse_args()
    from tagdit.orchestrate.stage import SHARDS
    from tests.s3_server import S3Server

    logging.getLogger("tagdit").setLevel(logging.WARNING)  # not a line per cached shard

    server = S3Server()
    os.environ.update(server.env)
    tmp = Path(tempfile.mkdtemp(prefix="tagdit-stream-start-"))
    try:
        latents = write_latents(tmp / "ds", args.shards, args.per_shard)
        url = f"{server.bucket('bench')}/ds/latents-fixture"
        server.upload(latents, url)
        size = disk_bytes(latents)
        print(f"{args.shards} train shards x {args.per_shard} samples, folder {size / 1e6:.1f} MB in the bucket")
        ways = {"pull": ((), False), "stream": (SHARDS, False), "cache": (SHARDS, True)}
        secs, local = {}, {}
        for name, (streams, cache) in ways.items():
            cache_dir = tmp / f"cache-{name}"
            secs[name] = first_batch(url, cache_dir, streams, cache)
            local[name] = disk_bytes(cache_dir)
            print(f"{name:7s} first batch after {secs[name]:.2f} s, {local[name] / 1e6:.1f} MB on local disk")
        print(f"RESULT stream_start pull={secs['pull']:.2f}s stream={secs['stream']:.2f}s cache={secs['cache']:.2f}s "
              f"ratio={secs['pull'] / secs['stream']:.2f} local_mb pull={local['pull'] / 1e6:.1f} "
              f"stream={local['stream'] / 1e6:.1f} cache={local['cache'] / 1e6:.1f}")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
