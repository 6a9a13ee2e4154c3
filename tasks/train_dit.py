"""Stage train_dit: latent shards + tag vocabulary -> DiT checkpoints (raw + EMA) in `<run>/dit/`.

Streams the encode stage's latent shards (one posterior sample per step, a random flip when the
flipped posterior is stored, times the scale factor from stats.json), tokenises the tags with
conditioning augmentation, and trains ε-prediction with `tagdit.training.fit`. With
`dit.train.nproc > 1` the task launches itself under torchrun (DDP); otherwise it trains in-process.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import random
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

from prefect import task

from tagdit.config import DiTConfig, PipelineConfig
from tagdit.files import write_json_atomic
from tagdit.stage import Stage, StageRecord, stage_cache_key
from tagdit.vocab import Vocab, augment_tags

log = logging.getLogger(__name__)

STAGE = Stage(
    name="train_dit",
    modules=("tasks.train_dit", "models.dit", "models.diffusion", "tagdit.vocab", "tagdit.training"),
    sections=("dit",),
    out_dir=lambda cfg, up: cfg.run_dir / "dit",
)

# Settings that may change between runs without invalidating the checkpoints (resume continues).
RESUMABLE = ("steps", "checkpoint_every", "log_every", "val_every", "device", "nproc", "compile")


def shard_urls(latents_dir: Path, split: str) -> list[str]:
    from tasks.encode import latent_shard_paths

    return [str(p) for p in latent_shard_paths(latents_dir, split)]


_NPY_HEADERS: dict[bytes, tuple[Any, tuple[int, ...]]] = {}  # .npy header bytes -> (dtype, shape)


def read_npy(raw: bytes):
    """`.npy` bytes -> array; each distinct header is parsed once (np.load's header parsing dominates)."""
    import numpy as np

    size = 10 + int.from_bytes(raw[8:10], "little") if raw[6] == 1 else 12 + int.from_bytes(raw[8:12], "little")
    head = raw[:size]
    if head not in _NPY_HEADERS:
        f = io.BytesIO(raw)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return np.load(io.BytesIO(raw))
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran or dtype.hasobject or len(_NPY_HEADERS) > 64:
            return np.load(io.BytesIO(raw))
        _NPY_HEADERS[head] = (dtype, shape)
    dtype, shape = _NPY_HEADERS[head]
    return np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=size).reshape(shape).copy()


def decode_latent(raw: dict[str, Any], *, vocab: Vocab, dit: DiTConfig, augment: bool = True) -> dict[str, Any]:
    """Raw sample -> {"mean", "logvar" (z, h, w) fp16, "tags" (max_tags+1,) long}; flip and tags seeded.

    The posterior sample z = mean + exp(logvar / 2) · noise is drawn on the device in the loss.
    """
    import torch

    rng = random.Random(raw.get("__seed__", 0))
    prefix = "flip_" if augment and "flip_mean.npy" in raw and rng.random() < 0.5 else ""
    tags = json.loads(raw["json"])["tags"]
    if augment:
        tags = augment_tags(tags, rng, caption_drop=dit.caption_drop, tag_drop=dit.tag_drop,
                            shuffle=dit.shuffle_tags, max_tags=dit.model.max_tags)
    return {
        "mean": torch.from_numpy(read_npy(raw[prefix + "mean.npy"])),
        "logvar": torch.from_numpy(read_npy(raw[prefix + "logvar.npy"])),
        "tags": torch.tensor(vocab.encode(tags, dit.model.max_tags), dtype=torch.long),
    }


def posterior_sample(batch: dict[str, Any], scale_factor: float):
    """Scaled latent z = scale · (mean + exp(logvar / 2) · noise), fp32, (B, z, h, w)."""
    import torch

    mean, logvar = batch["mean"].float(), batch["logvar"].float()
    return scale_factor * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))


def dit_loss(model, batch: dict[str, Any], step: int, *, alpha_bar, scale_factor: float,
             min_snr_gamma: float | None = None):
    """L_simple (or Min-SNR-γ weighted) on one batch: t ~ U{0..T-1}, ε ~ N(0, I), x_t = q_sample(z, t, ε)."""
    import torch

    from models.diffusion import eps_loss, min_snr_weight, q_sample

    z = posterior_sample(batch, scale_factor)  # (B, C, H, W)
    t = torch.randint(0, len(alpha_bar), (z.shape[0],), device=z.device)
    eps = torch.randn_like(z)
    weight = None if min_snr_gamma is None else min_snr_weight(t, alpha_bar, min_snr_gamma)
    return eps_loss(model(q_sample(z, t, eps, alpha_bar), t, batch["tags"]), eps, weight), {}


