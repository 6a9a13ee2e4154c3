"""Stage train_vae: image shards -> KL-VAE checkpoints (raw + EMA) in `<run>/vae/`.

Loss `w_l1·L1 + w_perc·VGG19 perceptual + w_kl·KL` (DESIGN §5, standard KL averaged over the
batch), trained with `tagdit.training.fit` on a resumable `EpochStream` of the image shards with a
random horizontal flip seeded per sample. Validation: PSNR of the EMA model's reconstructions (from
the posterior mean) on the val shards, plus a few reconstructions in TensorBoard. With
`vae.train.nproc > 1` the task launches itself under torchrun (DDP); otherwise it trains in-process.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

from prefect import task

from tagdit.config import PipelineConfig, VAEConfig
from tagdit.files import sha256_file, write_json_atomic
from tagdit.stage import Stage, StageRecord, stage_cache_key

log = logging.getLogger(__name__)

STAGE = Stage(
    name="train_vae",
    modules=("tasks.train_vae", "models.vae", "models.perceptual", "tagdit.training"),
    sections=("vae", "data.resolution"),
    out_dir=lambda cfg, up: cfg.run_dir / "vae",
)

# Settings that may change between runs without invalidating the checkpoints (resume continues).
RESUMABLE = ("steps", "checkpoint_every", "log_every", "val_every", "device", "nproc", "compile")
VAL_LIMIT = 512  # validation images kept in memory (uint8) for PSNR
VAL_SHOW = 8  # reconstructions written to TensorBoard


def _logger():
    """The Prefect run logger inside a flow/task run, else this module's logger."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError outside a run
        return log


def image_shards(dataset_dir: Path, split: str) -> list[Path]:
    """The dataset's image shards of one split, in order."""
    return sorted(Path(dataset_dir).glob(f"images/{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def image_bytes(raw: dict[str, Any]) -> bytes:
    """The encoded image of a raw shard sample (png or jpg)."""
    for ext in ("png", "jpg", "jpeg"):
        if ext in raw:
            return raw[ext]
    raise KeyError(f"sample {raw.get('__key__')!r} has no png/jpg image")


def decode_image(data: bytes, resolution: int, flip: bool = False):
    """Encoded image -> float tensor (3, R, R) in [-1, 1]; resized if the shard differs from R."""
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    a = np.array(img)  # (R, R, 3) uint8, writable
    if flip:
        a = np.ascontiguousarray(a[:, ::-1])
    x = torch.from_numpy(a).permute(2, 0, 1)  # (3, R, R)
    return x.float() / 127.5 - 1.0


def decode_train(raw: dict[str, Any], resolution: int):
    """Training example: the image with a horizontal flip drawn from the sample's own seed."""
    flip = random.Random(raw.get("__seed__", 0)).random() < 0.5
    return decode_image(image_bytes(raw), resolution, flip)


def vae_loss(model, x, step: int, *, vae: VAEConfig, perceptual=None):
    """`w_l1·L1 + w_perc·perceptual + w_kl·KL` on one batch x (B, 3, H, W) in [-1, 1]."""

    from models.vae import AutoencoderKL

    recon, mean, logvar = model(x)  # (B, 3, H, W), (B, z, h, w) x2
    recon = recon.float()
    l1 = (recon - x).abs().mean()
    kl = AutoencoderKL.kl(mean.float(), logvar.float()).mean()
    loss = vae.w_l1 * l1 + vae.w_kl * kl
    logs = {"l1": l1.detach(), "kl": kl.detach()}
    if perceptual is not None:
        perc = perceptual(recon, x)
        loss = loss + vae.w_perc * perc
        logs["perceptual"] = perc.detach()
    return loss, logs


def psnr(x, y):
    """Per-image PSNR in dB of images in [-1, 1] (peak = full range): (B,)."""
    import torch

    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)  # (B,) on the [0, 1] scale
    return -10 * torch.log10(mse.clamp_min(1e-10))


def load_val_images(dataset_dir: Path, resolution: int, limit: int = VAL_LIMIT):
    """Up to `limit` validation images as a uint8 tensor (N, 3, R, R) (empty if there are none)."""
    import torch
    from webdataset.tariterators import tarfile_samples

    urls = [str(p) for p in image_shards(dataset_dir, "val")]
    xs = []
    for raw in tarfile_samples({"url": u} for u in urls):
        xs.append(((decode_image(image_bytes(raw), resolution) + 1) * 127.5).round().to(torch.uint8))
        if len(xs) == limit:
            break
    return torch.stack(xs) if xs else torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)


