"""The dataset's tables beside its image shards: `manifest.parquet`, `rejects.parquet`, `tags.parquet`.

Written by the shard stage (`tagdit.data.shard`), each atomically: the manifest holds one row per
sharded sample (`MANIFEST_SCHEMA`: where it went, where it came from, its tags), the rejects one row
per file that did not become a sample (path, stage, reason), the tag table one row per tag (category,
count, train count, mean score), most frequent first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tagdit.files import atomic_path
from tagdit.store_streams import each_read, seekable

MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
TAG_TABLE = "tags.parquet"
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("sha256", pa.string()), ("orig_size", pa.list_(pa.int32())), ("crop_box", pa.list_(pa.int32())),
    ("tags", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())), ("rating", pa.string()),
])  # fmt: skip
MANIFEST_ROW_GROUP = 1024  # samples per row group of a unit's manifest part: writing it keeps memory flat
TABLE_ROW_GROUP = 16_384  # rows per row group of the merged manifest and the rejects (6,000 groups at 100M)


class ManifestWriter:
    """Appends manifest rows (dicts with at least `MANIFEST_SCHEMA`'s fields) in row groups."""

    def __init__(self, writer: pq.ParquetWriter):
        self._writer, self._rows = writer, []

    def add(self, row: dict) -> None:
        self._rows.append({f: row.get(f) for f in MANIFEST_SCHEMA.names})
        if len(self._rows) == MANIFEST_ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        self._writer.write_table(pa.Table.from_pylist(self._rows, MANIFEST_SCHEMA))
        self._rows.clear()


@contextmanager
def manifest_writer(path: Path) -> Iterator[ManifestWriter]:
    """Write manifest rows to `path` (a unit's part): it appears, complete, only if the block succeeds."""
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, MANIFEST_SCHEMA) as pw:
        w = ManifestWriter(pw)
        yield w
        w.flush()  # the last (possibly empty) row group


@contextmanager
def table_writer(path: Path, schema: pa.Schema) -> Iterator[Callable[[pa.Table], None]]:
    """A function appending tables to the parquet file `path` (atomic) in row groups of `TABLE_ROW_GROUP`
    rows: memory is one row group's, and the footer (the writer keeps every group's metadata until the
    end) stays small at 100M rows."""
    pending: list[pa.Table] = []

    def flush(pw: pq.ParquetWriter, last: bool = False) -> None:
        """Write the whole row groups pending (and the rest too when `last`)."""
        table = pa.concat_tables(pending)
        full = len(table) if last else len(table) // TABLE_ROW_GROUP * TABLE_ROW_GROUP
        if full:
            pw.write_table(table.slice(0, full), row_group_size=TABLE_ROW_GROUP)
        pending[:] = [table.slice(full)]

    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as pw:
        def write(table: pa.Table) -> None:
            pending.append(table)
            if sum(len(t) for t in pending) >= TABLE_ROW_GROUP:
                flush(pw)

        yield write
        if pending:
            flush(pw, last=True)


def _read_part(part: Path) -> pa.Table:
    with seekable(part) as source:
        return pq.read_table(source, schema=MANIFEST_SCHEMA)


def merge_manifests(parts: Iterable[Path], dataset_dir: Path) -> int:
    """`manifest.parquet` under `dataset_dir` from the units' parts, in the order given, a row group at
    a time; returns its number of rows."""
    n = 0
    with table_writer(Path(dataset_dir) / MANIFEST, MANIFEST_SCHEMA) as write:
        for table in each_read(_read_part, parts):  # a part this run did not write may be in the store only
            write(table)
            n += len(table)
    return n


def read_manifest(dataset_dir: Path, columns: list[str] | None = None,
                  row_groups: list[int] | None = None) -> list[dict]:
    """Manifest rows (`columns` only, when given), in shard order; only those of `row_groups` when given."""
    with seekable(Path(dataset_dir) / MANIFEST) as source:
        pf = pq.ParquetFile(source)
        groups = range(pf.num_row_groups) if row_groups is None else row_groups
        return pf.read_row_groups(list(groups), columns=columns).to_pylist()


def manifest_row_groups(dataset_dir: Path) -> list[int]:
    """The number of rows of each row group of the manifest (its footer only)."""
    with seekable(Path(dataset_dir) / MANIFEST) as source:
        meta = pq.read_metadata(source)
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


REJECTS_SCHEMA = pa.schema([("path", pa.string()), ("stage", pa.string()), ("reason", pa.string())])


def write_rejects(dataset_dir: Path, parts: Iterable[pa.Table], stage: str) -> int:
    """`rejects.parquet` from tables of (source, reason), streamed: path (relative to `data.source`), the
    stage that rejected it, the reason. Returns the number of rows."""
    n = 0
    with table_writer(Path(dataset_dir) / REJECTS, REJECTS_SCHEMA) as write:
        for part in parts:
            write(pa.table([part.column("source"), pa.array([stage] * len(part), pa.string()),
                            part.column("reason")], schema=REJECTS_SCHEMA))
            n += len(part)
    return n


def rejects_table(dataset_dir: Path) -> pa.Table:
    """`rejects.parquet` as an Arrow table: path, stage, reason."""
    with seekable(Path(dataset_dir) / REJECTS) as source:
        return pq.read_table(source)


def read_rejects(dataset_dir: Path) -> list[dict]:
    """Rows of `rejects.parquet`: path, stage, reason."""
    return rejects_table(dataset_dir).to_pylist()


def write_tag_table(dataset_dir: Path, rows: list[tuple[str, int, int, int, float]]) -> None:
    """`tags.parquet` from (tag, category, count, train_count, score_sum) rows, in the order given."""
    table = pa.table({
        "tag": [r[0] for r in rows], "category": pa.array([r[1] for r in rows], pa.int16()),
        "count": [r[2] for r in rows], "train_count": [r[3] for r in rows],
        "mean_score": pa.array([r[4] / r[2] for r in rows], pa.float32()),
    })  # fmt: skip
    with atomic_path(Path(dataset_dir) / TAG_TABLE) as tmp:
        pq.write_table(table, tmp)


def read_tag_table(dataset_dir: Path) -> list[dict]:
    """Rows of `tags.parquet`, most frequent tag first."""
    return pq.read_table(Path(dataset_dir) / TAG_TABLE).to_pylist()