def make_val_fn(latents_dir: Path, vocab: Vocab, cfg: PipelineConfig, alpha_bar, scale_factor: float, device):
    """Validation loss on fixed (latent, t, noise) triples from the val shards (posterior means)."""
    import torch
    from webdataset.tariterators import tarfile_samples

    from models.diffusion import eps_loss, q_sample

    urls = shard_urls(latents_dir, "val")
    n = cfg.dit.val_samples
    raws = []
    for raw in tarfile_samples({"url": u} for u in urls):
        raws.append(raw)
        if len(raws) == n:
            break
    if not raws:
        log.warning("no validation latents in %s: validation loss is off", latents_dir)
        return None
    examples = [decode_latent(r, vocab=vocab, dit=cfg.dit, augment=False) for r in raws]
    z = scale_factor * torch.stack([e["mean"] for e in examples]).float()  # (N, C, H, W)
    tags = torch.stack([e["tags"] for e in examples])  # (N, L)
    g = torch.Generator().manual_seed(cfg.dit.train.seed)
    T = len(alpha_bar)
    t = torch.linspace(0, T - 1, len(examples)).round().long()[torch.randperm(len(examples), generator=g)]
    eps = torch.randn(z.shape, generator=g)
    x_t = q_sample(z, t, eps, alpha_bar.cpu())
    bs = cfg.dit.train.batch_size

    def val_fn(ema_model, step: int, writer) -> dict[str, float]:
        total = 0.0
        for i in range(0, len(x_t), bs):
            sl = slice(i, i + bs)
            pred = ema_model(x_t[sl].to(device), t[sl].to(device), tags[sl].to(device))
            total += eps_loss(pred, eps[sl].to(device)).item() * len(x_t[sl])
        return {"val_loss": total / len(x_t)}

    return val_fn


def train_dit(cfg: PipelineConfig, latents_dir: Path, vocab_path: Path, out_dir: Path):
    """Train in this process: alone, or as one rank under torchrun. Returns fit's TrainResult."""
    import torch

    from models.diffusion import make_alpha_bar
    from models.dit import DiT
    from tagdit.training import EpochStream, count_parameters, fit, init_distributed, select_device

    rank, world, _ = init_distributed()
    tc = cfg.dit.train
    if tc.batch_size % world:
        raise ValueError(f"dit.train.batch_size {tc.batch_size} is not divisible by {world} processes")
    device = select_device(tc.device)
    stats = json.loads((Path(latents_dir) / "stats.json").read_text())
    scale = float(stats["scale_factor"])
    z_ch, h, w = stats["latent_shape"]
    if h != w:
        raise ValueError(f"DiT needs square latents, got {h}x{w}")
    vocab = Vocab.load(vocab_path)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = DiT(cfg.dit.model, vocab_size=len(vocab), latent_size=h, in_channels=z_ch)
    if rank == 0:
        log.info("DiT: %.2fM parameters, vocab %d, latents %s", count_parameters(model) / 1e6, len(vocab), stats["latent_shape"])
    alpha_bar = make_alpha_bar(cfg.dit.schedule, cfg.dit.timesteps).to(device)
    stream = EpochStream(
        shard_urls(latents_dir, "train"),
        partial(decode_latent, vocab=vocab, dit=cfg.dit),
        batch_size=tc.batch_size // world,
        seed=tc.seed,
        shuffle_buffer=tc.shuffle_buffer,
        rank=rank,
        world_size=world,
    )
    val_fn = make_val_fn(latents_dir, vocab, cfg, alpha_bar, scale, device)  # every rank: fit syncs around it
    return fit(
        model=model,
        loss_fn=partial(dit_loss, alpha_bar=alpha_bar, scale_factor=scale, min_snr_gamma=cfg.dit.min_snr_gamma),
        stream=stream,
        cfg=tc,
        out_dir=out_dir,
        model_config=model.config_dict(),
        device=device,
        val_fn=val_fn,
        desc="train_dit",
    )


