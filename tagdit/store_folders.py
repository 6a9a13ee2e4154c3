"""What a stage asks of a folder that may be a working copy of a URL folder (`tagdit.stores`), beyond
pulls and pushes: which files it holds and their sizes, counting the store's objects not downloaded
here, a file to open here, and deleting files and folders here and in the store alike.
"""

from __future__ import annotations

import shutil
from fnmatch import fnmatch
from pathlib import Path

from tagdit.stores import fetch, filesystem, remote_of, stored_objects, unpublish


def names_in(folder: str | Path, pattern: str = "*") -> set[str]:
    """Names of the files directly in `folder` matching `pattern` (fnmatch): here, and for a working copy
    the store's too (a stage that reads units from the store does not pull them: `Stage.reads_store`)."""
    folder = Path(folder)
    names = {p.name for p in folder.glob(pattern) if p.is_file()} if folder.is_dir() else set()
    stored = stored_objects(folder) or {}
    return names | {n for n in stored if "/" not in n and fnmatch(n, pattern)}


def sizes_in(folder: str | Path) -> dict[str, int]:
    """{name: size} of the files directly in `folder`: the store's, then this copy's where it has them."""
    folder = Path(folder)
    sizes = {n: int(i["size"]) for n, i in (stored_objects(folder) or {}).items() if "/" not in n}
    if folder.is_dir():
        sizes.update({p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()})
    return sizes


def present(path: str | Path) -> bool:
    """Whether a file is here or, for a working-copy file, in the store."""
    path = Path(path)
    if path.exists():
        return True
    url = remote_of(path)
    if url is None:
        return False
    fs, rpath = filesystem(url)
    return bool(fs.exists(rpath))


def local_copy(path: str | Path) -> Path:
    """A file to open here: itself, or a working-copy file not here downloaded from the store first."""
    path = Path(path)
    return path if path.exists() or remote_of(path) is None else fetch(path)


def remove(path: str | Path) -> None:
    """Delete a file here and, for a working-copy file, its object in the store (a stale unit)."""
    Path(path).unlink(missing_ok=True)
    unpublish(path)


def remove_tree(path: str | Path) -> None:
    """Delete a folder here and, for a working-copy folder, its objects in the store (a forced stage's outputs)."""
    shutil.rmtree(path, ignore_errors=True)
    unpublish(path)


def store_names(local: str | Path) -> list[str]:
    """The names (relative paths) of the objects the store holds under a working-copy folder ([] for a plain path)."""
    return sorted(stored_objects(local) or {})
