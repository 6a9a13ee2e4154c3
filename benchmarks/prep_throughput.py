"""Crop + encode + shard throughput vs a straightforward PIL loop on the same 1,000 JPEGs.

Ours: the crop stage (JPEG draft decoding, process pool over chunks, crops encoded in the workers)
and the shard stage. Baseline: for each file, full decode, centre crop, LANCZOS resize, save PNG.
Both produce 256 px PNG crops of every image.

    .venv/bin/python benchmarks/prep_throughput.py [--n 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEGs, 600-1600 px on each side, smooth shapes (photo-like sizes, quick to generate)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = (int(x) for x in rng.integers(600, 1601, 2))
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 50)), int(rng.integers(0, h - 50))
            box = [x0, y0, x0 + int(rng.integers(40, w // 2 + 41)), y0 + int(rng.integers(40, h // 2 + 41))]
            d.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        p = folder / f"sub{i % 10}" / f"img{i:05d}.jpg"
        p.parent.mkdir(exist_ok=True)
        img.save(p, quality=90)
        paths.append(p)
    return paths


def baseline(paths: list[Path], out: Path, res: int) -> None:
    """The loop a first script would use: full decode, crop, resize, save."""
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        img = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img.crop((left, top, left + s, top + s)).resize((res, res), Image.LANCZOS).save(out / f"{i:05d}.png")


def empty_tags(cfg, crop):
    """A tag-stage record with no tags, so the timing covers crop + encode + shard only."""
    from tagdit.formats.chunks import read_crop_chunk, write_tag_chunk
    from tagdit.orchestrate.stage import StageRecord

    out = cfg.dataset_dir / "work" / "bench-tags"
    out.mkdir(parents=True, exist_ok=True)
    for c in crop.info["chunks"]:
        keys = read_crop_chunk(Path(crop.out_dir) / c, ["key"], ok_only=True).column("key").to_pylist()
        rows = [{"key": k, "input": "", "tags": [], "scores": [], "categories": [], "rating": "general"} for k in keys]
        write_tag_chunk(rows, out / c)
    return StageRecord(stage="tag", key="bench", out_dir=str(out), fingerprint="bench",
                       info={"chunks": crop.info["chunks"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--res", type=int, default=256)
    args = ap.parse_args()
    from tagdit.config import load_config
    from tasks.crop import crop_stage
    from tasks.shard import shard_stage

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = make_jpegs(tmp / "src", args.n)
        print(f"generated {len(paths)} JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
        t0 = time.perf_counter()
        baseline(paths, tmp / "baseline", args.res)
        t_base = time.perf_counter() - t0
        cfg = load_config(None, [f"data.source={tmp / 'src'}", f"data.root={tmp / 'shards'}",
                                 f"data.resolution={args.res}"])
        t0 = time.perf_counter()
        crop = crop_stage(cfg)
        t_crop = time.perf_counter() - t0
        shard = shard_stage(cfg, crop, empty_tags(cfg, crop))
        t_ours = time.perf_counter() - t0
        assert shard.info["sharded"] == args.n, shard.info
    ours, base = args.n / t_ours, args.n / t_base
    print(f"machine: {os.cpu_count()} cores; crop {t_crop:.1f}s, crop+shard {t_ours:.1f}s, baseline {t_base:.1f}s")
    print(f"RESULT prep_throughput ours={ours:.1f} img/s baseline={base:.1f} ratio={ours / base:.2f}")


if __name__ == "__main__":
    main()
