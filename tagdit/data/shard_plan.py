"""The shard stage's plan and finish: which units to write, and the dataset's tables from their records.

`plan_units` reads the keys of the crop chunks it has not seen (the split's per-chunk counts, kept
by chunk name in `work/shard/split.json`; never the keys themselves) and makes a `UnitJob` for every unit without a finished record under `work/shard/`
(`tagdit.data.shard.record_path`: named by the unit and the digest of its inputs). The jobs run on the
stage's task runner, each in its own process (`tasks.shard`), so one unit's samples are in memory at a
time, whatever the dataset's size. `finish_units` then merges the units' records, all of them, in
unit order: `images/shards.json`, the exact tag counts, `manifest.parquet` from the units' manifest
parts, and drops the records of units that are gone; `write_tables` the rejects, the tag table and
the vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tagdit.config import ShardsConfig
from tagdit.data.shard import (
    Split,
    TagStats,
    UnitJob,
    chunk_keys,
    record_path,
    rejects,
    shard_units,
    split_summary,
)
from tagdit.data.vocab import Vocab
from tagdit.files import sha256_text, write_json_atomic
from tagdit.formats.dataset_tables import merge_manifests, write_rejects, write_tag_table
from tagdit.formats.image_shards import ShardIndex
from tagdit.store_folders import local_copy, names_in, present, remove, sizes_in
from tagdit.store_streams import each_read

PARTS = Path("work") / "shard"  # under the dataset folder: the units' records and manifest parts
SPLIT_SUMMARIES = "split.json"  # in PARTS: each crop chunk's split summary, by chunk name


@dataclass(frozen=True)
class ShardPlan:
    """Every unit with samples (name -> its record, in unit order) and the jobs of those not done."""

    records: dict[str, Path]
    jobs: list[UnitJob]


def recorded_sizes(record: Path, parts: set[str]) -> dict[str, int] | None:
    """The sizes of a finished unit's shards as its record gives them, or None when its record or
    manifest part is missing (`parts`: the names in `work/shard/`, here or in the store of a URL dataset)."""
    if record.name not in parts or record.with_suffix(".parquet").name not in parts:
        return None
    return {n: m["size"] for n, m in json.loads(local_copy(record).read_text())["shards"].items()}


def split_summaries(crop_chunks: list[Path], fraction: float, parts: Path) -> list[tuple[Path, list]]:
    """Each crop chunk's `split_summary`: kept in `work/shard/split.json` by chunk name (a name hashes the
    chunk's contents), so only new chunks' keys are read and hashed (at 100M images: minutes saved)."""
    kept_path = parts / SPLIT_SUMMARIES
    kept = json.loads(local_copy(kept_path).read_text()) if present(kept_path) else {}
    known = kept.get("chunks", {}) if kept.get("fraction") == fraction else {}
    summaries = {c.name: known.get(c.name) for c in crop_chunks}
    for c, keys in chunk_keys([c for c in crop_chunks if summaries[c.name] is None]):
        summaries[c.name] = split_summary(keys, fraction)
    if summaries != known:
        write_json_atomic(kept_path, {"fraction": fraction, "chunks": summaries})
    return [(c, summaries[c.name]) for c in crop_chunks]


def plan_units(crop_chunks: list[Path], tag_chunks: list[Path], out: Path, sc: ShardsConfig, buckets: int,
               code: str) -> ShardPlan:
    """The units of `out` (the dataset folder) and the jobs for those whose inputs have no finished record.

    A unit's inputs are its chunks' names (which hash their contents), the settings and the code. A
    unit whose shards `images/shards.json` records from the same inputs (an earlier version's run) keeps
    them: its job writes only its manifest part and record.
    """
    split = Split(split_summaries(crop_chunks, sc.val_fraction, out / PARTS), sc.val_fraction)
    extra = [split.extra] if split.extra else []  # the tiny-dataset fallback
    index, parts = ShardIndex(out / "images"), out / PARTS
    settings = repr((sc.image_format, sc.samples_per_shard, sc.val_fraction, buckets))
    records, units, jobs = {}, [], []
    for u in shard_units(crop_chunks, tag_chunks, buckets, sc.val_fraction):
        count = sum(split.counts[c][u.split] for c, _ in u.chunks)
        if count == 0:
            continue
        inputs = sha256_text(code, settings, *extra, *(f"{c.name}:{t.name}" for c, t in u.chunks))
        records[u.name] = record_path(parts, u.name, inputs)
        units.append((u, count, inputs))
    done, sizes = names_in(parts), sizes_in(out / "images")  # here and in the store of a URL dataset
    recorded = each_read(lambda r: recorded_sizes(r, done), [records[u.name] for u, _, _ in units])
    for (u, count, inputs), shards in zip(units, recorded, strict=True):
        if shards is None or any(sizes.get(n) != size for n, size in shards.items()):  # not finished
            jobs.append(UnitJob(u, count, inputs, not index.fresh(u.name, inputs), sc.val_fraction, split.extra,
                                out / "images", parts, sc))
    return ShardPlan(records, jobs)


def finish_units(plan: ShardPlan, out: Path) -> tuple[dict[str, list[str]], dict[str, int], TagStats]:
    """Merge the units' records into `images/shards.json`, `manifest.parquet` and the tag counts;
    returns (shard names per split, sample counts per split, tag counts)."""
    index, stats = {}, TagStats()
    shards: dict[str, list[str]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    read = each_read(lambda path: json.loads(local_copy(path).read_text()), plan.records.values())
    for name, r in zip(plan.records, read, strict=True):  # a unit this run did not write may be in the store only
        index[name] = {"inputs": r["inputs"], "shards": r["shards"]}
        stats.merge(r["tags"])
        shards[r["split"]] += sorted(r["shards"])
        counts[r["split"]] += r["count"]
    ShardIndex(out / "images").replace(index)
    merge_manifests([p.with_suffix(".parquet") for p in plan.records.values()], out)
    keep = {p.name for p in plan.records.values()} | {p.with_suffix(".parquet").name for p in plan.records.values()}
    keep.add(SPLIT_SUMMARIES)
    for stale in names_in(out / PARTS) - keep:
        if stale.endswith((".json", ".parquet")):
            remove(out / PARTS / stale)
    return shards, counts, stats


def write_tables(crop_chunks: list[Path], out: Path, stats: TagStats, sc: ShardsConfig) -> tuple[int, Vocab]:
    """`rejects.parquet`, `tags.parquet` and `vocab.json` under `out`; returns (rejects, vocabulary)."""
    rejected = write_rejects(out, rejects(crop_chunks), "crop")
    write_tag_table(out, stats.table_rows())
    vocab = stats.vocab(sc.min_tag_count, sc.max_vocab)
    vocab.save(out / "vocab.json")
    return rejected, vocab
