"""The shard stage's work: crop + tag chunks -> WebDataset image shards, the dataset's tables and vocabulary.

The unit is a hash bucket: bucket B's train samples go to `images/train-BBBBB-PP.tar`, the val
samples of val group G (buckets b with b % groups == G, `val_groups`) to `images/val-GGGGG-PP.tar`
(`tagdit.formats.image_shards`, fixed mtime: byte-identical for the same inputs), each in key-hash
order, so every shard is a random draw of the whole source (a folder per character mixes). A unit
(`shard_unit`, one `UnitJob`) reads only its own crop and tag chunks (`tagdit.formats.chunks`) and
writes its shards, its part of the manifest and its record (inputs, shards' sizes and sha256, tag
counts) last, so a killed run, or a run after files were added, rewrites only the units that changed.
Planning the units and merging their records into the dataset's tables is `tagdit.data.shard_plan`;
stamping the stage is `tasks.shard`. Splitting, counting tags and choosing the vocabulary are the
data library's kind of work, so this lives in `tagdit.data`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tagdit.config import ShardsConfig
from tagdit.data.vocab import SPECIALS, Vocab
from tagdit.files import sha256_file, sha256_text, write_json_atomic
from tagdit.formats.chunks import CROP_CHUNK_SCHEMA, chunk_bucket, read_crop_chunk, read_tag_chunk
from tagdit.formats.dataset_tables import ManifestWriter, manifest_writer
from tagdit.formats.image_shards import ShardFile, image_sample, shard_name
from tagdit.formats.selected_tags import RATING
from tagdit.store_folders import local_copy
from tagdit.store_streams import each_read

SPLITS = ("train", "val")


def split_hash(key: str) -> float:
    """Uniform in [0, 1) from the key alone: the split never depends on the other samples."""
    return int(sha256_text(key)[:16], 16) / 2**64


class Split:
    """Which split each sample is in (`split_hash` < val_fraction: val), from each crop chunk's `split_summary`.

    At least one val sample when val_fraction > 0 and there are two samples: the key with the
    smallest hash (`extra`, the tiny-dataset fallback). Keys are read a crop chunk at a time and not
    kept: only each chunk's counts per split (and its lowest hash).
    """

    def __init__(self, summaries: Iterable[tuple[Any, list]], fraction: float):
        self.fraction, self.counts, self.extra = fraction, {}, None
        total, any_val, lowest = 0, False, None
        for chunk, (n, val, low_hash, low_key) in summaries:
            self.counts[chunk] = {"train": n - val, "val": val}
            total, any_val = total + n, any_val or val > 0
            if n:
                lowest = min(lowest or (2.0, "", None), (low_hash, low_key, chunk))
        if not any_val and fraction > 0 and total >= 2:
            self.extra = lowest[1]
            self.counts[lowest[2]]["train"] -= 1
            self.counts[lowest[2]]["val"] += 1

    def of(self, key: str) -> str:
        return split_of(key, self.fraction, self.extra)


def split_of(key: str, fraction: float, extra: str | None) -> str:
    """"val" when the key's hash is under `fraction` or it is the tiny-dataset fallback `extra`, else "train"."""
    return "val" if key == extra or split_hash(key) < fraction else "train"


def split_summary(keys: list[str], fraction: float) -> list:
    """A chunk's part of the split, [samples, val samples, lowest hash, its key]: what `Split` needs of it
    (JSON, so it can be kept per chunk)."""
    hashes = [split_hash(k) for k in keys]
    low_hash, low_key = min(zip(hashes, keys, strict=True), default=(2.0, ""))
    return [len(keys), sum(h < fraction for h in hashes), low_hash, low_key]


def val_keys(keys: list[str], fraction: float) -> set[str]:
    """Keys with split_hash < fraction; at least one when fraction > 0 and there are two samples."""
    split = Split([(0, split_summary(keys, fraction))], fraction)
    return {k for k in keys if split.of(k) == "val"}


def samples(chunks: list[tuple[Path, Path]], images: bool = True) -> Iterator[dict]:
    """Joined crop + tag rows of every sample of (crop chunk, tag chunk) pairs, in chunk (key-hash) order.

    One chunk in memory at a time; without `images` the image bytes are not read (an unchanged unit).
    """
    columns = None if images else [f for f in CROP_CHUNK_SCHEMA.names if f != "image"]
    for c, t in chunks:
        crops = read_crop_chunk(c, columns, ok_only=True).to_pylist()
        tags = read_tag_chunk(t).to_pylist()
        for cr, tg in zip(crops, tags, strict=True):
            if cr["key"] != tg["key"]:
                raise ValueError(f"crop chunk {c.name} and tag chunk {t.name} disagree at {cr['key']} / {tg['key']}")
            yield {**cr, **tg}


def chunk_keys(crop_chunks: list[Path]) -> Iterator[tuple[Path, list[str]]]:
    """(crop chunk, keys of its cropped samples), a chunk at a time (metadata columns only: no image bytes read)."""
    keys = each_read(lambda c: read_crop_chunk(c, ["key"], ok_only=True).column("key").to_pylist(), crop_chunks)
    yield from zip(crop_chunks, keys, strict=True)


