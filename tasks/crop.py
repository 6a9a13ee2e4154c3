"""Crop stage: every file of `data.source` (a folder, a URL or a manifest) -> a crop chunk row (a crop or a reject).

The Prefect contract only: `CROP` (what the stage's key hashes), `crop_chunk_task` (a few
consecutive hash buckets on the stage's task runner, see `tagdit.orchestrate.chunks`: it gets the
source manifest's path and its bucket numbers, never a list of files; `crop.unit_files` files at most), `crop_stage` (lists the source once; when the
listing's fingerprint is not the stamp's, sorts it into the source manifest, runs the buckets whose
chunk is missing, stamps the outputs) and `crop_task`. The listing and the buckets are
`tagdit.data.sources`, the cropping `tagdit.data.crop`, the chunk files `tagdit.formats.chunks`. A chunk is named by its bucket and a digest of its files'
stamps, so a killed run resumes, and an added or changed file re-crops only its bucket (and in it,
only itself: the other rows are copied from the bucket's previous chunk).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prefect import get_run_logger, task

from tagdit.config import PipelineConfig
from tagdit.data.crop import CropParams, chunk_digest
from tagdit.data.sources import (
    Listing,
    bucket_count,
    crop_bucket,
    keys_of,
    listing_scope,
    source_listing,
)
from tagdit.data.walk import source_base
from tagdit.files import remove_stale_temps
from tagdit.formats.chunks import chunk_bucket, chunk_name, read_crop_chunk
from tagdit.formats.sources import SOURCES, read_buckets, sort_sources, write_buckets
from tagdit.orchestrate.chunks import chunk_runner, offload, pack_units, run_units, unit_task
from tagdit.orchestrate.stage import Stage, StageRecord, stage_cache_key
from tagdit.store_folders import names_in, remove, remove_tree
from tagdit.store_streams import each_read

log = logging.getLogger(__name__)


@unit_task(name="crop-chunk", run_name="crop buckets {first}-{last}")
def crop_chunk_task(base: str | Path, manifest: Path, buckets: list[int], p: CropParams, dsts: list[Path],
                    previous: list[Path | None], first: int, last: int) -> tuple[int, int]:
    """Some consecutive buckets' crop chunks, one after the other (on the local runner's process pool
    when it has one); returns (ok, rejected) summed."""
    done = [offload(crop_bucket, base, manifest, b, p, d, prev) for b, d, prev in zip(buckets, dsts, previous, strict=True)]
    return sum(ok for ok, _ in done), sum(bad for _, bad in done)


def _key_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """The source listing's fingerprint and the bucket count, from this run's one listing."""
    listing = source_listing(cfg)
    return {"source": listing.fingerprint, "buckets": str(bucket_count(cfg, listing))}


CROP = Stage(
    name="crop",
    version=4,  # 2: a row for every file found, sidecars counted apart; 3: one chunk per hash bucket, rows' stamps;
    # 4: sources on URLs and user manifests, the listing streamed (its fingerprint in walk order)
    modules=("tasks.crop", "tagdit.data.crop", "tagdit.data.sources", "tagdit.data.walk", "tagdit.formats.chunks",
             "tagdit.formats.sources", "tagdit.formats.user_manifest", "tagdit.formats.wd_image"),
    sections=("data.resolution", "crop.mode", "crop.min_size", "crop.max_pixels",
              "shards.image_format", "shards.jpeg_quality"),
    out_dir=lambda cfg, up: cfg.dataset_dir / "work" / "crop",
    extra_inputs=_key_inputs,
    reads_store=True,
)


def _previous(out: Path, existing: set[str], dsts: dict[int, Path]) -> dict[int, Path]:
    """Each bucket's chunk of an earlier run (its rows of unchanged files are copied), if any, from one
    listing of the folder (`existing`), not one per bucket."""
    earlier: dict[int, Path] = {}
    for name in sorted(existing):
        b = chunk_bucket(name)
        if b in dsts and name != dsts[b].name:
            earlier.setdefault(b, out / name)
    return earlier


def crop_stage(cfg: PipelineConfig, force: bool = False) -> StageRecord:
    """Run (or resume) the crop stage; returns its record."""
    with listing_scope():  # the key, the stamp check and the plan share one walk of the source tree
        return _crop_stage(cfg, force)


def _plan(cfg: PipelineConfig, listing: Listing, n: int, out: Path) -> tuple[dict[int, Path], dict[int, int]]:
    """Sort the listing into the source manifest by bucket; (each bucket's chunk path, its file count)."""
    p, code = CropParams.from_config(cfg), CROP.code_key()
    sizes, digests = sort_sources(listing.path, cfg.dataset_dir / SOURCES, n, listing.found, keys_of,
                                  lambda stamps: chunk_digest(stamps, p, code))
    return {b: out / chunk_name(b, d) for b, d in digests.items()}, {b: int(sizes[b]) for b in digests}


def _crop_stage(cfg: PipelineConfig, force: bool) -> StageRecord:
    source = cfg.data.source
    listing = source_listing(cfg)  # refuses a missing folder or manifest, an unusable store
    n = bucket_count(cfg, listing)
    if read_buckets(cfg.dataset_dir) != n:
        write_buckets(cfg.dataset_dir, n)  # a growing dataset keeps the count chosen on its first prepare
    if not force and (rec := CROP.valid_record(cfg, {})):
        return rec
    out = CROP.out_dir(cfg, {})
    dsts, sizes = _plan(cfg, listing, n, out)  # refuses a manifest naming a file twice, before any work
    if force:
        remove_tree(out)  # (and the store's objects of a URL dataset: units are found by name there too)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    existing = names_in(out, "chunk-*.parquet")  # here, and in the store of a URL dataset (not pulled)
    todo = [b for b, d in dsts.items() if d.name not in existing]
    log.info("crop: %d files (+ %d sidecars) in %d buckets (%d with files) under %s; %d buckets to do",
             listing.found, listing.sidecars, n, len(dsts), source, len(todo))
    if todo:
        workers = min(cfg.crop.workers or os.cpu_count() or 1, len(todo))
        units, previous = pack_units(todo, cfg.crop.unit_files, 4 * workers, sizes), _previous(out, existing, dsts)
        params = [{"base": source_base(source), "manifest": cfg.dataset_dir / SOURCES, "buckets": unit,
                   "p": CropParams.from_config(cfg), "dsts": [dsts[b] for b in unit],
                   "previous": [previous.get(b) for b in unit], "first": unit[0], "last": unit[-1]}
                  for unit in units]
        log.info("crop: the %d buckets to do in %d task runs", len(todo), len(units))
        with chunk_runner(cfg.prefect, threads=workers, processes=workers) as runner:
            run_units(runner, crop_chunk_task, params, "crop", [sum(sizes[b] for b in u) for u in units], "img")
    for stale in existing - {d.name for d in dsts.values()}:
        remove(out / stale)
    found, chunks = listing.found, list(dsts.values())
    ok = sum(each_read(lambda d: sum(read_crop_chunk(d, ["ok"]).column("ok").to_pylist()), chunks))
    info = {"found": found, "sidecars": listing.sidecars, "ok": ok, "rejected": found - ok, "buckets": n,
            "chunks": [d.name for d in chunks], "source": str(source)}
    log.info("crop: %d found = %d cropped + %d rejected (and %d sidecars)", found, ok, found - ok, listing.sidecars)
    return CROP.write_stamp(cfg, {}, chunks, info)


@task(name="crop", cache_key_fn=stage_cache_key(CROP), persist_result=True)
def crop_task(cfg: PipelineConfig, force: bool = False) -> StageRecord:
    """Prefect task: square crops of every image under data.source."""
    rec = crop_stage(cfg, force=force)
    get_run_logger().info("crop: %(found)d files found = %(ok)d cropped + %(rejected)d rejected "
                          "(and %(sidecars)d sidecars)", {"sidecars": 0, **rec.info})
    return rec