def _identity(cfg: PipelineConfig, upstream: dict[str, StageRecord]) -> dict[str, Any]:
    """What existing checkpoints must share with this run to be resumed."""
    dit = cfg.dit.model_dump(mode="json")
    dit["train"] = {k: v for k, v in dit["train"].items() if k not in RESUMABLE}
    return {"dit": dit, "upstream": {k: v.fingerprint for k, v in sorted(upstream.items())}}


def _prepare_out_dir(out_dir: Path, identity: dict[str, Any], force: bool) -> None:
    """Keep resumable checkpoints; move a run of another configuration aside (never delete it silently)."""
    marker = out_dir / "identity.json"
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    elif out_dir.exists() and marker.is_file() and json.loads(marker.read_text()) != identity:
        aside = out_dir.with_name(f"{out_dir.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("%s holds a DiT run of another configuration; moved it to %s", out_dir, aside)
        out_dir.rename(aside)
    write_json_atomic(marker, identity)


def run_training(cfg: PipelineConfig, latents_dir: Path, vocab_path: Path, out_dir: Path) -> None:
    """In-process training, or torchrun DDP over `dit.train.nproc` processes."""
    from tagdit.training import launch_torchrun

    nproc = cfg.dit.train.nproc
    if nproc <= 1:
        train_dit(cfg, latents_dir, vocab_path, out_dir)
        return
    cfg_path = out_dir / "config.json"
    write_json_atomic(cfg_path, cfg.model_dump(mode="json"))
    launch_torchrun("tasks.train_dit", ["--config-json", str(cfg_path), "--latents", str(latents_dir),
                                        "--vocab", str(vocab_path), "--out", str(out_dir)], nproc)


def train_dit_stage(cfg: PipelineConfig, latents: StageRecord, shards: StageRecord, force: bool = False) -> StageRecord:
    """The stage: cached record, or train (resuming) and stamp the final checkpoint."""
    from tagdit.training import Checkpoints

    upstream = {"latents": latents, "shards": shards}
    if not force and (rec := STAGE.valid_record(cfg, upstream)):
        return rec
    out_dir = STAGE.out_dir(cfg, upstream)
    _prepare_out_dir(out_dir, _identity(cfg, upstream), force)
    latents_dir, vocab_path = Path(latents.out_dir), cfg.dataset_dir / "vocab.json"
    run_training(cfg, latents_dir, vocab_path, out_dir)
    ckpt = Checkpoints(out_dir).latest()
    if ckpt is None:
        raise RuntimeError(f"DiT training wrote no checkpoint to {out_dir}")
    meta = json.loads((ckpt / "meta.json").read_text())
    from tagdit.training import load_weights

    params = sum(v.numel() for v in load_weights(ckpt / "ema.safetensors")[0].values())
    info = {
        "checkpoint": str(ckpt),
        "step": meta["step"],
        "val_loss": meta.get("metrics", {}).get("val_loss"),
        "loss": meta.get("metrics", {}).get("loss"),
        "params": params,
        "scale_factor": json.loads((latents_dir / "stats.json").read_text())["scale_factor"],
        "vocab": str(vocab_path),
        "latents": str(latents_dir),
    }
    files = [ckpt / "model.safetensors", ckpt / "ema.safetensors", ckpt / "meta.json"]
    return STAGE.write_stamp(cfg, upstream, files, info)


@task(name="train_dit", cache_key_fn=stage_cache_key(STAGE), persist_result=True, tags=["gpu"])
def train_dit_task(cfg: PipelineConfig, latents: StageRecord, shards: StageRecord, force: bool = False) -> StageRecord:
    """Train the tag-conditioned DiT on the encoded latents."""
    return train_dit_stage(cfg, latents, shards, force=force)


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point: one DDP rank."""
    p = argparse.ArgumentParser(description="one rank of DiT training (launched by the train_dit task)")
    p.add_argument("--config-json", required=True)
    p.add_argument("--latents", required=True)
    p.add_argument("--vocab", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = PipelineConfig.model_validate_json(Path(a.config_json).read_text())
    try:
        train_dit(cfg, Path(a.latents), Path(a.vocab), Path(a.out))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
