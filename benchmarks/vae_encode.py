"""Latent pre-encoding throughput: the encode stage vs a plain per-file loop, same model, same images.

Ours: `tasks.encode.encode_latents` over image shards (decoding in a thread pool ahead of batched
encoding, image + mirrored image through the encoder in cache-sized chunks on a CPU, glibc's heap
keeping freed activations, latent shards written, scale factor measured).
Baseline: for each image file, decode it with PIL, encode it alone, then its mirror alone — the
same posteriors, no batching, no streaming, nothing written. Both use the demo config's VAE (random
init: throughput does not depend on the weights) at the demo resolution. Rounds alternate between
the two (each encodes every image once; ours into a fresh latent directory) and the median counts.

    .venv/bin/python benchmarks/vae_encode.py [--n 300] [--rounds 5] [--threads 1] [--set latents.batch_size=16]
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


def save_checkpoint(model, cfg_json: dict, ckpt: Path) -> Path:
    from tagdit.formats.checkpoints import save_weights_only

    return save_weights_only(ckpt, model, cfg_json)


def baseline(files: list[Path], model, res: int, flip: bool) -> list:
    """One file at a time: PIL decode, to tensor, encode (and encode the mirror)."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    with torch.inference_mode():
        for f in files:
            img = Image.open(f).convert("RGB").resize((res, res))
            x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, R, R)
            out.append(model.encode(x))
            if flip:
                out.append(model.encode(x.flip(-1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="images")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch
    from webdataset.tariterators import tarfile_samples

    from benchmarks.vae_report import demo_world_shards
    from models.vae import build_vae
    from tagdit.config import load_config
    from tagdit.formats.image_shards import image_shards
    from tasks.encode import encode_latents

    if args.threads:
        torch.set_num_threads(args.threads)
    rates: dict[str, list[float]] = {"ours": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = load_config(args.config, [f"data.root={work}", "data.name=bench", "vae.train.device=cpu", *args.set])
        res = cfg.data.resolution
        dataset = demo_world_shards(work / "bench", n=args.n, res=res, val_fraction=0.05, per_shard=150)
        files = []
        for shard in image_shards(dataset, "train") + image_shards(dataset, "val"):
            for raw in tarfile_samples([{"url": str(shard)}]):
                files.append(work / "files" / f"{raw['__key__']}.png")
                files[-1].parent.mkdir(exist_ok=True)
                files[-1].write_bytes(raw["png"])
        torch.manual_seed(0)
        model = build_vae(cfg.vae.model).eval()
        ckpt = save_checkpoint(model, cfg.vae.model.model_dump(mode="json"), work / "vae" / "ckpt-0000000")
        baseline(files[:8], model, res, cfg.latents.flip)  # warm-up
        for r in range(args.rounds):
            t = time.perf_counter()
            baseline(files, model, res, cfg.latents.flip)
            rates["baseline"].append(len(files) / (time.perf_counter() - t))
            t = time.perf_counter()
            stats = encode_latents(cfg, dataset, ckpt, work / f"latents-{r}", "bench")
            rates["ours"].append(len(files) / (time.perf_counter() - t))
            print(f"round {r}: baseline {rates['baseline'][-1]:.1f} img/s, ours {rates['ours'][-1]:.1f} img/s", flush=True)

    ours, base = (statistics.median(rates[k]) for k in ("ours", "baseline"))
    for k, v in rates.items():
        print(f"{k}: {statistics.median(v):.1f} img/s (spread {min(v):.1f}-{max(v):.1f}, rounds {[round(x, 1) for x in v]})")
    print(f"{len(files)} images at {res} px, flip={cfg.latents.flip}, batch {cfg.latents.batch_size}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; ours = encode stage "
          f"(latent shards + stats, scale factor {stats.scale_factor:.4f}), baseline = per-file loop")
    print(f"RESULT vae_encode ours={ours:.1f} img/s baseline={base:.1f} ratio={ours / base:.2f}")


if __name__ == "__main__":
    main()
