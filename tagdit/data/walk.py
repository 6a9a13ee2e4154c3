"""Walking a source: every file under a folder or a URL, or every row of a user manifest, as a stream.

`walk_source` yields one `SourceFile` per file found, a folder at a time, never the whole tree in
memory: a local folder through `os.walk`, an object store's folder by folder, several listed at once.
A sidecar is `stem.txt` beside an image file `stem.<image extension>`: counted, not yielded; any
other file, hidden ones included, is yielded so that the crop stage accounts for it (a crop or a
reject). Hidden folders are not walked. A user manifest's rows (`tagdit.formats.user_manifest`) carry
their URI as `rel` and their `tags` in place of a sidecar's text.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


LIST_AHEAD = 16  # folders of a URL source listed at once, ahead of the one being yielded


def _url_folder(fs: Any, path: str) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """One folder of a store: its objects {name: (size, version)} and its subfolders' names. The
    listing is dropped from fsspec's cache at once, so a walk holds only the folders in flight."""
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:  # gone since its parent was listed (or an empty root)
        return {}, []
    finally:
        fs.invalidate_cache(path)
    files, dirs = {}, []
    for info in entries:
        name = info["name"].rstrip("/").rpartition("/")[2]
        if not name or info["name"].rstrip("/") == path.rstrip("/"):
            continue
        if info.get("type") == "directory":
            dirs.append(name)
        else:
            files[name] = (int(info.get("size") or 0), object_version(info))
    return files, sorted(dirs)


def url_files(url: str, counts: WalkCounts) -> Iterator[SourceFile]:
    """Every object under a URL, a folder at a time in the order a local folder is walked, its
    object version standing for an mtime. Folders are listed `LIST_AHEAD` at once (one request per
    1,000 objects of a folder), so a source kept in many folders lists in parallel, and memory holds
    the folders in flight, not the source."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    todo: deque[str] = deque([""])  # folders relative to the root, depth first in name order
    ahead: dict[str, Future] = {}
    with ThreadPoolExecutor(LIST_AHEAD, thread_name_prefix="tagdit-list") as pool:
        try:
            while todo:
                for reldir in itertools.islice(todo, LIST_AHEAD):
                    if reldir not in ahead:
                        ahead[reldir] = pool.submit(_url_folder, fs, f"{root}/{reldir}" if reldir else root)
                reldir = todo.popleft()
                files, dirs = ahead.pop(reldir).result()
                todo.extendleft(reversed([f"{reldir}/{d}" if reldir else d for d in dirs if not d.startswith(".")]))
                yield from _folder(reldir, files, counts)
        except Exception as e:
            raise StoreError(f"data.source={url}: cannot list it ({type(e).__name__}: {e})") from None
        finally:
            for future in ahead.values():
                future.cancel()


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
