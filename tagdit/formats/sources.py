"""The source listing and the dataset's bucket count: `<dataset>/work/sources.parquet`, `<dataset>/dataset.json`.

The source manifest has one row per file the crop stage found (`SOURCES_SCHEMA`): its path relative
to `data.source`, size, mtime, sidecar and sidecar stamp, sample key and hash bucket; the crop units
read their bucket's rows from it. `dataset.json` records the bucket count chosen on the dataset's
first prepare, so later runs of a growing dataset keep it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagdit.files import atomic_path, write_json_atomic

SOURCES = "work/sources.parquet"
DATASET_INFO = "dataset.json"
SOURCES_SCHEMA = pa.schema([
    ("rel", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sidecar", pa.string()),
    ("sidecar_stamp", pa.string()), ("key", pa.string()), ("bucket", pa.int32()),
])  # fmt: skip


def write_sources(rows: list[dict], dst: Path) -> None:
    """Write source rows (`SOURCES_SCHEMA` fields) to `dst`, atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=SOURCES_SCHEMA), tmp)


def read_sources(path: Path, bucket: int | None = None) -> list[dict]:
    """Rows of a source manifest; only one bucket's when `bucket` is given."""
    table = pq.read_table(path)
    if not table.schema.equals(SOURCES_SCHEMA, check_metadata=False):
        raise ValueError(f"{path} is not a source manifest: its schema is\n{table.schema}")
    if bucket is not None:
        table = table.filter(pc.equal(table.column("bucket"), bucket))
    return table.to_pylist()


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
