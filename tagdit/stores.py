"""Folders that may be URLs: `s3://`, `gs://`, `hf://`, `file://` or a plain path, through fsspec.

A dataset or run root on a URL is worked on in a local working copy (`working_dir`: under
`TAGDIT_STORE_CACHE`, default `~/.cache/tagdit/stores/<scheme>/<bucket>/<key>`): every stage reads
and writes plain files there, each finished unit is uploaded the moment it lands (`publish`, called
by the atomic writers), a stage's folder is reconciled with the store when the stage ends
(`push_tree`), and a stage first brings down what the store has that the copy lacks (`pull_tree`),
but for the files it reads straight from the store (trainers stream shards: `tagdit.store_streams`).
Which copy is which is a pure function of the path, so worker processes and torchrun ranks publish
without being told (docs/guide.md, "Data in a bucket").

Credentials and endpoints come from the standard environment and fsspec's configuration (for S3:
`AWS_*` variables, `~/.aws`, `AWS_ENDPOINT_URL` for an S3-compatible server), never from configs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

URL_SCHEMES = ("s3", "gs", "gcs", "hf", "az", "abfs", "memory", "file")
CACHE_ENV = "TAGDIT_STORE_CACHE"
PULL_BATCH = 256  # files a pull downloads at once (concurrently on s3fs/gcsfs); each batch lands whole
WEIGHTS = ("*.safetensors", "*.pt")  # a checkpoint folder's big files (meta.json, pins and `latest` are small)


class StoreError(RuntimeError):
    """A store that cannot be reached or read, with the URL and the setting that named it."""


def is_url(value: object) -> bool:
    """Whether `value` is a `scheme://...` string of a known fsspec scheme (not a plain path)."""
    if not isinstance(value, str) or "://" not in value:
        return False
    return value.split("://", 1)[0].lower() in URL_SCHEMES


def location(value: object) -> object:
    """Pydantic before-validator of a folder setting: remote URLs stay strings, the rest become Paths."""
    if isinstance(value, str):
        if value.lower().startswith("file://"):
            return Path(value[len("file://"):])
        if "://" in value and not is_url(value):
            scheme = value.split("://", 1)[0]
            raise ValueError(f"unknown URL scheme {scheme!r}: use one of {', '.join(URL_SCHEMES)} or a plain path")
        if is_url(value):
            return value.rstrip("/")
    return value


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`; a missing back-end names the extra to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(scheme, scheme)
        raise StoreError(f"{url}: the {scheme}:// back-end is not installed "
                         f"(pip install 'tagdit[{extra}]'): {e}") from None


def check_reachable(url: str, setting: str, must_exist: bool = False) -> None:
    """Fail before any work when the store behind `url` cannot be listed (no bucket, no credentials,
    no permission, nothing listening), naming the URL and the setting; `must_exist`: `url` itself too."""
    fs, path = filesystem(url)
    try:
        top = path.split("/", 1)[0] if path else path
        if not fs.exists(top):
            raise FileNotFoundError(f"bucket or folder {top!r} does not exist")
        if must_exist and not fs.exists(path):
            raise FileNotFoundError("nothing there")
    except StoreError:
        raise
    except Exception as e:  # botocore's NoCredentialsError, PermissionError, connection errors, ...
        raise StoreError(f"{setting}={url}: cannot use the store ({type(e).__name__}: {e}); credentials come from "
                         "the standard environment (e.g. AWS_* variables, ~/.aws, AWS_ENDPOINT_URL)") from None


def object_version(info: dict[str, Any]) -> int:
    """A number that changes when a stored object does: a hash of its modification time and its
    ETag / checksum, whichever the store reports (what `SourceFile.mtime_ns` holds for a URL source)."""
    facts = [str(info[k]) for k in ("mtime", "LastModified", "updated", "last_modified", "last_commit", "ETag", "etag",
                                    "md5Hash", "blob_id", "sha256", "crc32c") if info.get(k) is not None]
    return int(hashlib.sha256("\0".join(facts).encode()).hexdigest()[:15], 16)


def cache_root() -> Path:
    """Where working copies of URL folders live (`TAGDIT_STORE_CACHE`, default ~/.cache/tagdit/stores)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tagdit" / "stores").absolute()


def working_dir(root: str | Path) -> Path:
    """The local folder a root setting is worked on in: itself for a path, a working copy for a URL."""
    if not is_url(root):
        return Path(root)
    scheme, rest = str(root).split("://", 1)
    return cache_root() / scheme.lower() / rest.strip("/")


def remote_of(path: str | Path) -> str | None:
    """The URL a file or folder of a working copy stands for; None for a plain local path."""
    try:
        rel = Path(path).absolute().relative_to(cache_root())
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) < 2 or parts[0].startswith("."):
        return None
    return f"{parts[0]}://" + "/".join(parts[1:])


