"""The source listing and the dataset's bucket count: `<dataset>/work/sources.parquet`, `<dataset>/dataset.json`.

The listing (`work/listing.parquet`, `LISTING_SCHEMA`) is written while the source is walked, in
batches of `BATCH` rows (`ListingWriter`): one row per file found, with its path (relative to
`data.source`, or a manifest's URI), size, mtime or object version, sidecar, the tags a user manifest
gave it, and its `stamp` (what says it is unchanged). The source manifest (`SOURCES_SCHEMA`) is the
same rows with their sample key, key hash and hash bucket, sorted by (bucket, key hash) and written
in small row groups (`sort_sources`: an external sort, `SORT_ROWS` rows in memory at a time), so a crop unit reads only
the row groups of its bucket (`read_sources`). `dataset.json` records the bucket count chosen on the
dataset's first prepare, so later runs of a growing dataset keep it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
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
BATCH = 4096  # listing rows per parquet row group: the listing's memory, whatever the source's size
SORT_ROWS = 8192  # rows sorted in memory at a time when the listing becomes the source manifest
MAX_PARTS = 512  # at most this many part files open while sorting (SORT_ROWS grows past it beyond 4M rows)
ROW_GROUP = 8192  # source manifest rows per row group: a bucket's read touches one or two
# STREAM: a parquet file read as a stream is opened with pre_buffer=False: with pyarrow's default
# (True), iter_batches buffers every row group it will read, i.e. the whole file (12 MiB at 1M listing rows)
LISTING_SCHEMA = pa.schema([
    ("rel", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sidecar", pa.string()),
    ("sidecar_stamp", pa.string()), ("tags", pa.string()), ("stamp", pa.string()),
])  # fmt: skip
SOURCES_SCHEMA = pa.schema([*LISTING_SCHEMA, ("key", pa.string()), ("key_hash", pa.uint64()), ("bucket", pa.int32())])


class ListingWriter:
    """Appends listing rows (tuples in `LISTING_SCHEMA`'s field order), a row group every `BATCH` rows."""

    def __init__(self, writer: pq.ParquetWriter):
        self._writer, self._rows, self.rows = writer, [], 0

    def add(self, row: tuple) -> None:
        self._rows.append(row)
        if len(self._rows) == BATCH:
            self.flush()

    def flush(self) -> None:
        cols = list(zip(*self._rows, strict=True)) if self._rows else [()] * len(LISTING_SCHEMA)
        self._writer.write_batch(pa.RecordBatch.from_arrays(
            [pa.array(c, f.type) for c, f in zip(cols, LISTING_SCHEMA, strict=True)], schema=LISTING_SCHEMA))
        self.rows += len(self._rows)
        self._rows.clear()


@contextmanager
def listing_writer(dst: Path) -> Iterator[ListingWriter]:
    """A `ListingWriter` on `dst`, which appears (not uploaded: it is local bookkeeping) only if the block succeeds."""
    with atomic_path(dst, upload=False) as tmp, pq.ParquetWriter(tmp, LISTING_SCHEMA) as pw:
        w = ListingWriter(pw)
        yield w
        w.flush()


def sort_sources(listing: Path, dst: Path, n: int, found: int,
                 keys_of: Callable[[list[str]], tuple[list[str], list[int]]],
                 digest: Callable[[list[str]], str]) -> tuple[np.ndarray, dict[int, str]]:
    """Write the listing's rows with their key, key hash (`keys_of(rels)`) and bucket (hash mod `n`),
    sorted by (bucket, key hash), to `dst`; returns the number of rows in each bucket, and
    {bucket: `digest(its rows' stamps in key-hash order)`} of each bucket with rows, in bucket order.

    An external sort in two passes, whatever the listing's size: the rows are split into part files
    by bucket range (keys hash uniformly: about `SORT_ROWS` rows a part), then each part is sorted in
    memory, digested and appended. Two rows with one key (a manifest naming a file twice) are refused.
    The digests come from the sorted parts while they are in memory: reading the source manifest back
    for them grew the process by ~25 MiB at 1M rows (mimalloc, Arrow's allocator, keeps the pages a
    long read touched; the crop workers forked after it inherit them).
    """
    parts_n = min(n, MAX_PARTS, max(1, -(-found // SORT_ROWS)))
    starts = np.arange(parts_n) * n // parts_n  # first bucket of each part
    sizes, digests = np.zeros(n, np.int64), {}
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sources.tmp-", dir=dst.parent) as tmp_dir:
        parts = [Path(tmp_dir) / f"part-{i:05d}.arrow" for i in range(parts_n)]
        sinks = [pa.OSFile(str(p), "wb") for p in parts]
        writers = [pa.ipc.new_stream(f, SOURCES_SCHEMA) for f in sinks]  # unbuffered: flat memory per part
        try:
            for batch in pq.ParquetFile(listing, pre_buffer=False).iter_batches(batch_size=BATCH):  # see STREAM
                keys, hashes = keys_of(batch.column("rel").to_pylist())
                h = np.array(hashes, np.uint64)
                b = (h % np.uint64(n)).astype(np.int32)
                sizes += np.bincount(b, minlength=n)
                which = np.searchsorted(starts, b, side="right") - 1
                batch = pa.RecordBatch.from_arrays([*batch.columns, pa.array(keys, pa.string()), pa.array(h),
                                                    pa.array(b)], schema=SOURCES_SCHEMA)
                for i in np.unique(which):
                    writers[i].write_batch(batch.filter(pa.array(which == i)))
        finally:
            for w, f in zip(writers, sinks, strict=True):
                w.close()
                f.close()
        with atomic_path(dst) as tmp, pq.ParquetWriter(tmp, SOURCES_SCHEMA) as pw:
            for part in parts:
                with pa.memory_map(str(part)) as f, pa.ipc.open_stream(f) as r:
                    table = r.read_all().sort_by([("bucket", "ascending"), ("key_hash", "ascending")])
                _refuse_twice(table)
                digests.update(_bucket_digests(table, digest))
                pw.write_table(table, row_group_size=ROW_GROUP)
    return sizes, digests


def _bucket_digests(table: pa.Table, digest: Callable[[list[str]], str]) -> Iterator[tuple[int, str]]:
    """(bucket, `digest(its stamps)`) of each bucket of a table sorted by bucket."""
    b, stamps = table.column("bucket").to_numpy(), table.column("stamp")
    cuts = [0, *(np.flatnonzero(np.diff(b)) + 1), len(b)]
    for i, j in zip(cuts[:-1], cuts[1:], strict=True):
        if i < j:
            yield int(b[i]), digest(stamps.slice(i, j - i).to_pylist())


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
    pf = pq.ParquetFile(path)
    if bucket is None:
        return pf.read().to_pylist()
    col = SOURCES_SCHEMA.get_field_index("bucket")
    groups = [i for i in range(pf.num_row_groups)
              if (st := pf.metadata.row_group(i).column(col).statistics) is None or st.min <= bucket <= st.max]
    table = pf.read_row_groups(groups)  # the rows are sorted by bucket: its one or two row groups
    return table.filter(pc.equal(table.column("bucket"), bucket)).to_pylist()


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
