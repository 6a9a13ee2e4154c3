"""Shard stage: crops + tags -> WebDataset image shards, manifest/rejects/tags parquet and the vocab.

The Prefect contract only: `SHARD` (what the stage's key hashes), `shard_units_task` (a few
consecutive units on the stage's task runner, `tagdit.orchestrate.chunks`, each in a process of the
local runner's pool: memory is one unit's, whatever the dataset's size), `shard_stage` (cleans up,
plans and runs the units whose record is missing, merges the records into the tables, checks the
accounting, stamps the outputs) and `shard_task`. A unit's record (`tagdit.data.shard_plan`) lets a
killed run, or a run after the source grew, keep every unit whose inputs are unchanged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prefect import get_run_logger, task

from tagdit.config import PipelineConfig
from tagdit.data.shard import UnitJob, shard_unit
from tagdit.data.shard_plan import PARTS, finish_units, plan_units, write_tables
from tagdit.data.vocab import SPECIALS
from tagdit.files import remove_stale_temps
from tagdit.formats.dataset_tables import MANIFEST, REJECTS, TAG_TABLE
from tagdit.formats.image_shards import SHARD_INDEX
from tagdit.orchestrate.chunks import chunk_runner, offload, pack_units, run_units, unit_task
from tagdit.orchestrate.stage import Stage, StageRecord, stage_cache_key
from tagdit.store_folders import names_in, remove, remove_tree

log = logging.getLogger(__name__)


@unit_task(name="shard-units", run_name="shard {first} to {last}")
def shard_units_task(jobs: list[UnitJob], first: str, last: str) -> int:
    """Some consecutive units, one after the other (on the local runner's process pool when it has one);
    returns their samples."""
    return sum(offload(shard_unit, job)["count"] for job in jobs)


SHARD = Stage(
    name="shard",
    version=3,  # 2: shards per hash bucket (train) and val group (val), images/shards.json; 3: a record per unit
    modules=("tasks.shard", "tagdit.data.shard", "tagdit.data.shard_plan", "tagdit.formats.chunks", "tagdit.formats.dataset_tables",
             "tagdit.formats.image_shards", "tagdit.data.vocab:Vocab", "tagdit.data.vocab:SPECIALS",
             "tagdit.formats.selected_tags:RATING"),
    sections=("shards.image_format", "shards.samples_per_shard", "shards.val_fraction",
              "shards.min_tag_count", "shards.max_vocab"),
    out_dir=lambda cfg, up: cfg.dataset_dir,  # tars in images/, tables and vocab.json beside it
    reads_store=True,
)
TABLES = (MANIFEST, REJECTS, TAG_TABLE, "vocab.json")


def _clean(out: Path, force: bool) -> None:
    """Forced: no shards, tables or unit records left; always: no temporary files of a killed run."""
    if force:
        remove_tree(out / "images")  # (and the store's objects of a URL dataset: units are found by name there too)
        remove_tree(out / PARTS)
        for name in TABLES:
            remove(out / name)
    for folder in (out, out / "images", out / PARTS):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
    for old in (out / "images").glob(".progress-*.json"):  # the per-key progress files of earlier versions
        old.unlink()


def shard_stage(cfg: PipelineConfig, crop: StageRecord, tag: StageRecord, force: bool = False) -> StageRecord:
    """Run (or resume) the shard stage; returns its record (paths and counts in `info`)."""
    up = {"crop": crop, "tag": tag}
    if not force and (rec := SHARD.valid_record(cfg, up)):
        return rec
    out = SHARD.out_dir(cfg, up)
    images = out / "images"
    _clean(out, force)
    crop_chunks = [Path(crop.out_dir) / c for c in crop.info["chunks"]]
    tag_chunks = [Path(tag.out_dir) / t for t in tag.info["chunks"]]
    plan = plan_units(crop_chunks, tag_chunks, out, cfg.shards, crop.info["buckets"], SHARD.code_key())
    log.info("shard: %d units, %d to write", len(plan.records), len(plan.jobs))
    if plan.jobs:
        _run_jobs(cfg, plan.jobs)
    shards, counts, stats = finish_units(plan, out)
    rejected, vocab = write_tables(crop_chunks, out, stats, cfg.shards)
    shard_paths = [images / n for n in shards["train"] + shards["val"]]
    for stale in names_in(images, "*.tar") - {p.name for p in shard_paths}:  # here and in the store of a URL dataset
        remove(images / stale)
    found, sharded = crop.info["found"], counts["train"] + counts["val"]
    if found != sharded + rejected:
        raise RuntimeError(f"accounting broken: found {found} != sharded {sharded} + rejected {rejected}")
    sidecars = crop.info.get("sidecars", 0)  # `name.txt` tag files: read with their image, not counted as found
    log.info("shard: found %d = sharded %d (train %d, val %d in %d+%d shards) + rejected %d (and %d sidecars); "
             "vocab %d tags", found, sharded, counts["train"], counts["val"], len(shards["train"]),
             len(shards["val"]), rejected, sidecars, len(vocab) - len(SPECIALS))
    info = {"found": found, "sharded": sharded, "rejected": rejected, "sidecars": sidecars,
            "n_train": counts["train"], "n_val": counts["val"], "train_shards": shards["train"], "val_shards": shards["val"],
            "vocab_size": len(vocab), "image_format": cfg.shards.image_format, "images": str(images),
            "manifest": str(out / MANIFEST), "vocab": str(out / "vocab.json")}
    return SHARD.write_stamp(cfg, up, shard_paths + [images / SHARD_INDEX] + [out / name for name in TABLES], info)


def _run_jobs(cfg: PipelineConfig, jobs: list[UnitJob]) -> None:
    """The units' jobs, packed into task runs of about `crop.unit_files` samples, on `crop.workers` processes."""
    workers = min(cfg.crop.workers or os.cpu_count() or 1, len(jobs))
    sizes = {i: j.count for i, j in enumerate(jobs)}
    packs = pack_units(list(sizes), cfg.crop.unit_files, 4 * workers, sizes)
    params = [{"jobs": [jobs[i] for i in pack], "first": jobs[pack[0]].unit.name, "last": jobs[pack[-1]].unit.name}
              for pack in packs]
    with chunk_runner(cfg.prefect, threads=workers, processes=workers) as runner:
        run_units(runner, shard_units_task, params, "shard", [sum(sizes[i] for i in p) for p in packs], "img")


@task(name="shard", cache_key_fn=stage_cache_key(SHARD), persist_result=True)
def shard_task(cfg: PipelineConfig, crop: StageRecord, tag: StageRecord, force: bool = False) -> StageRecord:
    """Prefect task: WebDataset shards + manifest, rejects, tag table and vocabulary."""
    rec = shard_stage(cfg, crop, tag, force=force)
    get_run_logger().info("shard: found %(found)d = sharded %(sharded)d (train %(n_train)d, val %(n_val)d) "
                          "+ rejected %(rejected)d (and %(sidecars)d sidecars); vocabulary %(vocab_size)d ids",
                          {"sidecars": 0, **rec.info})
    return rec
