"""Shard stage: crops + tags -> WebDataset image shards, manifest/rejects/tags parquet and the vocab.

The Prefect contract only: `SHARD` (what the stage's key hashes), `shard_stage` (cleans up, runs
`tagdit.data.shard`, checks the accounting, stamps the outputs) and `shard_task`. The shard index
`images/shards.json` lets a killed run, or a run after the source grew, keep every unit whose
inputs are unchanged.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from prefect import get_run_logger, task

from tagdit.config import PipelineConfig
from tagdit.data.shard import write_shards, write_tables
from tagdit.data.vocab import SPECIALS
from tagdit.files import remove_stale_temps
from tagdit.formats.dataset_tables import MANIFEST, REJECTS, TAG_TABLE
from tagdit.formats.image_shards import SHARD_INDEX
from tagdit.orchestrate.stage import Stage, StageRecord, stage_cache_key

log = logging.getLogger(__name__)

SHARD = Stage(
    name="shard",
    version=2,  # 2: shards per hash bucket (train) and val group (val), images/shards.json
    modules=("tasks.shard", "tagdit.data.shard", "tagdit.formats.chunks", "tagdit.formats.dataset_tables",
             "tagdit.formats.image_shards", "tagdit.data.vocab:Vocab", "tagdit.data.vocab:SPECIALS",
             "tagdit.formats.selected_tags:RATING"),
    sections=("shards.image_format", "shards.samples_per_shard", "shards.val_fraction",
              "shards.min_tag_count", "shards.max_vocab"),
    out_dir=lambda cfg, up: cfg.dataset_dir,  # tars in images/, tables and vocab.json beside it
)
TABLES = (MANIFEST, REJECTS, TAG_TABLE, "vocab.json")


def shard_stage(cfg: PipelineConfig, crop: StageRecord, tag: StageRecord, force: bool = False) -> StageRecord:
    """Run (or resume) the shard stage; returns its record (paths and counts in `info`)."""
    up = {"crop": crop, "tag": tag}
    if not force and (rec := SHARD.valid_record(cfg, up)):
        return rec
    out = SHARD.out_dir(cfg, up)
    images = out / "images"
    if force:
        shutil.rmtree(images, ignore_errors=True)
        for name in TABLES:
            (out / name).unlink(missing_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    remove_stale_temps(images)
    for old in images.glob(".progress-*.json"):  # the per-key progress files of earlier versions
        old.unlink()
    crop_chunks = [Path(crop.out_dir) / c for c in crop.info["chunks"]]
    tag_chunks = [Path(tag.out_dir) / t for t in tag.info["chunks"]]
    shards, counts, stats = write_shards(crop_chunks, tag_chunks, out, cfg.shards, crop.info["buckets"],
                                         SHARD.code_key())
    rejected, vocab = write_tables(crop_chunks, out, stats, cfg.shards)
    shard_paths = [images / n for n in shards["train"] + shards["val"]]
    for stale in set(images.glob("*.tar")) - set(shard_paths):
        stale.unlink()
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


@task(name="shard", cache_key_fn=stage_cache_key(SHARD), persist_result=True)
def shard_task(cfg: PipelineConfig, crop: StageRecord, tag: StageRecord, force: bool = False) -> StageRecord:
    """Prefect task: WebDataset shards + manifest, rejects, tag table and vocabulary."""
    rec = shard_stage(cfg, crop, tag, force=force)
    get_run_logger().info("shard: found %(found)d = sharded %(sharded)d (train %(n_train)d, val %(n_val)d) "
                          "+ rejected %(rejected)d (and %(sidecars)d sidecars); vocabulary %(vocab_size)d ids",
                          {"sidecars": 0, **rec.info})
    return rec
