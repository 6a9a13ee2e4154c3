"""One listing of the source tree per stage run, and the hash buckets its files fall in.

`list_sources` walks `data.source` once; `source_listing` memoises that walk for the current flow
run (or the current `listing_scope`, a crop stage run outside a flow), so the crop stage's cache
key, its stamp check and its plan share one walk. A file's bucket is a stable hash of its sample
key mod the bucket count: adding a file changes only the bucket it falls in (docs/design.md §4).
The listing is written as `<dataset>/work/sources.parquet` (`tagdit.formats.sources`), where the
crop units read their bucket's rows.
"""

from __future__ import annotations

import contextvars
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tagdit.config import PipelineConfig
from tagdit.data.crop import CropParams, SourceFile, is_image_name, process_bucket, sample_key
from tagdit.files import sha256_text
from tagdit.formats.sources import read_buckets, read_sources


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


def list_sources(source: Path) -> tuple[list[SourceFile], int]:
    """(every file under `source` but sidecars, sorted; the number of sidecars). Hidden folders are skipped.

    A sidecar is `stem.txt` beside an image file `stem.<image extension>`; any other file, hidden
    ones included, is listed so that the crop stage accounts for it (a crop or a reject).
    """
    found, sidecars = [], 0
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        stems = {os.path.splitext(fn)[0] for fn in filenames if is_image_name(fn)}
        for fn in sorted(filenames):
            stem, ext = os.path.splitext(fn)
            if ext == ".txt" and stem in stems:
                sidecars += 1
                continue
            p = Path(dirpath) / fn
            try:
                st = p.stat()
            except OSError:  # dangling link: found, and rejected as unreadable later
                st = p.lstat()
            side = f"{stem}.txt" if is_image_name(fn) and f"{stem}.txt" in filenames else None
            side_stamp = ""
            if side:
                sst = (Path(dirpath) / side).stat()
                side_stamp = f"{sst.st_size}:{sst.st_mtime_ns}"
            rel = p.relative_to(source).as_posix()
            side_rel = (Path(rel).parent / side).as_posix() if side else None
            found.append(SourceFile(rel, st.st_size, st.st_mtime_ns, side_rel, side_stamp))
    return sorted(found, key=lambda f: f.rel), sidecars


@dataclass(frozen=True)
class Listing:
    """The files found under a source folder, the sidecars counted apart, and their fingerprint."""

    files: list[SourceFile]
    sidecars: int

    @property
    def fingerprint(self) -> str:
        """Hash of every file's stamp (path, size, mtime, sidecar stamp): the crop stage's key input."""
        return sha256_text(str(self.sidecars), *(f.stamp for f in self.files))

    def rows(self, buckets: int) -> list[dict]:
        """Source manifest rows (`tagdit.formats.sources`): each file with its key and bucket."""
        out = []
        for f in self.files:
            key = sample_key(f.rel)
            out.append({"rel": f.rel, "size": f.size, "mtime_ns": f.mtime_ns, "sidecar": f.sidecar,
                        "sidecar_stamp": f.sidecar_stamp, "key": key, "bucket": bucket_of(key, buckets)})
        return out


_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("listing_scope", default=None)
_LISTINGS: dict[tuple[str, str], Listing] = {}  # (source, run id) -> listing; one run's entries at a time


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


def source_listing(source: str | Path) -> Listing:
    """The listing of `source`, walked once per flow run or `listing_scope` (every call outside one walks)."""
    run = _run_id()
    memo = (str(Path(source).resolve()), run or "")
    if run is None or memo not in _LISTINGS:
        listing = Listing(*list_sources(Path(source))) if Path(source).is_dir() else Listing([], 0)
        if run is None:
            return listing
        _LISTINGS.clear()  # a new run lists again; keep one run's listing in memory
        _LISTINGS[memo] = listing
    return _LISTINGS[memo]


def bucket_count(cfg: PipelineConfig, listing: Listing) -> int:
    """`data.buckets` when set, else the count recorded in `<dataset>/dataset.json`, else `choose_buckets`."""
    return cfg.data.buckets or read_buckets(cfg.dataset_dir) or \
        choose_buckets(len(listing.files), cfg.shards.samples_per_shard)


def bucket_files(manifest: Path, bucket: int) -> list[SourceFile]:
    """One bucket's files from the source manifest, in key-hash order (the order of its chunk rows)."""
    rows = sorted(read_sources(manifest, bucket), key=lambda r: key_hash(r["key"]))
    return [SourceFile(r["rel"], r["size"], r["mtime_ns"], r["sidecar"], r["sidecar_stamp"]) for r in rows]


def crop_bucket(source: Path, manifest: Path, bucket: int, p: CropParams, dst: Path,
                previous: Path | None) -> tuple[int, int]:
    """Crop one bucket (its rows read from the source manifest) into `dst`; returns (ok, rejected)."""
    return process_bucket(source, bucket_files(manifest, bucket), p, dst, previous)
