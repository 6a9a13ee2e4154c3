"""Walking a source: every file under a folder or a URL, or every row of a user manifest, as a stream.

`walk_source` yields one `SourceFile` per file found, a folder at a time (never the whole tree in
memory for a local folder; an object store's listing is fetched in one `find`, as fsspec does).
A sidecar is `stem.txt` beside an image file `stem.<image extension>`: counted, not yielded; any
other file, hidden ones included, is yielded so that the crop stage accounts for it (a crop or a
reject). Hidden folders are not walked. A user manifest's rows (`tagdit.formats.user_manifest`) carry
their URI as `rel` and their `tags` in place of a sidecar's text.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tagdit.data.crop import IMAGE_EXTS, SourceFile
from tagdit.files import sha256_text
from tagdit.formats.user_manifest import is_manifest, manifest_rows
from tagdit.stores import StoreError, filesystem, is_url, object_version


@dataclass
class WalkCounts:
    """What a walk saw besides the files it yielded."""

    sidecars: int = 0


def source_base(source: str | Path) -> str | Path:
    """What a listed `rel` is relative to: `data.source` itself, or a manifest's folder."""
    if is_url(source):
        return str(source).rsplit("/", 1)[0] if is_manifest(source) else str(source)
    return Path(source).parent if is_manifest(source) else Path(source)


def _folder(reldir: str, entries: dict[str, tuple[int, int]], counts: WalkCounts) -> Iterator[SourceFile]:
    """The files of one folder ({name: (size, version)}), sidecars counted apart, in name order."""
    parts = {fn: os.path.splitext(fn) for fn in entries}
    images = {fn for fn, (_, ext) in parts.items() if ext.lower() in IMAGE_EXTS and not fn.startswith(".")}
    stems = {parts[fn][0] for fn in images}
    prefix = f"{reldir}/" if reldir else ""
    for fn in sorted(entries):
        stem, ext = parts[fn]
        if ext == ".txt" and stem in stems:
            counts.sidecars += 1
            continue
        side = f"{stem}.txt" if fn in images and f"{stem}.txt" in entries else None
        stamp = "{}:{}".format(*entries[side]) if side else ""
        size, version = entries[fn]
        yield SourceFile(prefix + fn, size, version, prefix + side if side else None, stamp)


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:  # dangling link: found, and rejected as unreadable later
        st = os.lstat(path)
    return st.st_size, st.st_mtime_ns


def folder_files(source: Path, counts: WalkCounts) -> Iterator[SourceFile]:
    """Every file under a local folder, one folder at a time."""
    top = str(source)
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        reldir = "" if dirpath == top else os.path.relpath(dirpath, top).replace(os.sep, "/")
        yield from _folder(reldir, {fn: _stat(f"{dirpath}/{fn}") for fn in filenames}, counts)


def url_files(url: str, counts: WalkCounts) -> Iterator[SourceFile]:
    """Every object under a URL (one `find`), its object version standing for an mtime."""
    fs, root = filesystem(url)
    try:
        fs.invalidate_cache(root)  # a listing cached by an earlier stage run of this process may be stale
        found = fs.find(root, detail=True)
    except Exception as e:
        raise StoreError(f"data.source={url}: cannot list it ({type(e).__name__}: {e})") from None
    by_dir: dict[str, dict[str, tuple[int, int]]] = {}
    prefix = root.rstrip("/") + "/"
    for name, info in found.items():
        if info.get("type") == "directory" or not name.startswith(prefix):
            continue
        reldir, _, fn = name[len(prefix):].rpartition("/")
        if fn and not any(part.startswith(".") for part in reldir.split("/") if part):
            by_dir.setdefault(reldir, {})[fn] = (int(info.get("size") or 0), object_version(info))
    del found
    for reldir in sorted(by_dir):
        yield from _folder(reldir, by_dir.pop(reldir), counts)


def manifest_files(source: str | Path) -> Iterator[SourceFile]:
    """Every row of a user manifest; a local file is stat'ed (its stamp), a URL row is stamped by its row."""
    base = source_base(source)
    for uri, tags in manifest_rows(source):
        size, version = -1, 0
        if not is_url(uri) and not is_url(base):
            path = os.path.join(base, uri)  # not a Path: Python 3.11's pathlib interns every name it parses
            size, version = _stat(path) if os.path.lexists(path) else (-1, 0)
        yield SourceFile(uri, size, version, None, f"tags:{sha256_text(tags)[:16]}" if tags else "", tags)


def walk_source(source: str | Path, counts: WalkCounts) -> Iterator[SourceFile]:
    """Every file of `data.source`: a manifest's rows, a URL's objects or a local folder's files."""
    if is_manifest(source):
        return manifest_files(source)
    if is_url(source):
        return url_files(str(source), counts)
    return folder_files(Path(source), counts)
