"""Shard stage: crops + tags -> WebDataset tar shards, manifest/rejects/tags parquet and the vocab.

One streaming pass over the crop and tag chunks writes `{train,val}-NNNNNN.tar` with a fixed
mtime (byte-identical for the same inputs). Each finished shard is renamed into place and listed
in a progress file named by the stage key, so a killed run skips the shards already complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from tagdit.config import PipelineConfig
from tagdit.data.vocab import SPECIALS, Vocab
from tagdit.files import atomic_path, remove_stale_temps, sha256_text, write_json_atomic
from tagdit.formats.image_shards import ShardFile, image_sample
from tagdit.formats.selected_tags import RATING
from tagdit.orchestrate.stage import Stage, StageRecord, stage_cache_key

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("sha256", pa.string()), ("orig_size", pa.list_(pa.int32())), ("crop_box", pa.list_(pa.int32())),
    ("tags", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())), ("rating", pa.string()),
])  # fmt: skip


def split_hash(key: str) -> float:
    """Uniform in [0, 1) from the key alone: the split never depends on the other samples."""
    return int(sha256_text(key)[:16], 16) / 2**64


def val_keys(keys: list[str], fraction: float) -> set[str]:
    """Keys with split_hash < fraction; at least one when fraction > 0 and there are two samples."""
    val = {k for k in keys if split_hash(k) < fraction}
    if not val and fraction > 0 and len(keys) >= 2:
        val = {min(keys, key=split_hash)}
    return val


def samples(crop: StageRecord, tag: StageRecord) -> Iterator[dict]:
    """Joined crop + tag rows of every sample, in source-path order, one chunk in memory."""
    for c, t in zip(crop.info["chunks"], tag.info["chunks"], strict=True):
        crops = pq.read_table(Path(crop.out_dir) / c).filter(pc.field("ok")).to_pylist()
        tags = pq.read_table(Path(tag.out_dir) / t).to_pylist()
        for cr, tg in zip(crops, tags, strict=True):
            if cr["key"] != tg["key"]:
                raise ValueError(f"crop chunk {c} and tag chunk {t} disagree at {cr['key']} / {tg['key']}")
            yield {**cr, **tg}


def ok_keys(crop: StageRecord) -> list[str]:
    """Keys of every cropped sample (metadata columns only: no image bytes read)."""
    tables = [pq.read_table(Path(crop.out_dir) / c, columns=["key", "ok"]) for c in crop.info["chunks"]]
    return [k for t in tables for k in t.filter(pc.field("ok")).column("key").to_pylist()]


class TagStats:
    """Per-tag count, train count, score sum and category over the sharded samples."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = {}  # tag -> [category, count, train_count, score_sum]

    def add(self, s: dict, train: bool) -> None:
        for t, score, cat in zip(s["tags"], s["scores"], s["categories"], strict=True):
            r = self.rows.setdefault(t, [cat, 0, 0, 0.0])
            r[1] += 1
            r[2] += train
            r[3] += score

    def table(self) -> pa.Table:
        items = sorted(self.rows.items(), key=lambda kv: (-kv[1][1], kv[0]))
        return pa.table({
            "tag": [t for t, _ in items], "category": pa.array([r[0] for _, r in items], pa.int16()),
            "count": [r[1] for _, r in items], "train_count": [r[2] for _, r in items],
            "mean_score": pa.array([r[3] / r[1] for _, r in items], pa.float32()),
        })  # fmt: skip

    def vocab(self, min_count: int, max_size: int) -> Vocab:
        """Specials + train tags with count >= min_count, most frequent first, rating tags out."""
        keep = [(t, r[2]) for t, r in self.rows.items() if r[2] >= min_count and r[0] != RATING]
        keep.sort(key=lambda x: (-x[1], x[0]))
        return Vocab.from_tags([t for t, _ in keep[: max_size - len(SPECIALS)]])


SHARD = Stage(
    name="shard",
    modules=("tasks.shard", "tagdit.formats.image_shards", "tagdit.data.vocab:Vocab", "tagdit.data.vocab:SPECIALS",
             "tagdit.formats.selected_tags:RATING"),
    sections=("shards.image_format", "shards.samples_per_shard", "shards.val_fraction",
              "shards.min_tag_count", "shards.max_vocab"),
    out_dir=lambda cfg, up: cfg.dataset_dir,  # tars in images/, tables and vocab.json beside it
)
TABLES = ("manifest.parquet", "rejects.parquet", "tags.parquet", "vocab.json")


