"""Listing a big source tree once: 1M empty files on tmpfs (1,000 folders), the crop stage's first run and a cached re-run.

Side by side, in one process:
  walk    a bare `os.walk` + `os.stat` of every file: the floor of any listing
  list    `list_source`: the same walk, streaming the listing into parquet and hashing the stamps
  first   the crop stage's first run: list, sort by bucket, plan, crop (every file an empty-file reject)
  cached  the crop stage on the unchanged tree: list (one walk) and compare the fingerprint; the
          planning (`_plan`: sorting and reading per-file rows) must not run — counted, must be 0
ratio = cached / first (small: the re-run does nothing per file beyond the walk); list / walk is the
listing's own per-file cost over the walk's.

    .venv/bin/python benchmarks/listing.py [--files 1000000] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_tree(src: Path, files: int, folders: int = 1000) -> None:
    per = -(-files // folders)
    for d in range(folders):
        folder = src / f"d{d:04d}"
        folder.mkdir(parents=True)
        for i in range(min(per, files - d * per)):
            os.close(os.open(folder / f"{i:06d}.png", os.O_CREAT | os.O_WRONLY, 0o644))


def bare_walk(src: Path) -> int:
    n = 0
    for dirpath, _, filenames in os.walk(src):
        for fn in filenames:
            os.stat(os.path.join(dirpath, fn))
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()

    import logging

    import tasks.crop as crop_task
    from tagdit.config import load_config
    from tagdit.data.sources import list_source

    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="tagdit-listing-", dir=args.dir))
    try:
        src = tmp / "src"
        t0 = time.perf_counter()
        make_tree(src, args.files)
        print(f"made {args.files} empty files in 1000 folders under {tmp} in {time.perf_counter() - t0:.0f}s", flush=True)
        t = {}
        t0 = time.perf_counter()
        assert bare_walk(src) == args.files
        t["walk"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        listing = list_source(src, tmp / "listing.parquet")
        t["list"] = time.perf_counter() - t0
        assert listing.found == args.files
        cfg = load_config(None, [f"data.source={src}", f"data.root={tmp / 'shards'}", "data.name=b", "crop.workers=2"])
        t0 = time.perf_counter()
        first = crop_task.crop_stage(cfg)
        t["first"] = time.perf_counter() - t0
        assert first.info["found"] == args.files and first.info["rejected"] == args.files
        planned, real_plan = [], crop_task._plan
        crop_task._plan = lambda *a: (planned.append(1), real_plan(*a))[1]
        t0 = time.perf_counter()
        assert crop_task.crop_stage(cfg) == first
        t["cached"] = time.perf_counter() - t0
        for k, v in t.items():
            print(f"{k}: {v:.1f}s ({args.files / v:,.0f} files/s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {os.cpu_count()} cores")
    print(f"RESULT listing files={args.files} walk={t['walk']:.1f}s list={t['list']:.1f}s first={t['first']:.1f}s "
          f"cached={t['cached']:.1f}s ratio={t['cached'] / t['first']:.3f} list/walk={t['list'] / t['walk']:.2f} "
          f"planned_on_rerun={len(planned)}")


if __name__ == "__main__":
    main()
