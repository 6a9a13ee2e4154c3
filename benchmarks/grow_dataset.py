"""A growing dataset: re-running prepare-data + encode after adding 1% more files vs the full first run.

Ours: the re-run after the source grew by 1% (crop, tag, shard and encode re-do only the hash
buckets the new files fall in, and inside them only the new files). Baseline: the full first run
on the same machine, in the same process (what every re-run cost when chunks and shards were cut
by position). Both run the stage functions directly (no Prefect server), with the stand-in WD tagger
(`tagdit.demo.stand_in_taggers`, full 448 px preprocessing) and a small random-init VAE; the source
is a folder per character of photo-sized JPEGs. Goal: ratio >= 20 (the re-run <= 5% of the full run).

    .venv/bin/python benchmarks/grow_dataset.py [--n 400] [--grow 0.01]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prep_throughput import make_jpegs  # noqa: E402  benchmarks/ is the script folder


def demo_vae(folder: Path) -> Path:
    """The demo config's VAE, random init (throughput does not depend on the weights), as a checkpoint."""
    import torch

    from models.vae import build_vae
    from tagdit.config import load_config
    from tagdit.formats.checkpoints import save_weights_only

    torch.manual_seed(0)
    mc = load_config(ROOT / "configs" / "demo.yaml", []).vae.model
    model = build_vae(mc)
    return save_weights_only(folder, model, mc.model_dump(mode="json"))


def realcost_tagger(folder: Path, src: Path) -> Path:
    """The tag_pipeline_realcost benchmark's MOAT-cost stand-in, calibrated on a few of the source images."""
    import numpy as np
    from PIL import Image
    from tag_pipeline_realcost import (  # benchmarks/ is the script folder
        N_CHARACTER,
        N_GENERAL,
        convnext_t,
    )

    from tagdit.demo.stand_in_taggers import export_wd_model
    from tagdit.formats.wd_image import wd_preprocess

    x = np.stack([wd_preprocess(Image.open(p), 448) for p in sorted(src.rglob("*.jpg"))[:8]])  # (8, 448, 448, 3)
    return export_wd_model(convnext_t(4 + N_GENERAL + N_CHARACTER), folder, N_GENERAL, N_CHARACTER, x)


def run(cfg, vae: Path) -> dict:
    """crop -> tag -> shard -> encode, as prepare-data then `tagdit stage encode` run them; returns the shard info
    and the crop chunks' names."""
    from tasks.crop import crop_stage
    from tasks.encode import encode_latents
    from tasks.shard import shard_stage
    from tasks.tag import tag_stage

    t0 = time.perf_counter()
    crop = crop_stage(cfg)
    t1 = time.perf_counter()
    tag = tag_stage(cfg, crop)
    t2 = time.perf_counter()
    shard = shard_stage(cfg, crop, tag)
    t3 = time.perf_counter()
    encode_latents(cfg, cfg.dataset_dir, vae, cfg.dataset_dir / "latents-bench", "bench")
    t4 = time.perf_counter()
    print(f"  crop {t1 - t0:.2f}s, tag {t2 - t1:.2f}s, shard {t3 - t2:.2f}s, encode {t4 - t3:.2f}s", flush=True)
    return {**shard.info, "crop_chunks": crop.info["chunks"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="images in the first run")
    ap.add_argument("--grow", type=float, default=0.01, help="fraction of files added before the re-run")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--tagger", choices=["realcost", "colour"], default="realcost",
                    help="realcost: a random-weight ConvNeXt-T at a MOAT-like 35.7 GFLOP per image (the tag stage's "
                         "real share of the work); colour: the near-free stand-in (plumbing and fixed costs only)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from tagdit.config import load_config
    from tagdit.demo.stand_in_taggers import build_wd_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        make_jpegs(src, args.n)  # 10 folders
        tagger = build_wd_model(tmp / "wd") if args.tagger == "colour" else realcost_tagger(tmp / "wd", src)
        cfg = load_config(None, [f"data.source={src}", f"data.root={tmp / 'shards'}", f"data.resolution={args.res}",
                                 f"tagger.path={tagger}", "shards.samples_per_shard=50",
                                 "shards.min_tag_count=1", "vae.train.device=cpu", "latents.batch_size=16"])
        vae = demo_vae(tmp / "vae")
        t0 = time.perf_counter()
        first = run(cfg, vae)
        t_full = time.perf_counter() - t0
        added = max(1, round(args.n * args.grow))
        for i, p in enumerate(make_jpegs(tmp / "more", added, seed=1)):  # the new files, in existing folders
            p.rename(src / f"sub{i % 10}" / f"new{i:05d}.jpg")
        t0 = time.perf_counter()
        second = run(cfg, vae)
        t_grow = time.perf_counter() - t0
        assert second["found"] == args.n + added == second["sharded"] + second["rejected"], second
        touched = len(set(second["crop_chunks"]) - set(first["crop_chunks"]))
    print(f"machine: {os.cpu_count()} cores; tagger {args.tagger}; {args.n} images in {len(first['train_shards'])} train shards; "
          f"full run {t_full:.2f}s; +{added} files in {touched} of {len(first['crop_chunks'])} buckets: "
          f"re-run {t_grow:.2f}s")
    print(f"RESULT grow_dataset ours={t_grow:.2f} baseline={t_full:.2f} ratio={t_full / t_grow:.1f}")


if __name__ == "__main__":
    main()
