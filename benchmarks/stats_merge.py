"""The latent scale factor merged from the moments each latent shard recorded vs the serial pass.

Writes `--shards` synthetic train latent shards of `--per-shard` posteriors (4 x 32 x 32, the
original's latents at 256 px), then times `tagdit.data.encode.latent_stats` twice on them: with no
moment records (the serial pass: every latent read and sampled, as before encode recorded moments)
and with each shard's record (what the encode stage leaves: the merge reads only the small
`<shard>.source.json` files). Writing the records is not timed (the encode stage computes them while
the posteriors are in memory). Both must give the same scale factor (tests/test_encode.py checks it
against one float64 pass over every sample at once).

    .venv/bin/python benchmarks/stats_merge.py [--shards 40] [--per-shard 250]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_shards(folder: Path, shards: int, per_shard: int, shape=(4, 32, 32)) -> list[Path]:
    """Synthetic posteriors (mean ~ N(0.5, 2), logvar -4) as train latent shards, without records."""
    import numpy as np

    from tagdit.formats.latent_shards import LatentShardWriter, latent_shard_name

    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        paths.append(folder / latent_shard_name("train", s))
        with LatentShardWriter(paths[-1]) as w:
            for i in range(per_shard):
                w.write(f"k{s:04d}-{i:04d}", b"{}", rng.normal(0.5, 2.0, shape), np.full(shape, -4.0))
    return paths


def record_moments(paths: list[Path]) -> None:
    """Each shard's `LatentSource` with its moments, as the encode stage writes it."""
    from tagdit.data.encode import shard_moments, shard_seed
    from tagdit.formats.latent_shards import LatentSource, iter_latent_samples, read_posterior

    for p in paths:
        moments = shard_moments((read_posterior(r) for r in iter_latent_samples([p])), shard_seed(p.name))
        LatentSource(image_shard_sha256="", images={}, moments=moments).save(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--per-shard", type=int, default=250)
    args = ap.parse_args()
    import logging

    from tagdit.data.encode import latent_stats

    logging.getLogger("tagdit").setLevel(logging.WARNING)  # the serial side logs a line per unrecorded shard

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), args.shards, args.per_shard)
        load = os.getloadavg()[0]
        t = time.perf_counter()
        serial = latent_stats(paths)
        t_serial = time.perf_counter() - t
        record_moments(paths)
        t = time.perf_counter()
        merged = latent_stats(paths)
        t_merged = time.perf_counter() - t
    equal = merged == serial
    print(f"{args.shards} shards x {args.per_shard} latents (4x32x32): serial pass {t_serial:.2f} s, merge of "
          f"records {t_merged * 1000:.1f} ms; scale factor {merged['scale_factor']:.12f} (serial "
          f"{serial['scale_factor']:.12f}); {os.cpu_count()} cores, load average {load:.1f}")
    print(f"RESULT stats_merge serial={t_serial:.2f}s merged={t_merged:.4f}s ratio={t_serial / t_merged:.0f} "
          f"equal={equal}")


if __name__ == "__main__":
    main()