def rejects(crop_chunks: list[Path]) -> Iterator[pa.Table]:
    """Source and reason of every file the crop stage rejected, a chunk at a time."""
    for table in each_read(lambda c: read_crop_chunk(c, ["source", "ok", "reason"]), crop_chunks):
        yield table.filter(pc.invert(table.column("ok"))).select(["source", "reason"])


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

    def merge(self, rows: dict[str, list]) -> None:
        """Add another part's `rows` (exact: counts and score sums add)."""
        for t, (cat, n, n_train, score) in rows.items():
            r = self.rows.setdefault(t, [cat, 0, 0, 0.0])
            r[1] += n
            r[2] += n_train
            r[3] += score

    def table_rows(self) -> list[tuple[str, int, int, int, float]]:
        """(tag, category, count, train_count, score_sum), most frequent first."""
        items = sorted(self.rows.items(), key=lambda kv: (-kv[1][1], kv[0]))
        return [(t, *r) for t, r in items]

    def vocab(self, min_count: int, max_size: int) -> Vocab:
        """Specials + train tags with count >= min_count, most frequent first, rating tags out."""
        keep = [(t, r[2]) for t, r in self.rows.items() if r[2] >= min_count and r[0] != RATING]
        keep.sort(key=lambda x: (-x[1], x[0]))
        return Vocab.from_tags([t for t, _ in keep[: max_size - len(SPECIALS)]])


def val_groups(buckets: int, fraction: float) -> int:
    """How many val groups: the largest power of two <= buckets x val_fraction, at least 1.

    A bucket holds about one train shard of samples, so a val group (the val samples of the buckets
    b with b % groups == its number) holds about one shard's worth too: val shards never shrink to a
    few samples each, and an added file rewrites one val group's shards at most.
    """
    n = 1
    while 2 * n <= buckets * fraction:
        n *= 2
    return n


@dataclass(frozen=True)
class Unit:
    """The shards of one bucket's train samples, or of one val group's val samples."""

    split: str
    number: int
    chunks: list[tuple[Path, Path]]  # (crop chunk, tag chunk) pairs it reads, in bucket order

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:05d}"


def shard_units(crop_chunks: list[Path], tag_chunks: list[Path], buckets: int, fraction: float) -> list[Unit]:
    """Every bucket's train unit, then every val group's unit (groups with no bucket left out)."""
    pairs = [(chunk_bucket(c.name), (c, t)) for c, t in zip(crop_chunks, tag_chunks, strict=True)]
    groups = val_groups(buckets, fraction)
    val = [Unit("val", g, [ct for b, ct in pairs if b % groups == g]) for g in range(groups)]
    return [Unit("train", b, [ct]) for b, ct in pairs] + [u for u in val if u.chunks]




@dataclass(frozen=True)
class UnitJob:
    """Everything one unit's task run needs (picklable: it may run in another process or on a Dask worker)."""

    unit: Unit
    count: int  # its samples: they are spread evenly over ceil(count / samples_per_shard) shards
    inputs: str  # digest of its chunks and settings: names its record
    write: bool  # False: its shards are in place from these inputs; only its manifest part and record are made
    fraction: float
    extra: str | None  # the tiny-dataset fallback val key, if any
    images: Path
    parts: Path  # folder of the units' records and manifest parts
    sc: ShardsConfig


def record_path(parts: Path, name: str, inputs: str) -> Path:
    """A unit's record, `work/shard/train-00012-<inputs>.json`: written last, it marks the unit done."""
    return Path(parts) / f"{name}-{inputs[:16]}.json"


def write_unit(job: UnitJob, manifest: ManifestWriter, stats: TagStats) -> list[Path]:
    """The unit's samples into its shards (unless `job.write` is off), manifest rows and tag counts."""
    u, sc, count = job.unit, job.sc, job.count
    parts = -(-count // sc.samples_per_shard)
    names, files, i = [shard_name(u.split, u.number, j) for j in range(parts)], {}, 0
    for s in samples(u.chunks, images=job.write):
        if split_of(s["key"], job.fraction, job.extra) != u.split:
            continue
        name = names[i * parts // count]
        i += 1
        stats.add(s, u.split == "train")
        manifest.add({**s, "split": u.split, "shard": name})
        if job.write:
            if name not in files:
                for f in files.values():
                    f.close()
                files = {name: ShardFile(job.images / name)}
            files[name].write(image_sample(s["key"], sc.image_format, s["image"], s))
    for f in files.values():
        f.close()
    return [job.images / n for n in names]


def shard_unit(job: UnitJob) -> dict[str, Any]:
    """One unit: its shards, its manifest part and its record (shards' sizes and sha256, its tag counts); returns the record.

    Memory is one crop chunk and one unit's tag counts, whatever the dataset's size.
    """
    record = record_path(job.parts, job.unit.name, job.inputs)
    stats = TagStats()
    with manifest_writer(record.with_suffix(".parquet")) as manifest:
        paths = write_unit(job, manifest, stats)
    per_shard = Counter(i * len(paths) // job.count for i in range(job.count))  # as `write_unit` spreads them
    here = [local_copy(p) for p in paths]  # kept shards (`job.write` off) of a URL dataset may be in the store only
    shards = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p), "samples": per_shard[j]}
              for j, p in enumerate(here)}
    done = {"inputs": job.inputs, "count": job.count, "split": job.unit.split, "shards": shards, "tags": stats.rows}
    write_json_atomic(record, done)
    return done
