"""Latent pre-encoding throughput: the encode stage vs a plain per-file loop, same model, same images.

Ours: `tasks.encode.encode_latents` over image shards (decoding in a thread pool ahead of batched
encoding, image + mirrored image in one forward, latent shards written, scale factor measured).
Baseline: for each image file, decode it with PIL, encode it alone, then its mirror alone — the
same posteriors, no batching, no streaming, nothing written. Both use the demo config's VAE (random
init: throughput does not depend on the weights) at the demo resolution.

    .venv/bin/python benchmarks/vae_encode.py [--n 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def save_checkpoint(model, cfg_json: dict, ckpt: Path) -> Path:
    from tagdit.train.checkpoints import save_weights

    ckpt.mkdir(parents=True)
    for name in ("model.safetensors", "ema.safetensors"):
        save_weights(ckpt / name, model.state_dict(), cfg_json)
    (ckpt / "meta.json").write_text(json.dumps({"step": 0}))
    return ckpt


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
    ap.add_argument("--n", type=int, default=500, help="images")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch
    from webdataset.tariterators import tarfile_samples

    from benchmarks.vae_report import demo_world_shards
    from models.vae import build_vae
    from tagdit.config import load_config
    from tagdit.formats.image_shards import image_shards
    from tasks.encode import encode_latents

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = load_config(args.config, [f"data.root={work}", "data.name=bench", "vae.train.device=cpu"])
        res = cfg.data.resolution
        dataset = demo_world_shards(work / "bench", n=args.n, res=res, val_fraction=0.05, per_shard=250)
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

        t = time.perf_counter()
        baseline(files, model, res, cfg.latents.flip)
        base_s = time.perf_counter() - t
        t = time.perf_counter()
        stats = encode_latents(cfg, dataset, ckpt, work / "latents", "bench")
        ours_s = time.perf_counter() - t

    n = len(files)
    ours, base = n / ours_s, n / base_s
    print(f"{n} images at {res} px, flip={cfg.latents.flip}, batch {cfg.latents.batch_size}, "
          f"{torch.get_num_threads()} threads: encode stage {ours_s:.1f} s (latent shards + stats, "
          f"scale factor {stats.scale_factor:.4f}), per-file loop {base_s:.1f} s")
    print(f"RESULT vae_encode ours={ours:.1f} img/s baseline={base:.1f} ratio={ours / base:.2f}")


if __name__ == "__main__":
    main()
