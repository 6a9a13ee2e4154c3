"""The crop stage's bookkeeping streams: a listing or a user manifest is read a batch at a time (never the
whole file in Arrow's memory), and the source manifest's per-bucket digests come from the sort itself."""

import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tagdit.data.sources import keys_of
from tagdit.files import sha256_text
from tagdit.formats.sources import BATCH, LISTING_SCHEMA, read_sources, sort_sources
from tagdit.formats.user_manifest import manifest_rows


def listing(path: Path, rows: int) -> Path:
    rels = [f"d{i // 1000:04d}/{i:07d}.png" for i in range(rows)]
    none = pa.nulls(rows, pa.string())
    pq.write_table(pa.table({
        "rel": rels, "size": pa.array([i % 7 for i in range(rows)], pa.int64()),
        "mtime_ns": pa.array([0] * rows, pa.int64()), "sidecar": none, "sidecar_stamp": [""] * rows,
        "tags": none, "stamp": [f"{r}:{i % 7}:0:None:" for i, r in enumerate(rels)],
    }, schema=LISTING_SCHEMA), path, row_group_size=BATCH)  # fmt: skip
    return path


def test_sort_sources_digests_each_bucket_as_its_rows_read_back(tmp_path):
    src, dst = listing(tmp_path / "listing.parquet", 3000), tmp_path / "sources.parquet"
    sizes, digests = sort_sources(src, dst, 8, 3000, keys_of, lambda stamps: sha256_text(*stamps))
    assert list(digests) == sorted(digests) == [b for b in range(8) if sizes[b]]
    for b, d in digests.items():
        rows = read_sources(dst, b)
        assert len(rows) == sizes[b] and d == sha256_text(*[r["stamp"] for r in rows])


def test_the_sort_streams_the_listing_a_batch_at_a_time_not_the_whole_file(tmp_path):
    """pyarrow's pre_buffer (its default) would hold every row group an iter_batches read will touch: the file."""
    src = listing(tmp_path / "listing.parquet", 400_000)
    base, most = pa.total_allocated_bytes(), 0

    def sampled_keys_of(rels: list[str]) -> tuple[list[str], list[int]]:
        nonlocal most
        most = max(most, pa.total_allocated_bytes() - base)
        return keys_of(rels)

    sort_sources(src, tmp_path / "sources.parquet", 64, 400_000, sampled_keys_of, lambda stamps: "")
    assert 0 < most < src.stat().st_size / 2, (most, src.stat().st_size)  # pre_buffer: >= the whole file


def test_a_parquet_manifest_is_read_a_batch_at_a_time_not_the_whole_file(tmp_path):
    """Through a Python file object, pre_buffer holds the whole file as Python bytes (tracemalloc sees them)."""
    manifest = tmp_path / "m.parquet"
    paths = [f"{sha256_text(str(i))[:40]}.png" for i in range(100_000)]  # incompressible: a large file
    pq.write_table(pa.table({"path": paths}), manifest, row_group_size=BATCH)
    tracemalloc.start()
    try:
        assert sum(1 for _ in manifest_rows(manifest)) == len(paths)
        most = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert most < manifest.stat().st_size / 2, (most, manifest.stat().st_size)  # pre_buffer: >= the whole file
