"""Stage encode: image shards + VAE -> latent shards `<dataset>/latents-<vae_id>/` + `stats.json`.

Every image shard becomes a latent shard with the same keys: posterior `mean.npy` / `logvar.npy`
(float16, (z, h, w)), `flip_mean.npy` / `flip_logvar.npy` for the mirrored image when
`latents.flip`, and the image's `json`. Each missing shard is an `encode_shard_task` on the stage's
task runner (`tagdit.orchestrate.chunks`), with the VAE loaded once per worker process; its images are decoded
in a thread pool ahead of batched encoding, and it is written atomically, so a killed run resumes
at the first missing shard. `stats.json` holds the latent scale factor = 1 / std of posterior
samples over the whole train split (Chan et al.'s parallel variance in float64, fixed seed) — the
only place it is stored.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from tagdit.config import PipelineConfig
from tagdit.files import remove_stale_temps, sha256_file
from tagdit.formats.image_shards import decode_image, image_bytes, image_shards, iter_image_samples
from tagdit.formats.latent_shards import (
    STATS_FILE,
    LatentShardWriter,
    LatentStats,
    iter_latent_samples,
    latent_shard_paths,
    read_posterior,
)
from tagdit.orchestrate.chunks import chunk_runner, run_units, unit_task
from tagdit.orchestrate.markers import marker_matches, write_marker
from tagdit.orchestrate.stage import Stage, StageRecord, code_version, stage_cache_key

log = logging.getLogger(__name__)

ENCODE = Stage(
    name="encode",
    modules=("tasks.encode", "tagdit.formats.image_shards", "tagdit.formats.latent_shards", "tagdit.formats.checkpoints",
             "tagdit.formats.trained_models:load_vae", "tagdit.devices", "models.vae", "models.config"),
    sections=("latents", "data.resolution"),
    out_dir=lambda cfg, up: cfg.dataset_dir / f"latents-{up['vae'].info['vae_id']}",
)
STATS_SEED = 0  # seed of the posterior samples behind the scale factor
STATS_CHUNK = 256  # latents per variance update


def image_batches(src: Path, resolution: int, batch_size: int, pool, ahead: int = 2) -> Iterator[tuple[list[dict], Any]]:
    """(raw samples, images (B, 3, R, R)) in shard order; `pool` decodes `ahead` batches early."""
    import torch

    def groups() -> Iterator[list[dict]]:
        group: list[dict] = []
        for raw in iter_image_samples(src):
            group.append(raw)
            if len(group) == batch_size:
                yield group
                group = []
        if group:
            yield group

    pending: deque = deque()
    for group in groups():
        pending.append((group, [pool.submit(decode_image, image_bytes(r), resolution) for r in group]))
        if len(pending) > ahead:
            g, futures = pending.popleft()
            yield g, torch.stack([f.result() for f in futures])
    while pending:
        g, futures = pending.popleft()
        yield g, torch.stack([f.result() for f in futures])


def encode_shard(model, src: Path, dst: Path, *, resolution: int, flip: bool, batch_size: int, device, pool) -> int:
    """Encode one image shard into `dst` (written atomically); returns the number of samples."""
    import numpy as np
    import torch

    with LatentShardWriter(dst) as w, torch.inference_mode():
        for raws, x in image_batches(src, resolution, batch_size, pool):
            x = x.to(device)  # (B, 3, R, R)
            if flip:
                x = torch.cat([x, x.flip(-1)])  # (2B, 3, R, R): one encode for both
            mean, logvar = model.encode(x)  # (B or 2B, z, h, w); cache-sized chunks on a CPU
            mean = mean.float().cpu().numpy().astype(np.float16)
            logvar = logvar.float().cpu().numpy().astype(np.float16)
            for i, raw in enumerate(raws):
                j = len(raws) + i  # the mirrored image's row when flipping
                flipped = (mean[j], logvar[j]) if flip else ()
                w.write(raw["__key__"], raw["json"], mean[i], logvar[i], *flipped)
    return w.count


class RunningMoments:
    """Streaming mean and variance in float64 (Chan, Golub & LeVeque 1979 pairwise update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x) -> None:
        """Merge a batch of values (any shape) into the running moments."""
        x = x.double().flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float((x - mean_b).pow(2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5


def latent_stats(shards: Iterable[Path], seed: int = STATS_SEED) -> dict[str, Any]:
    """Scale factor = 1 / std of one posterior sample z = mean + exp(logvar / 2)·eps per image."""
    import torch

    from models.vae import AutoencoderKL

    moments, images, shape = RunningMoments(), 0, None
    for index, path in enumerate(shards):
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)  # per shard: independent of resume
        means, logvars = [], []
        for raw in itertools.chain(iter_latent_samples([path]), [None]):  # None: flush
            if raw is not None:
                m, lv = read_posterior(raw)
                means.append(torch.from_numpy(m).float())
                logvars.append(torch.from_numpy(lv).float())
            if means and (raw is None or len(means) == STATS_CHUNK):
                mean, logvar = torch.stack(means), torch.stack(logvars)  # (N, z, h, w)
                moments.update(AutoencoderKL.sample(mean, logvar, generator=g))
                images += len(means)
                shape = list(mean.shape[1:])
                means, logvars = [], []
    if moments.count == 0:
        raise ValueError("no training latents to measure the scale factor on")
    return {"scale_factor": 1.0 / moments.std, "mean": moments.mean, "std": moments.std,
            "count": images, "values": moments.count, "latent_shape": shape}


def _identity(cfg: PipelineConfig, weights_sha: str) -> dict[str, Any]:
    """What existing latent shards must share with this run to be kept."""
    return {"weights_sha256": weights_sha, "flip": cfg.latents.flip, "resolution": cfg.data.resolution,
            "code": code_version(*ENCODE.modules)}


def _prepare_out_dir(out_dir: Path, identity: dict[str, Any], force: bool) -> None:
    """Drop latents made by other settings (they are derived data); keep matching complete shards."""
    marker = out_dir / "encode.json"
    if out_dir.exists() and (force or not marker_matches(marker, identity)):
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    write_marker(marker, identity)


@dataclass(frozen=True)
class EncodeParams:
    """What an encode worker needs besides the shard: the VAE, where it runs, the settings."""

    vae_ckpt: Path
    use_ema: bool
    weights_sha: str  # part of the loaded-model key: a rewritten checkpoint is loaded again
    device: str
    resolution: int
    flip: bool
    batch_size: int


_VAES: dict[tuple, tuple[Any, Any]] = {}  # this process's loaded VAE and its device


def loaded_vae(p: EncodeParams) -> tuple[Any, Any]:
    """(VAE on its device, the device), loaded once per worker process."""
    from tagdit.devices import configure_backends, select_device
    from tagdit.formats.trained_models import load_vae

    key = (str(p.vae_ckpt), p.use_ema, p.weights_sha, p.device)
    if key not in _VAES:
        _VAES.clear()  # one model at a time
        device = select_device(p.device)
        configure_backends(device)
        model, _ = load_vae(p.vae_ckpt, ema=p.use_ema)
        _VAES[key] = (model.to(device), device)
    return _VAES[key]


@unit_task(name="encode-shard", run_name="encode {src.name}")
def encode_shard_task(src: Path, dst: Path, p: EncodeParams) -> int:
    """One latent shard, with this worker process's loaded VAE; returns the number of samples."""
    from concurrent.futures import ThreadPoolExecutor

    model, device = loaded_vae(p)
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        n = encode_shard(model, src, dst, resolution=p.resolution, flip=p.flip, batch_size=p.batch_size,
                         device=device, pool=pool)
    log.info("encode: %s -> %d latents", src.name, n)
    return n


def encode_latents(cfg: PipelineConfig, dataset_dir: Path, vae_ckpt: Path, out_dir: Path,
                   vae_id: str, force: bool = False) -> LatentStats:
    """Encode every image shard missing from `out_dir`, then write `stats.json`; returns the stats."""
    from tagdit.formats.checkpoints import resolve_checkpoint

    lc = cfg.latents
    ckpt = resolve_checkpoint(vae_ckpt)
    weights_sha = sha256_file(ckpt / ("ema.safetensors" if lc.use_ema else "model.safetensors"))
    _prepare_out_dir(out_dir, _identity(cfg, weights_sha), force)
    todo = [(split, p) for split in ("train", "val") for p in image_shards(dataset_dir, split)]
    if not todo:
        raise FileNotFoundError(f"no image shards under {dataset_dir}/images: run prepare-data first")
    wanted = {p.name for _, p in todo}
    for stale in set(out_dir.glob("*.tar")) - {out_dir / n for n in wanted}:
        stale.unlink()
    missing = [src for _, src in todo if not (out_dir / src.name).exists()]
    log.info("encode: %d of %d shards to encode into %s (%d already complete)",
             len(missing), len(todo), out_dir, len(todo) - len(missing))
    p = EncodeParams(ckpt, lc.use_ema, weights_sha, cfg.vae.train.device, cfg.data.resolution, lc.flip,
                     lc.batch_size)
    try:
        with chunk_runner(cfg.prefect) as runner:  # locally one shard at a time: the model uses the device
            run_units(runner, encode_shard_task, [{"src": s, "dst": out_dir / s.name, "p": p} for s in missing],
                      "encode", unit_name="shard")
    finally:
        _VAES.clear()  # the local runner's model; a Dask worker keeps its own
    stats = LatentStats(**latent_stats(latent_shard_paths(out_dir, "train")), vae_checkpoint_sha256=weights_sha,
                        vae_id=vae_id, vae_checkpoint=str(ckpt), weights="ema" if lc.use_ema else "raw",
                        seed=STATS_SEED, samples="one posterior sample per train image (unflipped)")
    stats.save(out_dir)
    log.info("encode: scale factor %.5f (std %.5f over %d train images)", stats.scale_factor, stats.std, stats.count)
    return stats


def encode_stage(cfg: PipelineConfig, shards: StageRecord, vae: StageRecord, force: bool = False) -> StageRecord:
    """The stage: cached record, or encode the missing shards and stamp the outputs."""
    upstream = {"shards": shards, "vae": vae}
    if not force and (rec := ENCODE.valid_record(cfg, upstream)):
        return rec
    out_dir = ENCODE.out_dir(cfg, upstream)
    stats = encode_latents(cfg, Path(shards.out_dir), Path(vae.info["checkpoint"]), out_dir,
                           vae.info["vae_id"], force=force)
    train, val = latent_shard_paths(out_dir, "train"), latent_shard_paths(out_dir, "val")
    info = {"latents": str(out_dir), "stats": str(out_dir / STATS_FILE), "vae_id": vae.info["vae_id"],
            "train_shards": [p.name for p in train], "val_shards": [p.name for p in val],
            **stats.model_dump(include={"scale_factor", "mean", "std", "count", "latent_shape"})}
    return ENCODE.write_stamp(cfg, upstream, [*train, *val, out_dir / STATS_FILE], info)


@task(name="encode", cache_key_fn=stage_cache_key(ENCODE), persist_result=True, tags=["gpu"])
def encode_task(cfg: PipelineConfig, shards: StageRecord, vae: StageRecord, force: bool = False) -> StageRecord:
    """Encode the image shards into latent shards and measure the latent scale factor."""
    return encode_stage(cfg, shards, vae, force=force)
