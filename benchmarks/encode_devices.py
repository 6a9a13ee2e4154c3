"""The encode stage over 2 fake devices vs 1: does a worker per device scale?

Both sides run `tasks.encode.encode_latents` on the same demo-world image shards with the demo
config's VAE (random init: speed does not depend on the weights): `prefect.devices=[cpu:0]` (one
worker process) against `[cpu:0,cpu:1]` (two). Each fake device is a worker held to one thread
(torch and the decode pool), so the ratio measures the mechanism (worker start, VAE load per worker,
units handed to the free worker), not how torch splits one model over the cores; the goal is >= 1.6
(parallel efficiency >= 0.8) on 2 idle cores. Times include starting the workers and loading the
VAE in each. `busy` is the units' seconds per wall second (2.0: both workers always at work; a
ratio below it is CPU the machine did not give: with the kernel's autogroup scheduling a loaded
machine gives a session the same share however many threads it runs). Workers fork from a server
that imports torch once per process, so round 0 (which starts it) is a warm-up, not counted when
there are more rounds. Rounds alternate, the median counts; both sides must write the same bytes.

    .venv/bin/python benchmarks/encode_devices.py [--n 1600] [--per-shard 100] [--rounds 4]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def latent_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1600, help="images")
    ap.add_argument("--per-shard", type=int, default=100, help="images per shard (a unit)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tasks").setLevel(logging.WARNING)  # no line per shard
    import torch

    import tasks.encode
    from benchmarks.vae_report import demo_world_shards
    from models.vae import build_vae
    from tagdit.config import load_config
    from tagdit.formats.checkpoints import save_weights_only
    from tasks.encode import encode_latents

    units: list = []  # every unit's DeviceRun: how busy the workers were
    real_run_units = tasks.encode.run_units

    def counted_run_units(*a, **k):
        out = real_run_units(*a, **k)
        units.extend(r for task_run in out for r in task_run)  # a task run encodes a few shards
        return out

    tasks.encode.run_units = counted_run_units

    sides = {"1 device": "[cpu:0]", "2 devices": "[cpu:0,cpu:1]"}
    times: dict[str, list[float]] = {k: [] for k in sides}
    busy: dict[str, list[float]] = {k: [] for k in sides}  # unit-seconds per wall second: workers at work at once
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = load_config(args.config, [f"data.root={work}", "data.name=bench"])
        dataset = demo_world_shards(work / "bench", n=args.n, res=base.data.resolution, val_fraction=0.02,
                                    per_shard=args.per_shard)
        torch.manual_seed(0)
        model = build_vae(base.vae.model).eval()
        ckpt = save_weights_only(work / "vae" / "ckpt-0000000", model, base.vae.model.model_dump(mode="json"))
        shards = len(list((dataset / "images").glob("*.tar")))
        for r in range(args.rounds):
            for side, devices in sides.items():
                cfg = load_config(args.config, [f"data.root={work}", "data.name=bench", f"prefect.devices={devices}"])
                loads.append(os.getloadavg()[0])
                units.clear()
                t = time.perf_counter()
                encode_latents(cfg, dataset, ckpt, work / f"latents-{side[0]}-{r}", "bench")
                times[side].append(time.perf_counter() - t)
                busy[side].append(sum(u.finished - u.started for u in units) / times[side][-1])
                print(f"round {r}: {side} {times[side][-1]:.1f} s, workers busy {busy[side][-1]:.2f}", flush=True)
        same = latent_bytes(work / "latents-1-0") == latent_bytes(work / "latents-2-0")

    counted = {k: v[1:] or v for k, v in times.items()}  # round 0 starts the worker server
    one, two = (statistics.median(counted[k]) for k in sides)
    for k, v in times.items():
        print(f"{k}: median {statistics.median(v):.1f} s (rounds {[round(x, 1) for x in v]})")
    print(f"{args.n} images at {base.data.resolution} px in {shards} shards, flip={base.latents.flip}, batch "
          f"{base.latents.batch_size}; each worker one thread; {os.cpu_count()} cores, load average before each "
          f"side {min(loads):.1f}-{max(loads):.1f}; latent bytes equal: {same}")
    b2 = statistics.median(busy["2 devices"][1:] or busy["2 devices"])
    print(f"RESULT encode_devices one={one:.1f}s two={two:.1f}s ratio={one / two:.2f} busy_two={b2:.2f} "
          f"same_bytes={same}")


if __name__ == "__main__":
    main()
