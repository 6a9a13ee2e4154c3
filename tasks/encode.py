"""Stage encode: image shards + VAE -> latent shards `<dataset>/latents-<vae_id>/` + `stats.json`.

The Prefect contract only: `ENCODE` (what the stage's key hashes), `encode_shards_task` (a few
shards, about `crop.unit_files` images, on the stage's task runner, `tagdit.orchestrate.chunks`, each
shard on a worker per device of `prefect.devices`, with the VAE loaded once per worker process),
`encode_latents` (drops latents made by other settings, runs the missing shards, writes
`stats.json`: the only place the latent scale factor is stored), `encode_stage` and `encode_task`.
The encoding and the scale-factor pass are `tagdit.data.encode`. A latent shard is kept only when
its `<name>.source.json` records the sha256 of the image shard now under its name (from the shard
stage's `images/shards.json`): a killed run resumes at the first missing shard, and a changed image
shard is encoded again, even with the same VAE.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import task

from tagdit.config import PipelineConfig
from tagdit.data.encode import (
    STATS_SEED,
    EncodeParams,
    encode_shard_on,
    forget_vaes,
    latent_stats,
)
from tagdit.devices import cuda_device_count
from tagdit.files import remove_stale_temps, sha256_file
from tagdit.formats.image_shards import ShardIndex, shard_sources
from tagdit.formats.latent_shards import STATS_FILE, LatentSource, LatentStats, latent_shard_paths
from tagdit.orchestrate.chunks import chunk_runner, items_per_run, pack_units, run_units, unit_task
from tagdit.orchestrate.device_workers import DeviceRun, local_devices, on_devices
from tagdit.orchestrate.markers import marker_matches, write_marker
from tagdit.orchestrate.stage import Stage, StageRecord, code_version, stage_cache_key
from tagdit.store_folders import names_in, remove, remove_tree
from tagdit.store_streams import sha256_source

log = logging.getLogger(__name__)

ENCODE = Stage(
    name="encode",
    version=2,  # 2: latent shards record the image shard they were made from
    modules=("tasks.encode", "tagdit.data.encode", "tagdit.formats.image_shards", "tagdit.formats.latent_shards",
             "tagdit.formats.checkpoints", "tagdit.formats.trained_models:load_vae", "tagdit.devices", "models.vae",
             "models.config"),
    sections=("latents", "data.resolution"),
    out_dir=lambda cfg, up: cfg.dataset_dir / f"latents-{up['vae'].info['vae_id']}",
    reads_store=True,
    streams=("images/*.tar", "work/*"),  # image shards read from the store, each by its unit; chunks not read
)


def _identity(cfg: PipelineConfig, weights_sha: str) -> dict[str, Any]:
    """What existing latent shards must share with this run to be kept."""
    return {"weights_sha256": weights_sha, "flip": cfg.latents.flip, "resolution": cfg.data.resolution,
            "code": code_version(*ENCODE.modules)}


def _prepare_out_dir(out_dir: Path, identity: dict[str, Any], force: bool) -> None:
    """Drop latents made by other settings (they are derived data); keep matching complete shards."""
    marker = out_dir / "encode.json"
    if out_dir.exists() and (force or not marker_matches(marker, identity)):
        remove_tree(out_dir)  # (and the store's objects of a URL dataset: shards are found by name there too)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    write_marker(marker, identity)


def _name(source: str) -> str:
    """A shard's file name from its local path or URL."""
    return source.rsplit("/", 1)[-1]


def _fresh(dst: Path, image_shard_sha256: str, existing: set[str]) -> bool:
    """Whether the latent shard at `dst` (`existing`: the latent shards here or in the store) was made
    from the image shard with this sha256 (not merely named as it)."""
    record = LatentSource.load(dst)
    return dst.name in existing and record is not None and record.image_shard_sha256 == image_shard_sha256


@unit_task(name="encode-shards", run_name="encode {first} to {last}")
def encode_shards_task(shards: list[tuple[str, Path, str]], p: EncodeParams, first: str, last: str) -> list[DeviceRun]:
    """Some (image shard, latent shard, the image shard's sha256) triples, all queued on the device
    workers at once, each on a free worker's VAE (or this process's); a run's value is the number of samples."""
    runs = on_devices(encode_shard_on, [(src, dst, p, sha) for src, dst, sha in shards])
    for (_, dst, _), run in zip(shards, runs, strict=True):
        log.info("encode: %s -> %d latents on %s", dst.name, run.value, run.device or "the default device")
    return runs


def encode_latents(cfg: PipelineConfig, dataset_dir: Path, vae_ckpt: Path, out_dir: Path,
                   vae_id: str, force: bool = False) -> LatentStats:
    """Encode every image shard missing from `out_dir`, then write `stats.json`; returns the stats."""
    from tagdit.formats.checkpoints import resolve_checkpoint

    lc = cfg.latents
    ckpt = resolve_checkpoint(vae_ckpt)
    weights_sha = sha256_file(ckpt / ("ema.safetensors" if lc.use_ema else "model.safetensors"))
    _prepare_out_dir(out_dir, _identity(cfg, weights_sha), force)
    sources = {_name(src): src for split in ("train", "val") for src in shard_sources(dataset_dir / "images", split)}
    if not sources:
        raise FileNotFoundError(f"no image shards under {dataset_dir}/images: run prepare-data first")
    existing = names_in(out_dir, "*.tar")  # here, and in the store of a URL dataset (not pulled)
    for stale in existing - set(sources):
        remove(out_dir / stale)
        remove(LatentSource.path(out_dir / stale))
    recorded = ShardIndex(dataset_dir / "images").shas()
    shas = {n: recorded.get(n) or sha256_source(src) for n, src in sources.items()}
    missing = [n for n in sources if not _fresh(out_dir / n, shas[n], existing)]
    log.info("encode: %d of %d shards to encode into %s (%d already complete)",
             len(missing), len(sources), out_dir, len(sources) - len(missing))
    p = EncodeParams(ckpt, lc.use_ema, weights_sha, cfg.vae.train.device, cfg.data.resolution, lc.flip,
                     lc.batch_size)
    devices = local_devices(cfg.prefect.devices, cuda_device_count())
    packs = pack_units(list(range(len(missing))), items_per_run(cfg), 4 * len(devices))
    params = [{"shards": [(sources[missing[i]], out_dir / missing[i], shas[missing[i]]) for i in pack], "p": p,
               "first": missing[pack[0]].removesuffix(".tar"), "last": missing[pack[-1]].removesuffix(".tar")}
              for pack in packs]
    try:  # on one device one shard at a time: the model uses the whole device
        if missing:  # no workers started for nothing
            with chunk_runner(cfg.prefect, devices=devices) as runner:
                run_units(runner, encode_shards_task, params, "encode", [len(u) for u in packs], "shard")
    finally:
        forget_vaes()  # the local runner's model; a Dask worker keeps its own
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
