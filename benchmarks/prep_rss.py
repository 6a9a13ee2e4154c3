"""Peak RSS of crop + tag + shard: memory must not grow with the dataset.

Two comparisons, each size in a fresh subprocess; peak = max(ru_maxrss of the process, of its crop workers):
  images  1k vs 10k real images (small ones, a 64 px WD-interface model): ratio = rss_1k / rss_10k
  rows    10k vs 1M synthetic source rows: a user manifest of paths that do not exist, so every row is
          a reject; this measures the bookkeeping alone (listing, sorting and planning the buckets,
          1M crop rows in their chunks, the tag and shard stages' passes over them, the rejects
          table): ratio = rss_10k / rss_1M
1.0 = flat; goal >= 0.9. A few minutes each on 2 cores.

    .venv/bin/python benchmarks/prep_rss.py [--part images|rows|both] [--rows 1000000]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (int(x) for x in rng.integers(48, 97, 2))
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        p = folder / f"d{i // 1000:02d}" / f"{i:05d}.{'jpg' if i % 3 else 'png'}"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p)


def child(args: list[str]) -> None:
    """Run the three stages; print peak RSS in MiB as JSON."""
    from tagdit.config import load_config
    from tasks.crop import crop_stage
    from tasks.shard import shard_stage
    from tasks.tag import tag_stage

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cfg = load_config(None, args)
    steps = {"imports": peak()}
    crop = crop_stage(cfg)
    steps["crop"] = peak()
    tag = tag_stage(cfg, crop)
    steps["tag"] = peak()
    shard = shard_stage(cfg, crop, tag)
    steps["shard"] = peak()
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"self": self_kb / 1024, "workers": kids_kb / 1024, "sharded": shard.info["sharded"],
                      "found": shard.info["found"], "steps": steps}))


def measure(tmp: Path, name: str, source: Path, wd: Path) -> dict:
    """Run the three stages on `source` in a fresh subprocess; its peaks (MiB) and counts."""
    args = [f"data.source={source}", f"data.root={tmp / 'shards'}", f"data.name={name}", "data.resolution=32",
            f"tagger.path={wd}", "tagger.batch_size=64"]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["peak"], r["s"] = max(r["self"], r["workers"]), time.perf_counter() - t0
    steps = ", ".join(f"{k} {v:.0f}" for k, v in r["steps"].items())
    print(f"{name}: peak RSS {r['self']:.0f} MiB (main; after {steps}), {r['workers']:.0f} MiB (crop workers), "
          f"{r['s']:.0f}s", flush=True)
    return r


def synthetic_manifest(path: Path, rows: int) -> Path:
    """A user manifest of `rows` paths (1,000 per folder) that do not exist: every row becomes a reject.

    Row groups of 16k rows: a parquet reader holds a whole row group, so a user's manifest written
    with huge row groups costs one of them in memory (100k-row groups: +35 MiB at 1M rows).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("path", pa.string())])) as w:
        for lo in range(0, rows, 100_000):
            paths = [f"d{i // 1000:04d}/{i:07d}.png" for i in range(lo, min(rows, lo + 100_000))]
            w.write_table(pa.table({"path": paths}), row_group_size=16384)
    return path


def main() -> None:
    import argparse

    from tagdit.demo.stand_in_taggers import build_wd_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["images", "rows", "both"], default="both")
    ap.add_argument("--rows", type=int, default=1_000_000)
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wd = build_wd_model(tmp / "wd", size=64)
        if a.part in ("images", "both"):
            peaks = {}
            for n in (1000, 10000):
                make_images(tmp / f"src{n}", n)
                r = measure(tmp, f"n{n}", tmp / f"src{n}", wd)
                assert r["sharded"] == n, r
                peaks[n] = r["peak"]
            results.append(f"RESULT prep_rss ours={peaks[1000]:.0f} MiB baseline={peaks[10000]:.0f} MiB "
                           f"ratio={peaks[1000] / peaks[10000]:.2f}")
        if a.part in ("rows", "both"):
            peaks = {}
            for n in (10_000, a.rows):
                r = measure(tmp, f"rows{n}", synthetic_manifest(tmp / f"rows{n}.parquet", n), wd)
                assert r["found"] == n and r["sharded"] == 0, r
                peaks[n] = r["peak"]
            results.append(f"RESULT prep_rss_rows rows={a.rows} ours={peaks[a.rows]:.0f} MiB "
                           f"baseline={peaks[10_000]:.0f} MiB ratio={peaks[10_000] / peaks[a.rows]:.2f}")
    print(f"machine: {os.cpu_count()} cores")
    print("\n".join(results))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        main()
