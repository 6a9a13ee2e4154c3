"""WebDataset samples of an uncompressed tar shard, local or in a store, read ~20x faster than Python's tarfile.

The training loader spends most of its time splitting shards into members; this reads the 512-byte
tar headers directly (ustar/GNU/pax names; the magic, or else the checksum, verified) and groups members into samples
exactly as `webdataset.tariterators.tarfile_samples` does: `__key__` = the member name up to the
first dot of its base name, `__url__`, and one lower-cased extension -> bytes entry per member.
`TarShard` reads samples by index, forward, seeking past the bodies of the samples it passes over;
a shard in a store is read the same way, through `tagdit.store_streams` (streamed or cached).
Anything else (a compressed shard) goes through webdataset.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from tagdit.store_streams import open_source

_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file types (7: contiguous file)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped metadata members


def _number(field: bytes) -> int:
    """A tar header number: octal text, or base-256 when the top bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    field = field.rstrip(b"\0 ").lstrip()
    return int(field, 8) if field else 0


def _checksum_ok(header: bytes) -> bool:
    """Whether a header's checksum field matches its bytes (the field itself counted as spaces)."""
    return sum(header) - sum(header[148:156]) + 8 * 32 == _number(header[148:156])


def _pax_path(body: bytes) -> str | None:
    """The `path` record of a pax extended header, if any."""
    pos = 0
    while pos < len(body):
        space = body.index(b" ", pos)
        length = int(body[pos:space])
        key, _, value = body[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def _members(f: BinaryIO, name: str) -> Iterator[tuple[str, int, int]]:
    """(member name, body offset, body size) of the regular files in tar file `f`, in archive order.

    Bodies are seeked past, not read: the caller reads the ones it wants (`f.seek`, `f.read`).
    """
    long_name, pos = None, 0
    while True:
        f.seek(pos)
        header = f.read(_BLOCK)
        if len(header) < _BLOCK or header.count(0) == _BLOCK:
            return
        if header[257:262] != b"ustar" and not _checksum_ok(header):  # summing costs more than parsing
            raise ValueError(f"{name}: bad tar header checksum at byte {pos}")
        size, kind = _number(header[124:136]), header[156:157]
        offset, pos = pos + _BLOCK, pos + _BLOCK + size + (-size % _BLOCK)
        if kind in (b"L", b"x"):  # the next member's long name (GNU) or pax extended header
            body = f.read(size)
            long_name = body.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(body)
            continue
        member = long_name
        long_name = None
        if kind not in _REGULAR:
            continue
        if member is None:
            member = header[:100].rstrip(b"\0").decode("utf-8")
            if header[257:265] == b"ustar\x0000" and header[345] != 0:
                member = header[345:500].rstrip(b"\0").decode("utf-8") + "/" + member
        yield member, offset, size


def _sample_members(f: BinaryIO, url: str) -> Iterator[tuple[str, list[tuple[str, int, int]]]]:
    """(key, [(extension, body offset, size), ...]) of each sample, grouped as webdataset groups members."""
    key, members = None, []
    for member, offset, size in _members(f, url):
        if ("/" not in member and member.startswith("__") and member.endswith("__")) or _META.match(member):
            continue
        m = _KEY_EXT.match(member)
        if m is None:
            continue
        if m.group(1) != key:
            if key is not None:
                yield key, members
            key, members = m.group(1), []
        members.append((m.group(2).lower(), offset, size))
    if key is not None:
        yield key, members


class TarShard:
    """One shard's samples by index, read forward: the samples passed over are seeked past, not read."""

    def __init__(self, url: str, buffering: int = 1 << 20):
        self.url, self.index = url, 0  # index: of the next sample
        if url.endswith(".tar"):  # a local file, a store's object read forward, or one fetched into the cache
            self._file: BinaryIO | None = open_source(url, buffering)  # type: ignore[assignment] (closed in close())
            self._next: Iterator[Any] = _sample_members(self._file, url)
        else:
            from webdataset.tariterators import tarfile_samples

            self._file, self._next = None, iter(tarfile_samples([{"url": url}]))

    def _read(self, key: str, members: list[tuple[str, int, int]]) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": key, "__url__": self.url}
        for ext, offset, size in members:
            if ext in sample:
                raise ValueError(f"{key}.{ext}: duplicate file name in tar file {self.url}")
            self._file.seek(offset)  # type: ignore[union-attr]
            sample[ext] = self._file.read(size)  # type: ignore[union-attr]
        return sample

    def samples(self, indices: Iterable[int] | None = None) -> Iterator[dict[str, Any]]:
        """Samples `indices` (ascending, from `self.index` on), or all the rest."""
        wanted = iter(indices) if indices is not None else None
        target = next(wanted, None) if wanted is not None else self.index
        while target is not None:
            try:
                item = next(self._next)
            except StopIteration:
                if indices is None:
                    return
                raise ValueError(f"{self.url} has no sample {target}: it has {self.index} "
                                 "(the shard changed since its samples were counted)") from None
            self.index += 1
            if self.index - 1 < target:
                continue
            yield item if self._file is None else self._read(*item)
            target = next(wanted, None) if wanted is not None else self.index

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, as webdataset groups them."""
    shard = TarShard(url)
    try:
        yield from shard.samples()
    finally:
        shard.close()


def tar_sample_count(url: str) -> int:
    """The number of samples in one shard (for a local tar, from its headers alone: unbuffered, so bodies are not read)."""
    shard = TarShard(url, buffering=0)
    try:
        return sum(1 for _ in shard._next)
    finally:
        shard.close()


def first_samples(urls: list[str], limit: int) -> list[dict[str, Any]]:
    """The first `limit` raw samples of these shards, in order (a shard after the limit is not opened)."""
    raws: list[dict[str, Any]] = []
    for url in urls:
        if len(raws) == limit:
            break
        raws.extend(itertools.islice(tar_samples(url), limit - len(raws)))
    return raws