def _index_path(path: Path) -> Path:
    """Where the facts of a working-copy file's last transfer are kept (size, mtime, remote version)."""
    rel = path.absolute().relative_to(cache_root())
    return cache_root() / ".index" / rel.parent / f"{rel.name}.json"


def _read_index(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(_index_path(path).read_text())
    except (OSError, ValueError):
        return None


def _replace_into(dst: Path, fill: Any) -> None:
    """Write `dst` through a temp sibling that `fill(tmp)` fills, renamed into place (never uploaded:
    what this module writes came from the store or is its own bookkeeping)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        fill(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _write_index(path: Path, version: int) -> None:
    st = path.stat()
    entry = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": version})
    _replace_into(_index_path(path), lambda tmp: tmp.write_text(entry))


def _in_sync(path: Path) -> bool:
    """Whether a working-copy file is unchanged since it was last uploaded or downloaded."""
    entry = _read_index(path)
    if entry is None:
        return False
    st = path.stat()
    return entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns


# one machine's markers, never in a store: checkpoint pins of live processes, folder-lock holders
LOCAL_ONLY_PREFIXES, LOCAL_ONLY_SUFFIXES = (".pin-",), (".tagdit-lock.json",)


def _is_temp(path: Path) -> bool:
    """A file a writer has not finished (`.name.tmp-PID`, or inside such a folder) or a local marker:
    never uploaded."""
    return any(part.startswith(".") and ".tmp-" in part for part in path.parts) \
        or path.name.startswith(LOCAL_ONLY_PREFIXES) or path.name.endswith(LOCAL_ONLY_SUFFIXES)


def publish(path: str | Path) -> None:
    """Upload one finished file of a working copy to its URL (no-op for a plain path).

    An upload is one PUT: the object appears complete or not at all, so a killed run leaves nothing
    half-written in the store.
    """
    path = Path(path)
    url = remote_of(path)
    if url is None or _is_temp(path):
        return
    fs, rpath = filesystem(url)
    try:
        fs.put_file(str(path), rpath)
        version = object_version(fs.info(rpath))
    except Exception as e:
        raise StoreError(f"could not upload {path} to {url} ({type(e).__name__}: {e})") from None
    _write_index(path, version)


def unpublish(path: str | Path) -> None:
    """Delete a working-copy file's or folder's objects from the store (no-op for a plain path):
    checkpoints pruned during a long run leave the bucket too."""
    path = Path(path)
    url = remote_of(path)
    if url is None:
        return
    fs, rpath = filesystem(url)
    try:
        fs.rm(rpath, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as e:
        log.warning("store: could not delete %s (%s: %s); the stage's end retries", url, type(e).__name__, e)
        return
    index = _index_path(path)
    index.unlink(missing_ok=True)
    shutil.rmtree(index.with_suffix(""), ignore_errors=True)  # a folder's entries (index/<name>/...)


def publish_files(paths: list[Path]) -> None:
    """Upload several finished files in the given order (the one that marks the unit complete last)."""
    for p in paths:
        publish(p)


def _remote_objects(url: str) -> tuple[Any, str, dict[str, dict[str, Any]]]:
    """(fs, path, {relative name: info}) of every object under `url`."""
    fs, rpath = filesystem(url)
    fs.invalidate_cache(rpath)  # another process may have written since this one last listed
    try:
        found = fs.find(rpath, detail=True) if fs.exists(rpath) else {}
    except FileNotFoundError:
        found = {}
    prefix = rpath.rstrip("/") + "/"
    return fs, rpath, {name[len(prefix):]: info for name, info in found.items() if name.startswith(prefix)}


def push_tree(local: str | Path) -> int:
    """Make the store hold a working-copy folder: upload what changed since its last transfer and
    delete the objects of files this copy had and removed. Objects it never saw are left alone
    (another machine's). Returns how many files were uploaded; a no-op for a plain path."""
    local = Path(local)
    url = remote_of(local)
    if url is None or not local.is_dir():
        return 0
    fs, rpath, remote = _remote_objects(url)
    uploaded = 0
    for dirpath, dirnames, filenames in os.walk(local):
        dirnames[:] = [d for d in dirnames if ".tmp-" not in d]
        for fn in filenames:
            p = Path(dirpath) / fn
            rel = p.relative_to(local).as_posix()
            if _is_temp(p) or (rel in remote and _in_sync(p)):
                continue
            publish(p)
            uploaded += 1
    for rel in remote:
        p = local / rel
        if not p.exists() and _read_index(p) is not None:  # ours, and deleted here
            fs.rm_file(f"{rpath}/{rel}")
            _index_path(p).unlink(missing_ok=True)
    if uploaded:
        log.info("store: %d files uploaded to %s", uploaded, url)
    return uploaded


def _download(fs: Any, rpaths: list[str], paths: list[Path], versions: list[int]) -> None:
    """Download objects into their working-copy files in one batch (concurrent GETs where the back-end
    is asynchronous, as s3fs and gcsfs are), each through a temp sibling renamed into place, and
    record the transfers."""
    tmps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in paths]
    for tmp in tmps:
        tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get(rpaths, [str(t) for t in tmps])
        for tmp, path, version in zip(tmps, paths, versions, strict=True):
            os.replace(tmp, path)
            _write_index(path, version)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _current(path: Path, version: int) -> bool:
    """Whether a working-copy file is here and is the store's object of `version`, unchanged since."""
    entry = _read_index(path) if path.exists() else None
    return entry is not None and _in_sync(path) and entry["version"] == version


def pull_tree(local: str | Path, skip: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> int:
    """Bring a working-copy folder up to date with the store: download every object that is missing
    here or changed there since this copy last transferred it. Returns how many were downloaded.

    `skip`: patterns (fnmatch, of paths relative to the folder) of the files a stage reads straight from
    the store (`tagdit.store_streams`), or does not need yet: never downloaded, and a copy here that is not
    the store's current object is removed, so that what a reader finds here is current;
    `keep`: patterns of files pulled even when `skip` names them."""
    local = Path(local)
    url = remote_of(local)
    if url is None:
        return 0
    fs, rpath, remote = _remote_objects(url)
    todo = {}
    for rel, info in sorted(remote.items()):
        p, version = local / rel, object_version(info)
        if _current(p, version):
            continue
        if any(fnmatch(rel, pattern) for pattern in skip) and not any(fnmatch(rel, pattern) for pattern in keep):
            p.unlink(missing_ok=True)
            _index_path(p).unlink(missing_ok=True)  # forgotten, so no push deletes the store's object
            continue
        todo[rel] = version
    names = list(todo)
    for i in range(0, len(names), PULL_BATCH):  # a failure keeps the batches before it
        batch = names[i:i + PULL_BATCH]
        _download(fs, [f"{rpath}/{rel}" for rel in batch], [local / rel for rel in batch], [todo[r] for r in batch])
    if todo:
        log.info("store: %d files downloaded from %s to %s", len(todo), url, local)
    return len(todo)


def fetch(path: str | Path) -> Path:
    """Download one file of a working copy from its store, as `pull_tree` would (a streamed file kept
    in the local cache); a StoreError naming the URL when the store cannot give it."""
    path = Path(path)
    url = remote_of(path)
    if url is None:
        raise FileNotFoundError(f"{path} is not in a working copy of a store")
    fs, rpath = filesystem(url)
    try:
        _download(fs, [rpath], [path], [object_version(fs.info(rpath))])
    except Exception as e:
        raise StoreError(f"could not download {url} to {path} ({type(e).__name__}: {e})") from None
    return path


def stored_objects(local: str | Path) -> dict[str, dict[str, Any]] | None:
    """What the store holds under a working-copy folder, {relative name: object info}; None for a plain path."""
    url = remote_of(local)
    return _remote_objects(url)[2] if url is not None else None


def stored_version(path: str | Path) -> int | None:
    """The store's version of a working-copy file when this copy is the object last transferred
    (`object_version`), else None (a plain path, or a file changed since)."""
    path = Path(path)
    if remote_of(path) is None or not path.exists() or not _in_sync(path):
        return None
    return _read_index(path)["version"]


def move_tree(src: str | Path, dst: str | Path) -> None:
    """Rename a folder here and, for a working-copy folder, its objects in the store (copied, then
    deleted: object stores have no rename), the store first, so a failure leaves the folder where it
    was. What this copy held in sync with the store stays in sync under its new name."""
    src, dst = Path(src), Path(dst)
    url, to = remote_of(src), remote_of(dst)
    if url is not None and to is not None:
        fs, rpath, remote = _remote_objects(url)
        dpath = filesystem(to)[1]
        synced = {rel for rel in remote if (src / rel).is_file() and _in_sync(src / rel)}
        names = sorted(remote)
        try:
            if names:
                fs.copy([f"{rpath}/{rel}" for rel in names], [f"{dpath}/{rel}" for rel in names])
                fs.rm([f"{rpath}/{rel}" for rel in names])
        except Exception as e:
            raise StoreError(f"could not move {url} to {to} ({type(e).__name__}: {e})") from None
        shutil.rmtree(_index_path(src).with_suffix(""), ignore_errors=True)
    src.rename(dst)
    if url is not None and to is not None and synced:
        moved = _remote_objects(to)[2]
        for rel in synced:
            if rel in moved:
                _write_index(dst / rel, object_version(moved[rel]))


def location_key(folder: str | Path) -> str:
    """What names a folder in a cache key, the same wherever its copy lives: a working copy's URL, else
    the path relative to the working directory when inside it (a moved or copied clone keeps its keys),
    else the absolute path."""
    p = Path(folder).absolute()
    if url := remote_of(p):
        return url
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(p.resolve())