def make_val_fn(val_images, batch_size: int, device):
    """val_fn for `fit`: mean PSNR of EMA reconstructions (posterior mean) + a TensorBoard image."""
    import torch

    def val_fn(ema_model, step: int, writer) -> dict[str, float]:
        scores, shown = [], None
        for i in range(0, len(val_images), batch_size):
            x = val_images[i : i + batch_size].to(device).float() / 127.5 - 1.0  # (B, 3, H, W)
            recon, _, _ = ema_model(x, sample=False)
            recon = recon.float().clamp(-1, 1)
            scores.append(psnr(recon, x).cpu())
            if shown is None:
                shown = torch.cat([x[:VAL_SHOW], recon[:VAL_SHOW]]).cpu()  # originals, then reconstructions
        if writer is not None and shown is not None:
            writer.add_images("val/reconstructions", (shown + 1) / 2, step)
        return {"val_psnr": float(torch.cat(scores).mean())}

    return val_fn


def build_perceptual_loss(vae: VAEConfig, device):
    """The VGG19 loss on `device`, or None (logged loudly) when `vae.w_perc == 0`."""
    if vae.w_perc == 0:
        _logger().warning("perceptual loss is OFF (vae.w_perc=0): training with L1 + KL only")
        return None
    from models.perceptual import build_perceptual

    return build_perceptual(vae.vgg_weights).to(device)


def train_vae(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path):
    """Train in this process: alone, or as one rank under torchrun. Returns fit's TrainResult."""
    import torch

    from models.vae import build_vae
    from tagdit.training import EpochStream, count_parameters, fit, init_distributed, select_device

    rank, world, _ = init_distributed()
    tc, res = cfg.vae.train, cfg.data.resolution
    if tc.batch_size % world:
        raise ValueError(f"vae.train.batch_size {tc.batch_size} is not divisible by {world} processes")
    urls = [str(p) for p in image_shards(dataset_dir, "train")]
    if not urls:
        raise FileNotFoundError(f"no training shards under {dataset_dir}/images: run prepare-data first")
    device = select_device(tc.device)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = build_vae(cfg.vae.model)
    if rank == 0:
        _logger().info("VAE: %.2fM parameters, f=%d, z=%d", count_parameters(model) / 1e6,
                       model.downsample_factor, cfg.vae.model.z_channels)
    perceptual = build_perceptual_loss(cfg.vae, device)
    stream = EpochStream(urls, partial(decode_train, resolution=res), batch_size=tc.batch_size // world,
                         seed=tc.seed, shuffle_buffer=tc.shuffle_buffer, rank=rank, world_size=world)
    val_fn = None
    if rank == 0:
        val_images = load_val_images(dataset_dir, res)
        if len(val_images):
            val_fn = make_val_fn(val_images, tc.batch_size, device)
        else:
            _logger().warning("no validation shards in %s: validation PSNR is off", dataset_dir)
    return fit(
        model=model,
        loss_fn=partial(vae_loss, vae=cfg.vae, perceptual=perceptual),
        stream=stream,
        cfg=tc,
        out_dir=out_dir,
        model_config=cfg.vae.model.model_dump(mode="json"),
        device=device,
        val_fn=val_fn,
        desc="train_vae",
    )


