"""Peak RSS of crop + tag + shard on 1k vs 10k images: memory must not grow with the dataset.

Each size runs in a fresh subprocess; peak = max(ru_maxrss of the process, of its crop workers).
Small images and a 64 px WD-interface model keep it to a few minutes on 2 cores.
ratio = rss_1k / rss_10k (1.0 = flat; goal >= 0.9).

    .venv/bin/python benchmarks/prep_rss.py
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

    cfg = load_config(None, args)
    crop = crop_stage(cfg)
    shard = shard_stage(cfg, crop, tag_stage(cfg, crop))
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"self": self_kb / 1024, "workers": kids_kb / 1024, "sharded": shard.info["sharded"]}))


def main() -> None:
    from tagdit.demo.stand_in_taggers import build_wd_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wd = build_wd_model(tmp / "wd", size=64)
        peaks = {}
        for n in (1000, 10000):
            src = tmp / f"src{n}"
            make_images(src, n)
            args = [f"data.source={src}", f"data.root={tmp / 'shards'}", f"data.name=n{n}", "data.resolution=32",
                    f"tagger.path={wd}", "tagger.batch_size=64"]
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], cwd=ROOT, check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["sharded"] == n, r
            peaks[n] = max(r["self"], r["workers"])
            print(f"{n} images: peak RSS {r['self']:.0f} MiB (main), {r['workers']:.0f} MiB (crop workers), "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    print(f"machine: {os.cpu_count()} cores")
    ratio = peaks[1000] / peaks[10000]
    print(f"RESULT prep_rss ours={peaks[1000]:.0f} MiB baseline={peaks[10000]:.0f} ratio={ratio:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        main()