def _write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def shard_stage(cfg: PipelineConfig, crop: StageRecord, tag: StageRecord, force: bool = False) -> StageRecord:
    """Run (or resume) the shard stage; returns its record (paths and counts in `info`)."""
    up = {"crop": crop, "tag": tag}
    if not force and (rec := SHARD.valid_record(cfg, up)):
        return rec
    out, sc = SHARD.out_dir(cfg, up), cfg.shards
    images = out / "images"
    if force:
        shutil.rmtree(images, ignore_errors=True)
        for name in TABLES:
            (out / name).unlink(missing_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    remove_stale_temps(images)
    progress_path = images / f".progress-{SHARD.key(cfg, up)}.json"
    for old in images.glob(".progress-*.json"):
        if old != progress_path:
            old.unlink()
    done: dict[str, int] = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    done = {n: size for n, size in done.items() if (images / n).exists() and (images / n).stat().st_size == size}
    keys = ok_keys(crop)
    val = val_keys(keys, sc.val_fraction)
    counts, open_shards, stats, shards = {"train": 0, "val": 0}, {}, TagStats(), {"train": [], "val": []}
    rows: list[dict] = []
    from tqdm import tqdm

    with atomic_path(out / "manifest.parquet") as mtmp, pq.ParquetWriter(mtmp, MANIFEST_SCHEMA) as manifest:
        for s in tqdm(samples(crop, tag), total=len(keys), desc="shard", unit="img", disable=len(keys) < 1000):
            split = "val" if s["key"] in val else "train"
            name = f"{split}-{counts[split] // sc.samples_per_shard:06d}.tar"
            counts[split] += 1
            stats.add(s, split == "train")
            rows.append({f: s.get(f) for f in MANIFEST_SCHEMA.names} | {"split": split, "shard": name})
            if len(rows) == 1024:  # one parquet row group per 1024 samples, memory stays flat
                manifest.write_table(pa.Table.from_pylist(rows, MANIFEST_SCHEMA))
                rows.clear()
            if not shards[split] or shards[split][-1] != name:
                shards[split].append(name)
            if name in done:
                continue
            if split not in open_shards:
                open_shards[split] = ShardFile(images / name)
            open_shards[split].write(image_sample(s["key"], sc.image_format, s["image"], s))
            if counts[split] % sc.samples_per_shard == 0:
                _finish(open_shards.pop(split), done, progress_path)
        manifest.write_table(pa.Table.from_pylist(rows, MANIFEST_SCHEMA))
        for f in list(open_shards.values()):
            _finish(f, done, progress_path)
    return _finalise(cfg, up, out, shards, stats, counts, progress_path)


def _finish(f: ShardFile, done: dict[str, int], progress_path: Path) -> None:
    f.close()
    done[f.path.name] = f.path.stat().st_size
    write_json_atomic(progress_path, done)


def _finalise(cfg, up, out, shards, stats, counts, progress_path) -> StageRecord:
    """Tables, vocab, stale-shard cleanup, accounting, stamp."""
    crop = up["crop"]
    rejects = [r for c in crop.info["chunks"] for r in pq.read_table(
        Path(crop.out_dir) / c, columns=["source", "ok", "reason"]).to_pylist() if not r["ok"]]
    _write_parquet(out / "rejects.parquet", pa.table({
        "path": [r["source"] for r in rejects], "stage": ["crop"] * len(rejects),
        "reason": [r["reason"] for r in rejects]}))  # fmt: skip
    _write_parquet(out / "tags.parquet", stats.table())
    vocab = stats.vocab(cfg.shards.min_tag_count, cfg.shards.max_vocab)
    vocab.save(out / "vocab.json")
    images = out / "images"
    shard_paths = [images / n for n in shards["train"] + shards["val"]]
    for stale in set(images.glob("*.tar")) - set(shard_paths):
        stale.unlink()
    progress_path.unlink(missing_ok=True)
    found, sharded = crop.info["found"], counts["train"] + counts["val"]
    if found != sharded + len(rejects):
        raise RuntimeError(f"accounting broken: found {found} != sharded {sharded} + rejected {len(rejects)}")
    sidecars = crop.info.get("sidecars", 0)  # `name.txt` tag files: read with their image, not counted as found
    log.info("shard: found %d = sharded %d (train %d, val %d in %d+%d shards) + rejected %d (and %d sidecars); "
             "vocab %d tags", found, sharded, counts["train"], counts["val"], len(shards["train"]),
             len(shards["val"]), len(rejects), sidecars, len(vocab) - len(SPECIALS))
    info = {"found": found, "sharded": sharded, "rejected": len(rejects), "sidecars": sidecars,
            "n_train": counts["train"], "n_val": counts["val"], "train_shards": shards["train"], "val_shards": shards["val"],
            "vocab_size": len(vocab), "image_format": cfg.shards.image_format, "images": str(images),
            "manifest": str(out / "manifest.parquet"), "vocab": str(out / "vocab.json")}
    files = shard_paths + [out / name for name in TABLES]
    return SHARD.write_stamp(cfg, up, files, info)


@task(name="shard", cache_key_fn=stage_cache_key(SHARD), persist_result=True)
def shard_task(cfg: PipelineConfig, crop: StageRecord, tag: StageRecord, force: bool = False) -> StageRecord:
    """Prefect task: WebDataset shards + manifest, rejects, tag table and vocabulary."""
    rec = shard_stage(cfg, crop, tag, force=force)
    get_run_logger().info("shard: found %(found)d = sharded %(sharded)d (train %(n_train)d, val %(n_val)d) "
                          "+ rejected %(rejected)d (and %(sidecars)d sidecars); vocabulary %(vocab_size)d ids",
                          {"sidecars": 0, **rec.info})
    return rec
