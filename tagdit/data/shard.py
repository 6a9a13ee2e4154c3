"""The shard stage's work: crop + tag chunks -> WebDataset image shards, the dataset's tables and vocabulary.

One streaming pass over the crop and tag chunks (`tagdit.formats.chunks`) writes
`images/{train,val}-NNNNNN.tar` (`tagdit.formats.image_shards`, fixed mtime: byte-identical for the
same inputs) and `manifest.parquet`; then `rejects.parquet`, `tags.parquet`
(`tagdit.formats.dataset_tables`) and `vocab.json` (`tagdit.data.vocab`). Each finished shard is
renamed into place and listed in a progress file, so a killed run skips the shards already complete.
Stamping the stage is `tasks.shard`. Splitting, counting tags and choosing the vocabulary are the
data library's kind of work, so this lives in `tagdit.data`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tagdit.config import ShardsConfig
from tagdit.data.vocab import SPECIALS, Vocab
from tagdit.files import sha256_text, write_json_atomic
from tagdit.formats.chunks import read_crop_chunk, read_tag_chunk
from tagdit.formats.dataset_tables import manifest_writer, write_rejects, write_tag_table
from tagdit.formats.image_shards import ShardFile, image_sample
from tagdit.formats.selected_tags import RATING

SPLITS = ("train", "val")


def split_hash(key: str) -> float:
    """Uniform in [0, 1) from the key alone: the split never depends on the other samples."""
    return int(sha256_text(key)[:16], 16) / 2**64


def val_keys(keys: list[str], fraction: float) -> set[str]:
    """Keys with split_hash < fraction; at least one when fraction > 0 and there are two samples."""
    val = {k for k in keys if split_hash(k) < fraction}
    if not val and fraction > 0 and len(keys) >= 2:
        val = {min(keys, key=split_hash)}
    return val


def samples(crop_chunks: list[Path], tag_chunks: list[Path]) -> Iterator[dict]:
    """Joined crop + tag rows of every sample, in source-path order, one chunk in memory."""
    for c, t in zip(crop_chunks, tag_chunks, strict=True):
        crops = read_crop_chunk(c, ok_only=True).to_pylist()
        tags = read_tag_chunk(t).to_pylist()
        for cr, tg in zip(crops, tags, strict=True):
            if cr["key"] != tg["key"]:
                raise ValueError(f"crop chunk {c.name} and tag chunk {t.name} disagree at {cr['key']} / {tg['key']}")
            yield {**cr, **tg}


def ok_keys(crop_chunks: list[Path]) -> list[str]:
    """Keys of every cropped sample (metadata columns only: no image bytes read)."""
    return [k for c in crop_chunks for k in read_crop_chunk(c, ["key"], ok_only=True).column("key").to_pylist()]


def rejects(crop_chunks: list[Path]) -> list[dict]:
    """Source, ok and reason of every file the crop stage rejected, in source-path order."""
    return [r for c in crop_chunks for r in read_crop_chunk(c, ["source", "ok", "reason"]).to_pylist() if not r["ok"]]


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

    def table_rows(self) -> list[tuple[str, int, int, int, float]]:
        """(tag, category, count, train_count, score_sum), most frequent first."""
        items = sorted(self.rows.items(), key=lambda kv: (-kv[1][1], kv[0]))
        return [(t, *r) for t, r in items]

    def vocab(self, min_count: int, max_size: int) -> Vocab:
        """Specials + train tags with count >= min_count, most frequent first, rating tags out."""
        keep = [(t, r[2]) for t, r in self.rows.items() if r[2] >= min_count and r[0] != RATING]
        keep.sort(key=lambda x: (-x[1], x[0]))
        return Vocab.from_tags([t for t, _ in keep[: max_size - len(SPECIALS)]])


class ShardProgress:
    """The shards already complete (name -> size), kept in a progress file after each one closes."""

    def __init__(self, path: Path):
        self.path = path
        done = json.loads(path.read_text()) if path.exists() else {}
        self.done: dict[str, int] = {n: size for n, size in done.items()
                                     if (path.parent / n).exists() and (path.parent / n).stat().st_size == size}

    def finish(self, f: ShardFile) -> None:
        f.close()
        self.done[f.path.name] = f.path.stat().st_size
        write_json_atomic(self.path, self.done)


def write_shards(crop_chunks: list[Path], tag_chunks: list[Path], out: Path, sc: ShardsConfig,
                 progress: ShardProgress) -> tuple[dict[str, list[str]], dict[str, int], TagStats]:
    """Shards under `out/images` and `out/manifest.parquet`; returns (shard names, sample counts, tag stats)."""
    from tqdm import tqdm

    keys = ok_keys(crop_chunks)
    val = val_keys(keys, sc.val_fraction)
    counts, open_shards, stats, shards = {"train": 0, "val": 0}, {}, TagStats(), {"train": [], "val": []}
    with manifest_writer(out) as manifest:
        for s in tqdm(samples(crop_chunks, tag_chunks), total=len(keys), desc="shard", unit="img",
                      disable=len(keys) < 1000):
            split = "val" if s["key"] in val else "train"
            name = f"{split}-{counts[split] // sc.samples_per_shard:06d}.tar"
            counts[split] += 1
            stats.add(s, split == "train")
            manifest.add({**s, "split": split, "shard": name})
            if not shards[split] or shards[split][-1] != name:
                shards[split].append(name)
            if name in progress.done:
                continue
            if split not in open_shards:
                open_shards[split] = ShardFile(out / "images" / name)
            open_shards[split].write(image_sample(s["key"], sc.image_format, s["image"], s))
            if counts[split] % sc.samples_per_shard == 0:
                progress.finish(open_shards.pop(split))
        for f in list(open_shards.values()):
            progress.finish(f)
    return shards, counts, stats


def write_tables(crop_chunks: list[Path], out: Path, stats: TagStats, sc: ShardsConfig) -> tuple[int, Vocab]:
    """`rejects.parquet`, `tags.parquet` and `vocab.json` under `out`; returns (rejects, vocabulary)."""
    rejected = rejects(crop_chunks)
    write_rejects(out, rejected, "crop")
    write_tag_table(out, stats.table_rows())
    vocab = stats.vocab(sc.min_tag_count, sc.max_vocab)
    vocab.save(out / "vocab.json")
    return len(rejected), vocab
