"""A user's manifest of source images: `data.source` naming a `.parquet`, `.csv` or `.jsonl` file.

One row per image (img2dataset's input habit): a URI column, `url` or `path` (a URL, an absolute
path, or a path relative to the manifest's folder), so one manifest may join several folders or
buckets; and optionally `tags`, text (or, in parquet and JSONL, a list of strings) that plays the
role of a sidecar `name.txt`. Other columns are ignored. The rows are read as a stream
(`manifest_rows`); a malformed manifest is refused by line (row, for parquet) and column.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

SUFFIXES = (".parquet", ".csv", ".jsonl")
URI_COLUMNS = ("url", "path")


class ManifestError(ValueError):
    """A malformed user manifest: the message names the file, the line and the column."""


def is_manifest(source: str | Path) -> bool:
    """Whether `data.source` names a manifest file (by its suffix) rather than a folder."""
    return str(source).lower().endswith(SUFFIXES)


def _open(source: str | Path) -> IO[bytes]:
    from tagdit.stores import filesystem, is_url

    if is_url(source):
        fs, path = filesystem(str(source))
        return fs.open(path, "rb")
    return open(source, "rb")


def _uri_column(name: str, columns: list[str]) -> str:
    col = next((c for c in URI_COLUMNS if c in columns), None)
    if col is None:
        raise ManifestError(f"{name}: no 'url' or 'path' column (it has {', '.join(map(repr, columns)) or 'none'})")
    return col


def _row(name: str, where: str, uri_col: str, row: dict[str, Any]) -> tuple[str, str | None]:
    """(uri, tags text) of one row, or a ManifestError naming its line and column."""
    uri, tags = row.get(uri_col), row.get("tags")
    if not isinstance(uri, str) or not uri.strip():
        kind = "empty" if uri is None or isinstance(uri, str) else f"not text ({type(uri).__name__})"
        raise ManifestError(f"{name} {where}: column {uri_col!r} is {kind}")
    if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
        tags = ", ".join(tags)
    if tags is not None and not isinstance(tags, str):
        raise ManifestError(f"{name} {where}: column 'tags' is not text or a list of strings")
    return uri.strip(), tags or None


def _csv_rows(name: str, f: IO[bytes]) -> Iterator[tuple[str, str | None]]:
    reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
    uri_col = _uri_column(name, list(reader.fieldnames or []))
    for row in reader:
        if None in row:
            raise ManifestError(f"{name} line {reader.line_num}: more fields than the header's "
                                f"{len(reader.fieldnames or [])}")
        yield _row(name, f"line {reader.line_num}", uri_col, row)


def _jsonl_rows(name: str, f: IO[bytes]) -> Iterator[tuple[str, str | None]]:
    uri_col = None
    for i, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ManifestError(f"{name} line {i}: not JSON") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{name} line {i}: not a JSON object")
        uri_col = uri_col or _uri_column(f"{name} line {i}", list(row))
        yield _row(name, f"line {i}", uri_col, row)


def _parquet_rows(name: str, f: IO[bytes]) -> Iterator[tuple[str, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f, pre_buffer=False)  # streamed: pre-buffering would hold the whole file
    except pa.ArrowInvalid as e:
        raise ManifestError(f"{name}: not a parquet file ({e})") from None
    uri_col = _uri_column(name, pf.schema_arrow.names)
    columns = [uri_col] + (["tags"] if "tags" in pf.schema_arrow.names else [])
    i = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        for row in batch.to_pylist():
            i += 1
            yield _row(name, f"row {i}", uri_col, row)


def manifest_rows(source: str | Path) -> Iterator[tuple[str, str | None]]:
    """(uri as written, tags text or None) of every row of a user manifest, streamed and checked."""
    name = str(source).rsplit("/", 1)[-1]
    read = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".parquet": _parquet_rows}[Path(name).suffix.lower()]
    try:
        f = _open(source)
    except FileNotFoundError:
        raise FileNotFoundError(f"data.source={source!s}: no such manifest file") from None
    with f:
        try:
            yield from read(name, f)
        except UnicodeDecodeError as e:
            raise ManifestError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise ManifestError(f"{name}: not CSV ({e})") from None