def _identity(cfg: PipelineConfig, upstream: dict[str, StageRecord]) -> dict[str, Any]:
    """What existing checkpoints must share with this run to be resumed."""
    vae = cfg.vae.model_dump(mode="json")
    vae["train"] = {k: v for k, v in vae["train"].items() if k not in RESUMABLE}
    return {"vae": vae, "resolution": cfg.data.resolution,
            "upstream": {k: v.fingerprint for k, v in sorted(upstream.items())}}


def _prepare_out_dir(out_dir: Path, identity: dict[str, Any], force: bool) -> None:
    """Keep resumable checkpoints; move a run of another configuration aside (never delete it silently)."""
    marker = out_dir / "identity.json"
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    elif out_dir.exists() and (not marker.is_file() or json.loads(marker.read_text()) != identity):
        if any(out_dir.iterdir()):
            aside = out_dir.with_name(f"{out_dir.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("%s holds a VAE run of another configuration; moved it to %s", out_dir, aside)
            out_dir.rename(aside)
    write_json_atomic(marker, identity)


def run_training(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path) -> None:
    """In-process training, or torchrun DDP over `vae.train.nproc` processes."""
    from tagdit.training import launch_torchrun

    nproc = cfg.vae.train.nproc
    if nproc <= 1:
        train_vae(cfg, dataset_dir, out_dir)
        return
    cfg_path = out_dir / "config.json"
    write_json_atomic(cfg_path, cfg.model_dump(mode="json"))
    launch_torchrun("tasks.train_vae", ["--config-json", str(cfg_path), "--dataset", str(dataset_dir),
                                        "--out", str(out_dir)], nproc)


def checkpoint_info(ckpt: Path) -> dict[str, Any]:
    """Facts about a VAE checkpoint: path, step, EMA weights' sha256 and `vae_id`, PSNR, parameters."""
    from tagdit.training import load_weights

    meta = json.loads((ckpt / "meta.json").read_text())
    ema_sha = sha256_file(ckpt / "ema.safetensors")
    state, _ = load_weights(ckpt / "ema.safetensors")
    return {
        "checkpoint": str(ckpt),
        "step": meta["step"],
        "ema_sha256": ema_sha,
        "vae_id": ema_sha[:12],
        "val_psnr": meta.get("metrics", {}).get("val_psnr"),
        "loss": meta.get("metrics", {}).get("loss"),
        "params": sum(v.numel() for v in state.values()),
    }


def train_vae_stage(cfg: PipelineConfig, shards: StageRecord, force: bool = False) -> StageRecord:
    """The stage: cached record, or train (resuming) and stamp the final checkpoint."""
    from tagdit.training import Checkpoints

    upstream = {"shards": shards}
    if not force and (rec := STAGE.valid_record(cfg, upstream)):
        return rec
    out_dir = STAGE.out_dir(cfg, upstream)
    _prepare_out_dir(out_dir, _identity(cfg, upstream), force)
    run_training(cfg, Path(shards.out_dir), out_dir)
    ckpt = Checkpoints(out_dir).latest()
    if ckpt is None:
        raise RuntimeError(f"VAE training wrote no checkpoint to {out_dir}")
    files = [ckpt / "model.safetensors", ckpt / "ema.safetensors", ckpt / "meta.json"]
    return STAGE.write_stamp(cfg, upstream, files, checkpoint_info(ckpt))


@task(name="train_vae", cache_key_fn=stage_cache_key(STAGE), persist_result=True, tags=["gpu"])
def train_vae_task(cfg: PipelineConfig, shards: StageRecord, force: bool = False) -> StageRecord:
    """Train the KL-VAE on the image shards."""
    return train_vae_stage(cfg, shards, force=force)


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point: one DDP rank."""
    p = argparse.ArgumentParser(description="one rank of VAE training (launched by the train_vae task)")
    p.add_argument("--config-json", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = PipelineConfig.model_validate_json(Path(a.config_json).read_text())
    try:
        train_vae(cfg, Path(a.dataset), Path(a.out))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
