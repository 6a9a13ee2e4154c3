"""The shard stage's work: crop + tag chunks -> WebDataset image shards, the dataset's tables and vocabulary.

The unit is a hash bucket: bucket B's train samples go to `images/train-BBBBB-PP.tar`, the val
samples of val group G (buckets b with b % groups == G, `val_groups`) to `images/val-GGGGG-PP.tar`
(`tagdit.formats.image_shards`, fixed mtime: byte-identical for the same inputs), each in key-hash
order, so every shard is a random draw of the whole source (a folder per character mixes). One pass
over the crop and tag chunks (`tagdit.formats.chunks`) writes the changed units' shards and
`manifest.parquet`; then `rejects.parquet`, `tags.parquet` (`tagdit.formats.dataset_tables`) and
`vocab.json` (`tagdit.data.vocab`). `images/shards.json` records each unit's inputs after it
finishes, so a killed run, or a run after files were added, rewrites only the units that changed.
Stamping the stage is `tasks.shard`. Splitting, counting tags and choosing the vocabulary are the
data library's kind of work, so this lives in `tagdit.data`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tagdit.config import ShardsConfig
from tagdit.data.vocab import SPECIALS, Vocab
from tagdit.files import sha256_text
from tagdit.formats.chunks import CROP_CHUNK_SCHEMA, chunk_bucket, read_crop_chunk, read_tag_chunk
from tagdit.formats.dataset_tables import (
    ManifestWriter,
    manifest_writer,
    write_rejects,
    write_tag_table,
)
from tagdit.formats.image_shards import ShardFile, ShardIndex, image_sample, shard_name
from tagdit.formats.selected_tags import RATING

SPLITS = ("train", "val")


def split_hash(key: str) -> float:
    """Uniform in [0, 1) from the key alone: the split never depends on the other samples."""
    return int(sha256_text(key)[:16], 16) / 2**64


class Split:
    """Which split each sample is in (`split_hash` < val_fraction: val), from one pass over the keys.

    At least one val sample when val_fraction > 0 and there are two samples: the key with the
    smallest hash (`extra`, the tiny-dataset fallback). Keys are read a crop chunk at a time and not
    kept: only each chunk's counts per split.
    """

    def __init__(self, keys_by_chunk: Iterable[tuple[Any, list[str]]], fraction: float):
        self.fraction, self.counts, self.extra = fraction, {}, None
        total, any_val, lowest = 0, False, None
        for chunk, keys in keys_by_chunk:
            hashes = [split_hash(k) for k in keys]
            val = sum(h < fraction for h in hashes)
            self.counts[chunk] = {"train": len(keys) - val, "val": val}
            total, any_val = total + len(keys), any_val or val > 0
            if keys:
                lowest = min(lowest or (2.0, "", None), (*min(zip(hashes, keys, strict=True)), chunk))
        if not any_val and fraction > 0 and total >= 2:
            self.extra = lowest[1]
            self.counts[lowest[2]]["train"] -= 1
            self.counts[lowest[2]]["val"] += 1

    def of(self, key: str) -> str:
        return "val" if key == self.extra or split_hash(key) < self.fraction else "train"


def val_keys(keys: list[str], fraction: float) -> set[str]:
    """Keys with split_hash < fraction; at least one when fraction > 0 and there are two samples."""
    split = Split([(0, keys)], fraction)
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
    for c in crop_chunks:
        yield c, read_crop_chunk(c, ["key"], ok_only=True).column("key").to_pylist()


def rejects(crop_chunks: list[Path]) -> Iterator[pa.Table]:
    """Source and reason of every file the crop stage rejected, a chunk at a time."""
    for c in crop_chunks:
        table = read_crop_chunk(c, ["source", "ok", "reason"])
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

    def merge(self, other: TagStats) -> None:
        """Add another part's counts (exact: counts and score sums add)."""
        for t, (cat, n, n_train, score) in other.rows.items():
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


def write_unit(u: Unit, split: Split, count: int, images: Path, sc: ShardsConfig,
               write: bool, manifest: ManifestWriter, stats: TagStats) -> list[Path]:
    """One unit's `count` samples into ceil(count / samples_per_shard) shards of even size; returns their paths.

    Without `write` (the unit is unchanged) only the manifest rows and tag counts are made.
    """
    parts = -(-count // sc.samples_per_shard)
    names, files, i = [shard_name(u.split, u.number, j) for j in range(parts)], {}, 0
    for s in samples(u.chunks, images=write):
        if split.of(s["key"]) != u.split:
            continue
        name = names[i * parts // count]
        i += 1
        stats.add(s, u.split == "train")
        manifest.add({**s, "split": u.split, "shard": name})
        if write:
            if name not in files:
                for f in files.values():
                    f.close()
                files = {name: ShardFile(images / name)}
            files[name].write(image_sample(s["key"], sc.image_format, s["image"], s))
    for f in files.values():
        f.close()
    return [images / n for n in names]


def write_shards(crop_chunks: list[Path], tag_chunks: list[Path], out: Path, sc: ShardsConfig, buckets: int,
                 code: str) -> tuple[dict[str, list[str]], dict[str, int], TagStats]:
    """Shards under `out/images` and `out/manifest.parquet`; returns (shard names, sample counts, tag stats).

    A unit whose inputs (its chunks' names, which hash their contents, and the settings) match
    `images/shards.json` keeps its shards' bytes; the others are written and recorded there.
    """
    from tqdm import tqdm

    split = Split(chunk_keys(crop_chunks), sc.val_fraction)
    extra = [split.extra] if split.extra else []  # the tiny-dataset fallback
    index, stats = ShardIndex(out / "images"), TagStats()
    shards, counts = {"train": [], "val": []}, {"train": 0, "val": 0}
    units = shard_units(crop_chunks, tag_chunks, buckets, sc.val_fraction)
    settings = repr((sc.image_format, sc.samples_per_shard, sc.val_fraction, buckets))
    with manifest_writer(out) as manifest:
        for u in tqdm(units, desc="shard", unit="shard", disable=len(units) < 100):
            inputs = sha256_text(code, settings, *extra, *(f"{c.name}:{t.name}" for c, t in u.chunks))
            count = sum(split.counts[c][u.split] for c, _ in u.chunks)
            if count == 0:
                continue
            fresh = index.fresh(u.name, inputs)
            part = TagStats()  # this unit's counts, merged: memory per unit, whatever the dataset's size
            paths = write_unit(u, split, count, out / "images", sc, not fresh, manifest, part)
            stats.merge(part)
            if not fresh:
                index.finish(u.name, inputs, paths)
            shards[u.split] += [p.name for p in paths]
            counts[u.split] += count
    index.keep({u.name for u in units})
    return shards, counts, stats


def write_tables(crop_chunks: list[Path], out: Path, stats: TagStats, sc: ShardsConfig) -> tuple[int, Vocab]:
    """`rejects.parquet`, `tags.parquet` and `vocab.json` under `out`; returns (rejects, vocabulary)."""
    rejected = write_rejects(out, rejects(crop_chunks), "crop")
    write_tag_table(out, stats.table_rows())
    vocab = stats.vocab(sc.min_tag_count, sc.max_vocab)
    vocab.save(out / "vocab.json")
    return rejected, vocab
