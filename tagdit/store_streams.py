"""Files a trainer reads straight from the store: which ones, and a forward read of each (no copy first).

A stage that streams names its files (`Stage.streams`); `pull_tree` skips them, so a working copy
holds a streamed file only when it is the store's current object. `stream_sources` lists a working
copy's files as the store holds them and says what to open for each: the local file when it is
here, else its URL, read forward in large blocks (`StoreStream`), or with `cache` the working-copy
path, which `open_source` fills from the store on first open (`data.shard_cache=local`). Names stay
those of the files, so what a run reads, and in which order, does not depend on where it reads from.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from tagdit.store_folders import store_names
from tagdit.stores import StoreError, fetch, filesystem, is_url, remote_of

log = logging.getLogger(__name__)
T = TypeVar("T")

BLOCK = 8 << 20  # bytes per ranged GET: one request per 8 MiB read forward, seeks within it are free


def stream_sources(folder: str | Path, wanted: Callable[[str], bool], cache: bool = False) -> list[str]:
    """What to open for each file named `wanted(name)` directly in `folder`, in name order.

    A plain folder: its files. A working copy: the store's files and this copy's, each as its local
    path when here (or with `cache`: fetched here on first open), else as its URL (streamed).
    """
    folder = Path(folder)
    here = {p.name for p in folder.iterdir() if p.is_file() and wanted(p.name)} if folder.is_dir() else set()
    url = remote_of(folder)
    if url is None:
        return [str(folder / n) for n in sorted(here)]
    stored = {n for n in store_names(folder) if "/" not in n and wanted(n)}
    return [str(folder / n) if n in here or cache else f"{url}/{n}" for n in sorted(here | stored)]


def readable(path: str | Path) -> str:
    """What to open for one file of a folder (`open_source`): the file when here (a working copy holds
    only current objects), else the store's object, streamed."""
    url = remote_of(path)
    return str(path) if url is None or Path(path).exists() else url


@contextmanager
def seekable(path: str | Path) -> Iterator[str | BinaryIO]:
    """One file of a folder for a reader that seeks (a parquet table's footer, then some row groups): the
    file when here, else the store's object opened for ranged reads of just what is read."""
    source = readable(path)
    if not is_url(source):
        yield source
        return
    fs, rpath = filesystem(source)
    try:
        f = fs.open(rpath, "rb", block_size=BLOCK)
    except Exception as e:
        raise StoreError(f"cannot read {source} ({type(e).__name__}: {e})") from None
    with f:
        yield f


READ_AHEAD = 16  # files `each_read` reads from a store at once (each a few ranged GETs)


def each_read(fn: Callable[[Path], T], paths: Iterable[str | Path]) -> Iterator[T]:
    """`fn(path)` for each path, in order: for files of a working copy (read from the store when not
    here) up to `READ_AHEAD` at once in threads, since each read waits on the store; plain files one
    after another."""
    paths = [Path(p) for p in paths]
    if not paths or remote_of(paths[0]) is None:
        yield from map(fn, paths)
        return
    with ThreadPoolExecutor(READ_AHEAD) as pool:
        window: deque[Future[T]] = deque()
        for p in paths:
            window.append(pool.submit(fn, p))
            if len(window) >= READ_AHEAD:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def open_source(source: str, buffering: int = 1 << 20) -> BinaryIO | StoreStream:
    """Open what `stream_sources` named for reading: a URL streamed, a local file, or a working-copy
    file that is not here yet downloaded first (the local cache)."""
    if is_url(source):
        return StoreStream(source)
    path = Path(source)
    if not path.exists() and remote_of(path) is not None:
        log.info("store: caching %s", remote_of(path))
        fetch(path)
    return open(path, "rb", buffering=buffering)  # noqa: SIM115 (the caller closes it)


def sha256_source(source: str) -> str:
    """sha256 of what `stream_sources` named: a local file, or a store object read forward."""
    h = hashlib.sha256()
    with open_source(source) as f:
        while chunk := f.read(BLOCK):
            h.update(chunk)
    return h.hexdigest()


class StoreStream:
    """A store object as a read-only binary file read forward in `BLOCK`-sized ranged GETs.

    A read that fails is tried once more on a new connection from the same byte; a second failure
    raises StoreError naming the URL and the byte (a failed read never ends a shard early).
    """

    def __init__(self, url: str):
        self.url, self._pos = url, 0
        self._fs, self._path = filesystem(url)
        self._file = self._open()

    def _open(self) -> Any:
        try:
            return self._fs.open(self._path, "rb", block_size=BLOCK, cache_type="readahead")
        except Exception as e:  # gone since it was listed, no permission, no connection
            raise StoreError(f"cannot read {self.url} ({type(e).__name__}: {e})") from None

    def read(self, size: int = -1) -> bytes:
        for attempt in (1, 2):
            try:
                self._file.seek(self._pos)
                data = self._file.read(size)
                break
            except Exception as e:
                if attempt == 2:
                    raise StoreError(f"reading {self.url} failed at byte {self._pos} twice "
                                     f"({type(e).__name__}: {e})") from None
                log.warning("store: reading %s failed at byte %d (%s: %s); trying once more", self.url,
                            self._pos, type(e).__name__, e)
                self._close_quietly()
                self._file = self._open()
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("StoreStream seeks from the start only")
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def _close_quietly(self) -> None:
        try:
            self._file.close()
        except Exception:  # a broken connection: the new one replaces it
            pass

    def close(self) -> None:
        self._close_quietly()

    def __enter__(self) -> StoreStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
