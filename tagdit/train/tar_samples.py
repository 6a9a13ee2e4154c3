"""WebDataset samples of a local, uncompressed tar shard, read ~20x faster than Python's tarfile.

The training loader spends most of its time splitting shards into members; this reads the 512-byte
tar headers directly (ustar/GNU/pax names; the magic, or else the checksum, verified) and groups members into samples
exactly as `webdataset.tariterators.tarfile_samples` does: `__key__` = the member name up to the
first dot of its base name, `__url__`, and one lower-cased extension -> bytes entry per member.
Anything else (a URL, a compressed shard) goes through webdataset.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

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


def tar_members(f: BinaryIO, name: str) -> Iterator[tuple[str, bytes]]:
    """(member name, contents) of the regular files in tar stream `f`, in archive order."""
    long_name = None
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK or header.count(0) == _BLOCK:
            return
        if header[257:262] != b"ustar" and not _checksum_ok(header):  # summing costs more than parsing
            raise ValueError(f"{name}: bad tar header checksum at byte {f.tell() - _BLOCK}")
        size, kind = _number(header[124:136]), header[156:157]
        body = f.read(size)
        if len(body) < size:
            raise ValueError(f"{name}: truncated tar member at byte {f.tell() - len(body)}")
        f.read(-size % _BLOCK)
        if kind in (b"L", b"x"):  # the next member's long name (GNU) or pax extended header
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
        yield member, body


def tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, as webdataset groups them."""
    path = Path(url)
    if not url.endswith(".tar") or not path.is_file():
        from webdataset.tariterators import tarfile_samples

        yield from tarfile_samples([{"url": url}])
        return
    sample: dict[str, Any] | None = None
    with open(path, "rb", buffering=1 << 20) as f:
        for member, body in tar_members(f, url):
            if ("/" not in member and member.startswith("__") and member.endswith("__")) or _META.match(member):
                continue
            m = _KEY_EXT.match(member)
            if m is None:
                continue
            key, ext = m.group(1), m.group(2).lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if ext in sample:
                raise ValueError(f"{member}: duplicate file name in tar file {url}")
            sample[ext] = body
    if sample is not None:
        yield sample
