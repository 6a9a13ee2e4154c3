"""A prepared dataset in a bucket, checked from a fresh machine: the stamp checked against the store vs a full pull.

A moto S3 server on loopback holds a dataset that crop, tag, shard and encode wrote to
`s3://…/shards` (photo-sized JPEGs, the near-free stand-in tagger, the demo's random-init VAE).
Each way starts from an empty working copy (its own TAGDIT_STORE_CACHE), side by side in one process:
  ours       what `run_stage` does now: the small files and stamps pulled, each stamp checked against
             the store's listing (`runner.checked_record` for crop, tag and shard)
  baseline   what it did before: the dataset folder pulled whole (but nothing the stage streams), then
             the same stamps checked against the local files
Both must find every stage valid. Reported: seconds and the bytes each left on local disk;
ratio = baseline / ours seconds. On a real store, with a GET costing tens of ms and a dataset of
terabytes, the gap is far larger: the baseline grows with the data, ours with the number of objects.

    .venv/bin/python benchmarks/fresh_hit.py [--n 400]
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from grow_dataset import demo_vae  # noqa: E402  benchmarks/ is the script folder
from prep_throughput import make_jpegs  # noqa: E402
from stream_start import disk_bytes  # noqa: E402


def prepare(cfg, vae: Path) -> dict:
    """crop -> tag -> shard -> encode into the bucket; the records' keys and fingerprints."""
    from tagdit.stores import push_tree
    from tasks.crop import crop_stage
    from tasks.encode import encode_latents
    from tasks.shard import shard_stage
    from tasks.tag import tag_stage

    crop = crop_stage(cfg)
    tag = tag_stage(cfg, crop)
    shard = shard_stage(cfg, crop, tag)
    encode_latents(cfg, cfg.dataset_dir, vae, cfg.dataset_dir / "latents-bench", "bench")
    push_tree(cfg.dataset_dir)  # what run_stage does when a stage ends
    return {r.stage: (r.key, r.fingerprint) for r in (crop, tag, shard)}


def check(cfg, cache: Path, lazy: bool) -> tuple[float, dict]:
    """Seconds from an empty working copy to the three data stages found valid; their keys and fingerprints."""
    from tagdit.orchestrate.runner import checked_record, pull_roots
    from tasks.crop import CROP
    from tasks.shard import SHARD
    from tasks.tag import TAG

    os.environ["TAGDIT_STORE_CACHE"] = str(cache)
    start = time.perf_counter()
    records, up = {}, {}
    for stage in (CROP, TAG, SHARD):
        if lazy:
            rec = checked_record(stage, cfg, up)
        else:
            pull_roots(cfg, stage.streams)
            rec = stage.valid_record(cfg, up)
        assert rec is not None, f"{stage.name}: not valid from a fresh copy"
        records[stage.name] = (rec.key, rec.fingerprint)
        up[stage.name] = rec
    return time.perf_counter() - start, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="source images")
    ap.add_argument("--res", type=int, default=128)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tagdit").setLevel(logging.WARNING)  # not a line per listing and pull
    logging.getLogger("tasks").setLevel(logging.WARNING)
    from tagdit.config import load_config
    from tagdit.demo.stand_in_taggers import build_wd_model
    from tests.s3_server import S3Server

    server = S3Server()
    os.environ.update(server.env)
    tmp = Path(tempfile.mkdtemp(prefix="tagdit-fresh-hit-"))
    try:
        src = tmp / "src"
        make_jpegs(src, args.n)
        cfg = load_config(None, [f"data.source={src}", f"data.root={server.bucket('bench')}/shards",
                                 f"data.resolution={args.res}", f"tagger.path={build_wd_model(tmp / 'wd')}",
                                 "shards.samples_per_shard=50", "shards.min_tag_count=1", "vae.train.device=cpu",
                                 "latents.batch_size=16"])
        os.environ["TAGDIT_STORE_CACHE"] = str(tmp / "writer")
        made = prepare(cfg, demo_vae(tmp / "vae"))
        stored = disk_bytes(tmp / "writer")
        secs, local = {}, {}
        for name, lazy in (("baseline", False), ("ours", True)):
            secs[name], found = check(cfg, tmp / f"cache-{name}", lazy)
            assert found == made, (name, found, made)
            local[name] = disk_bytes(tmp / f"cache-{name}")
            print(f"{name:8s} crop, tag and shard valid after {secs[name]:.2f} s, "
                  f"{local[name] / 1e6:.2f} MB on local disk")
        print(f"machine: {os.cpu_count()} cores; {args.n} images at {args.res} px; dataset {stored / 1e6:.1f} MB in the bucket")
        print(f"RESULT fresh_hit ours={secs['ours']:.2f}s baseline={secs['baseline']:.2f}s "
              f"ratio={secs['baseline'] / secs['ours']:.2f} local_mb ours={local['ours'] / 1e6:.2f} "
              f"baseline={local['baseline'] / 1e6:.1f}")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
