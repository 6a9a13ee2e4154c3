"""VAE report: demo-budget validation PSNR (goal >= 30 dB at 64 px), original preset size and step memory.

Trains the VAE exactly as configs/demo.yaml says (the demo's VAE budget) on the demo shards
(`shards/demo/images`) if they exist, else on demo-world images sharded here (same generator,
same centre crop), and reports the EMA model's PSNR on the held-out shards. Then the original preset
(80/160/320): parameter count and the peak memory of one training step at 256 px, batch 16, on
this machine (CPU: process RSS, with the VGG19 perceptual loss; GPU: torch.cuda peak).

    .venv/bin/python benchmarks/vae_report.py [--config configs/demo.yaml] [--skip-memory]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_world_shards(dataset_dir: Path, n: int = 2000, res: int = 64, val_fraction: float = 0.05,
                      per_shard: int = 500, seed: int = 0) -> Path:
    """Demo-world images, centre-cropped to `res`, as image shards in the shared format."""
    import webdataset as wds

    from tagdit.demo.world import decode, make_item
    from tagdit.formats.wd_image import centre_crop

    images = dataset_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    n_val = max(1, round(n * val_fraction))
    counts = {"train": 0, "val": 0}
    writers: dict[str, wds.TarWriter] = {}
    for i in range(n):
        split = "val" if i % round(1 / val_fraction) == 0 and counts["val"] < n_val else "train"
        if counts[split] % per_shard == 0:
            if split in writers:
                writers[split].close()
            writers[split] = wds.TarWriter(str(images / f"{split}-{counts[split] // per_shard:06d}.tar"), mtime=0)
        item = make_item(seed, i)
        buf = io.BytesIO()
        centre_crop(decode(item.data), res).save(buf, "PNG")
        writers[split].write({"__key__": f"img{i:05d}", "png": buf.getvalue(), "json": json.dumps({"tags": item.tags}).encode()})
        counts[split] += 1
    for w in writers.values():
        w.close()
    return dataset_dir


def demo_psnr(config: str, work: Path) -> tuple[float, float, int, str]:
    """(val PSNR dB, training seconds, steps, data source) for the demo config's VAE budget."""
    from tagdit.config import load_config
    from tagdit.formats.image_shards import image_shards
    from tagdit.train.vae import train_vae

    cfg = load_config(config, [f"run.root={work / 'runs'}"])
    dataset, source = cfg.dataset_dir, f"{cfg.dataset_dir}/images"
    if not image_shards(dataset, "train") or not image_shards(dataset, "val"):
        dataset, source = work / "demo", "generated demo-world shards"
        demo_world_shards(dataset, n=cfg.demo.n_images, res=cfg.data.resolution, val_fraction=cfg.shards.val_fraction,
                          per_shard=cfg.shards.samples_per_shard)
    t = time.perf_counter()
    result = train_vae(cfg, dataset, work / "runs" / "vae")
    return result.metrics["val_psnr"], time.perf_counter() - t, result.step, source


def _step_memory(batch: int, res: int, q) -> None:
    """Child process: one original-preset training step; reports peak memory (bytes) and seconds."""
    import resource

    import psutil
    import torch

    from models.perceptual import build_perceptual
    from models.vae import build_vae
    from models.vae_loss import VAELoss
    from tagdit.config import VAE_PRESETS
    from tagdit.devices import select_device
    from tagdit.train.vae import vae_loss

    device = select_device("auto")
    torch.manual_seed(0)
    model = build_vae(VAE_PRESETS["original"]).to(device)
    perceptual = build_perceptual(pretrained=False).to(device)  # same size as the ImageNet VGG19
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    before = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = vae_loss(model, x, 0, criterion=VAELoss(perceptual=perceptual))  # the original's weights
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - t
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    q.put({"peak": peak, "step": peak - before, "seconds": seconds, "device": str(device)})


def step_memory(batch: int, res: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_step_memory, args=(batch, res, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"memory probe (batch {batch}) exited with {p.exitcode}")
    return q.get()


def seed_memory(res: int = 256, batch: int = 16) -> str:
    """Measure batch 2 and 4, extrapolate to `batch`; measure it directly when it surely fits."""
    import psutil

    m2, m4 = step_memory(2, res), step_memory(4, res)
    per_image = (m4["step"] - m2["step"]) / 2
    predicted = m2["step"] + per_image * (batch - 2)
    line = (f"seed step memory at {res} px ({m2['device']}): batch 2 {m2['step'] / 2**30:.2f} GiB "
            f"({m2['seconds']:.1f} s), batch 4 {m4['step'] / 2**30:.2f} GiB ({m4['seconds']:.1f} s); "
            f"batch {batch} predicted {predicted / 2**30:.2f} GiB (+{per_image / 2**30:.2f} GiB per image)")
    if predicted < 0.5 * psutil.virtual_memory().available:
        m = step_memory(batch, res)
        line += f", measured {m['step'] / 2**30:.2f} GiB above the model (peak {m['peak'] / 2**30:.2f} GiB, {m['seconds']:.1f} s)"
    else:
        line += " (not run: would not fit comfortably in free memory)"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--skip-memory", action="store_true", help="skip the original-preset memory probe")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from models.vae import build_vae
    from tagdit.config import VAE_PRESETS, load_config
    from tagdit.formats.checkpoints import count_parameters

    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        psnr, seconds, steps, source = demo_psnr(args.config, Path(tmp))
    print(f"demo VAE ({cfg.vae.model.widths}, {count_parameters(build_vae(cfg.vae.model)) / 1e6:.2f}M params): "
          f"{steps} steps at batch {cfg.vae.train.batch_size}, {cfg.data.resolution} px in {seconds:.0f} s on {source}; "
          f"val PSNR {psnr:.2f} dB")
    print(f"original preset (80/160/320): {count_parameters(build_vae(VAE_PRESETS['original'])):,} parameters")
    if not args.skip_memory:
        print(seed_memory())
    print(f"RESULT vae_psnr ours={psnr:.2f} dB baseline=30 ratio={psnr / 30:.3f}")


if __name__ == "__main__":
    main()
