"""Crop and tag chunks: the per-chunk parquet files under `<dataset>/work/crop/` and `work/tag/`.

A crop chunk has one row per source file found (`CROP_CHUNK_SCHEMA`): the encoded square crop, or
`ok=False` and the reason it was rejected, and the file's `stamp` (path, size, mtime, sidecar stamp:
an unchanged file's row is copied on the next run). A tag chunk has one row per cropped sample of
the crop chunk it was made from, in the same order (`TAG_CHUNK_SCHEMA`), with the `input` it was
tagged from (source sha256 + sidecar text) and, in the file's metadata, the key of the tagger and
settings that made it. Both are written atomically; the
readers refuse a file whose schema is not the format's, naming the file and the difference, and
read a working-copy chunk that is not here from the store (footer and columns only: `seekable`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagdit.files import atomic_path
from tagdit.store_streams import seekable

CROP_CHUNK_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("stamp", pa.string()), ("ok", pa.bool_()), ("reason", pa.string()),
    ("sha256", pa.string()), ("orig_size", pa.list_(pa.int32())), ("crop_box", pa.list_(pa.int32())),
    ("image", pa.binary()), ("sidecar", pa.string()),
])  # fmt: skip
TAG_CHUNK_SCHEMA = pa.schema([
    ("key", pa.string()), ("input", pa.string()), ("tags", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
    ("categories", pa.list_(pa.int16())), ("rating", pa.string()),
])  # fmt: skip


def chunk_name(bucket: int, digest: str) -> str:
    """`chunk-00012-<digest>.parquet`: a crop or tag chunk of hash bucket `bucket`, named by its inputs' digest."""
    return f"chunk-{bucket:05d}-{digest}.parquet"


def chunk_bucket(name: str) -> int:
    """The hash bucket of a chunk file name (`chunk_name`)."""
    return int(name.split("-")[1])


def _write(rows: list[dict], schema: pa.Schema, dst: Path, meta: dict[str, str] | None = None) -> None:
    with atomic_path(dst) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema.with_metadata(meta or {})), tmp)


def _check(path: Path, got: pa.Schema, want: pa.Schema, kind: str) -> None:
    """Raise a ValueError naming `path` unless its schema is the format's."""
    if not got.equals(want, check_metadata=False):
        raise ValueError(f"{path} is not a {kind} chunk: its schema is\n{got}\nwhere a {kind} chunk has\n{want}")


def write_crop_chunk(rows: list[dict], dst: Path) -> None:
    """Write crop rows (`CROP_CHUNK_SCHEMA` fields) to `dst`, atomically."""
    _write(rows, CROP_CHUNK_SCHEMA, dst)


def read_crop_chunk(path: Path, columns: list[str] | None = None, ok_only: bool = False) -> pa.Table:
    """`columns` (all by default) of a crop chunk; with `ok_only` only the cropped rows, `ok` included."""
    if ok_only and columns is not None and "ok" not in columns:
        columns = ["ok", *columns]
    with seekable(path) as source:
        _check(path, pq.read_schema(source), CROP_CHUNK_SCHEMA, "crop")
        table = pq.read_table(source, columns=columns)
    return table.filter(pc.field("ok")) if ok_only else table


def write_tag_chunk(rows: list[dict], dst: Path, tagger: str = "") -> None:
    """Write tag rows (`TAG_CHUNK_SCHEMA` fields) to `dst`, atomically, recording the `tagger` key that made them."""
    _write(rows, TAG_CHUNK_SCHEMA, dst, {"tagger": tagger})


def tag_chunk_tagger(path: Path) -> str:
    """The tagger key a tag chunk was written with ("" when none was recorded)."""
    with seekable(path) as source:
        meta = pq.read_schema(source).metadata or {}
    return meta.get(b"tagger", b"").decode()


def read_tag_chunk(path: Path) -> pa.Table:
    """Every row of a tag chunk."""
    with seekable(path) as source:
        _check(path, pq.read_schema(source), TAG_CHUNK_SCHEMA, "tag")
        return pq.read_table(source)


def tag_chunk_rows(path: Path) -> int:
    """The number of rows of a tag chunk (its footer only)."""
    with seekable(path) as source:
        meta = pq.read_metadata(source)
    _check(path, meta.schema.to_arrow_schema(), TAG_CHUNK_SCHEMA, "tag")
    return meta.num_rows
