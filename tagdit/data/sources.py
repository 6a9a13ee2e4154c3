"""One listing of the source per stage run, and the hash buckets its files fall in.

`list_source` walks `data.source` once (`tagdit.data.walk`: a folder, a URL or a user manifest),
streaming its rows into `<dataset>/work/listing.parquet` and hashing their stamps on the way (the
fingerprint, the crop stage's key input), with a log line every `PROGRESS_S` seconds; nothing per
file stays in memory. `source_listing` memoises that walk for the current flow run (or the current
`listing_scope`, a crop stage run outside a flow), so the crop stage's cache key, its stamp check and
its plan share one walk. A file's bucket is a stable hash of its sample key mod the bucket count:
adding a file changes only the bucket it falls in (docs/design.md §4). The crop stage sorts the
listing by bucket into `<dataset>/work/sources.parquet` (`tagdit.formats.sources`), where each crop
unit reads its own bucket's rows.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tagdit.config import PipelineConfig
from tagdit.data.crop import CropParams, SourceFile, process_bucket, sample_key
from tagdit.data.walk import WalkCounts, walk_source
from tagdit.files import sha256_text
from tagdit.formats.sources import LISTING, listing_writer, read_buckets, read_sources
from tagdit.formats.user_manifest import is_manifest
from tagdit.stores import check_reachable, is_url

log = logging.getLogger(__name__)
PROGRESS_S = 10.0  # seconds between the listing's progress lines


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a sample key: the order of rows inside a bucket, and the bucket."""
    return int(sha256_text("bucket", key)[:16], 16)


def bucket_of(key: str, buckets: int) -> int:
    """The hash bucket of a sample key."""
    return key_hash(key) % buckets


def choose_buckets(found: int, samples_per_shard: int) -> int:
    """The power of two >= found / samples_per_shard (at least 1): about one train shard per bucket."""
    n = 1
    while n * samples_per_shard < found:
        n *= 2
    return n


@dataclass(frozen=True)
class Listing:
    """Where a source's listing was streamed to, how many files (and sidecars) it found, their fingerprint."""

    path: Path
    found: int
    sidecars: int
    fingerprint: str  # hash of every file's stamp (path, size, mtime or version, sidecar stamp)


def list_source(source: str | Path, dst: Path) -> Listing:
    """Walk `source` once, streaming one listing row per file into `dst`; returns the `Listing`."""
    counts, h, t0 = WalkCounts(), hashlib.sha256(), time.monotonic()
    last = t0
    with listing_writer(dst) as w:
        for i, f in enumerate(walk_source(source, counts), 1):
            stamp = f.stamp
            h.update(stamp.encode())
            h.update(b"\0")
            w.add((f.rel, f.size, f.mtime_ns, f.sidecar, f.sidecar_stamp, f.tags, stamp))
            if (now := time.monotonic()) - last >= PROGRESS_S:
                log.info("listing %s: %d files so far (%.0f files/s)", source, i, i / (now - t0))
                last = now
    log.info("listing %s: %d files (+ %d sidecars) in %.1fs", source, w.rows, counts.sidecars, time.monotonic() - t0)
    return Listing(dst, w.rows, counts.sidecars, sha256_text(str(counts.sidecars), h.hexdigest()))


def keys_of(rels: list[str]) -> tuple[list[str], list[int]]:
    """Sample keys and their hashes (`sort_sources`: computed when the crop stage plans, not on each listing)."""
    keys = [sample_key(r) for r in rels]
    return keys, [key_hash(k) for k in keys]


def check_source(source: str | Path) -> None:
    """Fail before any work when `data.source` is not there: a missing folder or manifest, an unusable store."""
    if is_url(source):
        check_reachable(str(source), "data.source", must_exist=True)
    elif is_manifest(source):
        if not Path(source).is_file():
            raise FileNotFoundError(f"data.source={str(source)!r}: no such manifest file")
    elif not Path(source).is_dir():
        raise FileNotFoundError(f"data.source={str(source)!r} is not a folder")


_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("listing_scope", default=None)
_LISTINGS: dict[tuple[str, str, str], Listing] = {}  # (source, listing, run id) -> listing; one run's at a time


def _run_id() -> str | None:
    """The current listing scope, else the current Prefect flow run's id, else None."""
    if scope := _SCOPE.get():
        return scope
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        return str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    except Exception:  # no Prefect context at all
        return None


@contextmanager
def listing_scope() -> Iterator[None]:
    """Share one listing inside the block (a stage run outside a flow); a flow run is a scope of its own."""
    token = _SCOPE.set(_SCOPE.get() or _run_id() or uuid.uuid4().hex)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def source_listing(cfg: PipelineConfig) -> Listing:
    """The listing of `data.source` into `<dataset>/work/listing.parquet`, walked once per flow run or
    `listing_scope` (every call outside one walks)."""
    source, dst = cfg.data.source, cfg.dataset_dir / LISTING
    run = _run_id()
    memo = (str(source) if is_url(source) else str(Path(source).resolve()), str(dst), run or "")
    if run is None or memo not in _LISTINGS or not dst.exists():
        check_source(source)
        listing = list_source(source, dst)
        if run is None:
            return listing
        _LISTINGS.clear()  # a new run lists again; keep one run's listing
        _LISTINGS[memo] = listing
    return _LISTINGS[memo]


def bucket_count(cfg: PipelineConfig, listing: Listing) -> int:
    """`data.buckets` when set, else the count recorded in `<dataset>/dataset.json`, else `choose_buckets`."""
    return cfg.data.buckets or read_buckets(cfg.dataset_dir) or choose_buckets(listing.found, cfg.shards.samples_per_shard)


def bucket_files(manifest: Path, bucket: int) -> list[SourceFile]:
    """One bucket's files from the source manifest, in key-hash order (the order of its chunk rows)."""
    return [SourceFile(r["rel"], r["size"], r["mtime_ns"], r["sidecar"], r["sidecar_stamp"], r["tags"])
            for r in read_sources(manifest, bucket)]


def crop_bucket(base: str | Path, manifest: Path, bucket: int, p: CropParams, dst: Path,
                previous: Path | None) -> tuple[int, int]:
    """Crop one bucket (its rows read from the source manifest; `rel`s relative to `base`) into `dst`."""
    return process_bucket(base, bucket_files(manifest, bucket), p, dst, previous)
