"""The source listing and the dataset's bucket count: `<dataset>/work/sources.parquet`, `<dataset>/dataset.json`.

The listing (`work/listing.parquet`, `LISTING_SCHEMA`) is written while the source is walked, in
batches of `BATCH` rows (`ListingWriter`): one row per file found, with its path (relative to
`data.source`, or a manifest's URI), size, mtime or object version, sidecar, the tags a user manifest
gave it, its `stamp` (what says it is unchanged), sample key and key hash. The source manifest
(`SOURCES_SCHEMA`) is the same rows with their hash bucket, sorted by (bucket, key hash) and written
in small row groups (`sort_sources`, memory bounded by `SORT_ROWS` rows), so a crop unit reads only
the row groups of its bucket (`read_sources`). `dataset.json` records the bucket count chosen on the
dataset's first prepare, so later runs of a growing dataset keep it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagdit.files import atomic_path, write_json_atomic

LISTING = "work/listing.parquet"
SOURCES = "work/sources.parquet"
DATASET_INFO = "dataset.json"
BATCH = 65536  # listing rows per parquet row group: the listing's memory, whatever the source's size
SORT_ROWS = 1 << 20  # rows sorted in memory at a time when the listing becomes the source manifest
ROW_GROUP = 8192  # source manifest rows per row group: a bucket's read touches one or two
LISTING_SCHEMA = pa.schema([
    ("rel", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sidecar", pa.string()),
    ("sidecar_stamp", pa.string()), ("tags", pa.string()), ("stamp", pa.string()), ("key", pa.string()),
    ("key_hash", pa.uint64()),
])  # fmt: skip
SOURCES_SCHEMA = LISTING_SCHEMA.append(pa.field("bucket", pa.int32()))


class ListingWriter:
    """Appends listing rows (dicts of `LISTING_SCHEMA`'s fields), a row group every `BATCH` rows."""

    def __init__(self, writer: pq.ParquetWriter):
        self._writer, self._cols, self.rows = writer, {f: [] for f in LISTING_SCHEMA.names}, 0

    def add(self, row: dict) -> None:
        for f, col in self._cols.items():
            col.append(row[f])
        self.rows += 1
        if len(self._cols["rel"]) == BATCH:
            self.flush()

    def flush(self) -> None:
        self._writer.write_batch(pa.RecordBatch.from_pydict(self._cols, LISTING_SCHEMA))
        for col in self._cols.values():
            col.clear()


@contextmanager
def listing_writer(dst: Path) -> Iterator[ListingWriter]:
    """A `ListingWriter` on `dst`, which appears (not uploaded: it is local bookkeeping) only if the block succeeds."""
    with atomic_path(dst, upload=False) as tmp, pq.ParquetWriter(tmp, LISTING_SCHEMA) as pw:
        w = ListingWriter(pw)
        yield w
        w.flush()


def _buckets(key_hash: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    return (np.asarray(key_hash, dtype=np.uint64) % np.uint64(n)).astype(np.int32)


def bucket_sizes(listing: Path, n: int) -> np.ndarray:
    """How many listed files fall in each of `n` buckets (the key hash column only, batch by batch)."""
    sizes = np.zeros(n, np.int64)
    for batch in pq.ParquetFile(listing).iter_batches(columns=["key_hash"]):
        sizes += np.bincount(_buckets(batch.column(0), n), minlength=n)
    return sizes


def sort_sources(listing: Path, dst: Path, n: int, sizes: np.ndarray) -> None:
    """Write the listing's rows with their bucket (of `n`), sorted by (bucket, key hash), to `dst`.

    Buckets are sorted a range at a time (about `SORT_ROWS` rows each), one pass over the listing per
    range, so memory stays bounded. Two rows with one key (a manifest naming a file twice) are refused.
    """
    ends = np.cumsum(sizes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp, pq.ParquetWriter(tmp, SOURCES_SCHEMA) as pw:
        lo = 0
        while lo < n:
            start = ends[lo - 1] if lo else 0
            hi = max(lo + 1, int(np.searchsorted(ends, start + SORT_ROWS, side="right")))
            parts = []
            for batch in pq.ParquetFile(listing).iter_batches():
                b = _buckets(batch.column("key_hash"), n)
                keep = (b >= lo) & (b < hi)
                if keep.any():
                    parts.append(batch.filter(pa.array(keep)).append_column("bucket", pa.array(b[keep])))
            if parts:
                table = pa.Table.from_batches(parts, SOURCES_SCHEMA).sort_by([("bucket", "ascending"),
                                                                              ("key_hash", "ascending")])
                _refuse_twice(table)
                pw.write_table(table, row_group_size=ROW_GROUP)
            lo = hi


def _refuse_twice(table: pa.Table) -> None:
    keys = table.column("key")
    same = pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1)) if len(keys) > 1 else pa.array([], pa.bool_())
    if pc.any(same).as_py():
        i = pc.index(same, True).as_py()
        raise ValueError(f"data.source lists {table.column('rel')[i].as_py()!r} twice")


def read_sources(path: Path, bucket: int | None = None) -> list[dict]:
    """Rows of a source manifest; only one bucket's (its row groups only) when `bucket` is given."""
    schema = pq.read_schema(path)
    if not schema.equals(SOURCES_SCHEMA, check_metadata=False):
        raise ValueError(f"{path} is not a source manifest: its schema is\n{schema}")
    filters = None if bucket is None else [("bucket", "=", bucket)]
    return pq.read_table(path, filters=filters).to_pylist()


def bucket_stamps(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(bucket, its rows' stamps in key-hash order) of each bucket with files, streamed from a source manifest."""
    bucket, stamps = None, []
    for batch in pq.ParquetFile(path).iter_batches(columns=["bucket", "stamp"]):
        b = batch.column(0).to_numpy()
        cuts = [0, *(np.flatnonzero(np.diff(b)) + 1), len(b)]
        for i, j in zip(cuts[:-1], cuts[1:], strict=True):
            if i == j:
                continue
            if bucket is not None and b[i] != bucket:
                yield bucket, stamps
                stamps = []
            bucket = int(b[i])
            stamps += batch.column(1).slice(i, j - i).to_pylist()
    if bucket is not None:
        yield bucket, stamps


def read_buckets(dataset_dir: Path) -> int | None:
    """The bucket count recorded in `<dataset>/dataset.json`, or None before the first prepare."""
    try:
        return int(json.loads((Path(dataset_dir) / DATASET_INFO).read_text())["buckets"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_buckets(dataset_dir: Path, buckets: int) -> None:
    """Record the dataset's bucket count in `<dataset>/dataset.json`."""
    Path(dataset_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(dataset_dir) / DATASET_INFO, {"buckets": buckets})
