"""Crash-safe file writing and content hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tagdit.stores import publish


@contextlib.contextmanager
def atomic_path(dst: str | Path, upload: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `dst`; rename it into place only if the block succeeds.

    In a working copy of a URL folder (`tagdit.stores`) the finished file is then uploaded
    (`upload=False`: an intermediate file the store need not hold).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # make the bytes durable before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    if upload:
        publish(dst)


def write_bytes_atomic(dst: str | Path, data: bytes, upload: bool = True) -> None:
    with atomic_path(dst, upload) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(dst: str | Path, obj: Any, upload: bool = True) -> None:
    write_bytes_atomic(dst, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), upload)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def remove_stale_temps(folder: str | Path) -> int:
    """Delete temp files a killed run left behind (`.name.tmp-PID`); returns how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_STORED_HASHES: dict[str, str] = {}  # absolute path -> sha256 of a working-copy file not here


def remember_fingerprint(path: str | Path, size: int, mtime_ns: int, sha256: str) -> None:
    """Take `sha256` as the file's hash while it keeps this size and mtime (from a stamp that recorded
    them): the files a stage did not rewrite are not read again."""
    _FILE_HASHES[(str(Path(path).resolve()), size, mtime_ns)] = sha256


def remember_stored(path: str | Path, sha256: str) -> None:
    """Take `sha256` as the hash of a working-copy file that is not here, whose store object a stamp
    recorded (checked against the store's listing): its bytes are never downloaded just to be hashed."""
    _STORED_HASHES[str(Path(path).absolute())] = sha256


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) within the process (for a working-copy file not
    here: the hash its stamp recorded, `remember_stored`)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        if (sha := _STORED_HASHES.get(str(p.absolute()))) is not None:
            return sha
        raise
    k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if k not in _FILE_HASHES:
        _FILE_HASHES[k] = sha256_file(p)
    return _FILE_HASHES[k]
