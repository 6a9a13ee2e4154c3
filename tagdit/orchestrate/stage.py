"""Stage cache keys, output stamps and the Prefect glue that makes every stage cached and safe.

Prefect's default cache key includes the flow-run id, and a cached path is a "hit" even when the
file is gone (docs/design.md §7). So each stage declares:
  * a format `version` (an int bumped by hand when the stage's outputs change meaning or layout),
  * the code it runs (`modules`: `"tasks.crop"` for a whole module, `"pkg.mod:name"` for one
    top-level function, class or constant),
  * which config sections it depends on, and where its outputs live,
and gets a key = hash(stage, version, code version, config sections, upstream fingerprints, extra
inputs). The code version hashes each entry's *normalised* syntax tree (`ast.dump` without
docstrings, comments or line numbers), so editing a comment, a docstring or blank lines keeps the
key while changing a constant or an expression changes it (docs/design.md §4).
When a stage finishes it writes a stamp (`.stage-<name>.json`) listing its outputs with sizes and
sha256. A cache hit is trusted only if that stamp matches the key and the files still match it;
otherwise the flow runs the task with `refresh_cache=True`.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tagdit.config import PipelineConfig
from tagdit.files import (
    file_fingerprint,
    remember_fingerprint,
    remember_stored,
    sha256_file,
    sha256_text,
    write_json_atomic,
)
from tagdit.store_folders import local_copy
from tagdit.stores import (
    WEIGHTS,
    location_key,
    object_version,
    pull_tree,
    stored_objects,
    stored_version,
)

SHARDS = ("*.tar",)  # a dataset's big files: the trainers stream them, the stages that need them whole pull them
# what the stages that read shards only as streams (train-vae, train-dit, evaluate) never pull: the shards,
# and the data stages' chunks and unit records (the crops again), which they do not read at all
SHARDS_AND_WORK = (*SHARDS, "work/*")
# what a stage's cache check never pulls (`tagdit.orchestrate.runner`): shards, chunks, tables and checkpoint
# folders, but their stamps; a stamp in a working copy of a URL folder is checked against the store's objects
TABLES = ("*.parquet",)  # a dataset's tables (manifest, rejects, tags): read by the data stages alone
BULK, STAMPS = (*SHARDS_AND_WORK, *TABLES, *WEIGHTS), (".stage-*.json", "*/.stage-*.json")


class StageRecord(BaseModel):
    """What a stage hands to the next one: paths and small facts, never tensors."""

    stage: str
    key: str  # cache key the outputs were produced under
    out_dir: str
    fingerprint: str  # hash of the outputs' hashes; downstream keys depend on it
    info: dict[str, Any] = {}  # counts, metrics, notable paths
    cached: bool = False  # set by run_stage: True when Prefect served it from the cache


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop module, class and function docstrings in place (comments never reach the tree)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:]
    return tree


def _top_level(tree: ast.Module, name: str) -> ast.stmt:
    """The top-level `def`/`class`/assignment that binds `name`."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node
    raise ValueError(f"no top-level function, class or assignment {name!r}")


def code_digest(entry: str) -> str:
    """sha256 of one entry's normalised code: `"pkg.mod"` (whole module) or `"pkg.mod:name"`."""
    module, _, name = entry.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ValueError(f"module {module!r} not found (or has no Python source) for code versioning")
    tree = _strip_docstrings(ast.parse(Path(spec.origin).read_text(), filename=spec.origin))
    if name:
        try:
            tree = _top_level(tree, name)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"{entry!r}: {e} in {spec.origin}") from None
    return sha256_text(ast.dump(tree, annotate_fields=False, include_attributes=False))


@cache
def code_version(*entries: str) -> str:
    """Hash of the normalised code of `entries` (see `code_digest`); memoised for the process.

    Entry names are not hashed and order does not matter, so moving unchanged code between
    modules keeps the version.
    """
    return sha256_text(*sorted(code_digest(e) for e in set(entries)))[:16]


def tree_fingerprint(root: str | Path) -> str:
    """Cheap fingerprint of a folder tree: relative paths, sizes and mtimes (no byte hashing)."""
    root = Path(root)
    h = hashlib.sha256()
    if not root.exists():
        return "missing"
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def config_sections(cfg: PipelineConfig, sections: Iterable[str]) -> dict[str, Any]:
    """Pick dotted sections (`crop`, `data.resolution`) out of the config as JSON-able values."""
    out = {}
    dumped = cfg.model_dump(mode="json")
    for dotted in sections:
        node: Any = dumped
        for part in dotted.split("."):
            node = node[part]
        out[dotted] = node
    return out


@dataclass(frozen=True)
class Stage:
    """A pipeline stage's caching contract."""

    name: str
    modules: tuple[str, ...]  # code that defines the outputs: "pkg.mod" or "pkg.mod:function"
    sections: tuple[str, ...]  # config it depends on (dotted)
    out_dir: Callable[[PipelineConfig, dict[str, StageRecord]], Path]
    extra_inputs: Callable[[PipelineConfig], dict[str, str]] = field(default=lambda cfg: {})
    version: int = 1  # output format version: bump by hand when the outputs change meaning or layout
    # the folder whose global concurrency slot a flow run holds while the stage runs (tagdit.orchestrate.locks);
    # None = out_dir. Data stages lock the whole dataset folder.
    lock: Callable[[PipelineConfig, dict[str, StageRecord]], Path] | None = None
    # dataset files (fnmatch patterns of paths in it) the stage reads straight from the store when
    # `data.root` is a URL (`tagdit.store_streams`), or does not read: not pulled into the working copy
    streams: tuple[str, ...] = ()
    # a data stage that finds its units by name in the store and reads each one it needs from there: when
    # it computes on a URL dataset, nothing of BULK is pulled first (a grown dataset downloads its changes)
    reads_store: bool = False
    # a trainer: resumes from its `latest` checkpoint with the optimiser state (`state.pt`), the one stage
    # that pulls a checkpoint's state from a run on a URL
    resumes: bool = False

    def lock_dir(self, cfg: PipelineConfig, upstream: dict[str, StageRecord]) -> Path:
        return (self.lock or self.out_dir)(cfg, upstream)

    def code_key(self) -> str:
        """Format version + code version: what per-chunk/per-shard digests should include."""
        return f"v{self.version}-{code_version(*self.modules)}"

    def key(self, cfg: PipelineConfig, upstream: dict[str, StageRecord]) -> str:
        payload = {
            "stage": self.name,
            "version": self.version,
            "code": code_version(*self.modules),
            "config": config_sections(cfg, self.sections),
            "upstream": {k: v.fingerprint for k, v in sorted(upstream.items())},
            "extra": self.extra_inputs(cfg),
            # where the outputs live: two runs with equal settings must not share a key (and records);
            # named so that a moved clone or another machine's copy of a URL folder keeps the key
            "out_dir": location_key(self.out_dir(cfg, upstream)),
        }
        return f"{self.name}-" + sha256_text(json.dumps(payload, sort_keys=True, default=str))[:32]

    def stamp_path(self, cfg: PipelineConfig, upstream: dict[str, StageRecord]) -> Path:
        return self.out_dir(cfg, upstream) / f".stage-{self.name}.json"

    def write_stamp(
        self,
        cfg: PipelineConfig,
        upstream: dict[str, StageRecord],
        files: Iterable[Path],
        info: dict[str, Any] | None = None,
    ) -> StageRecord:
        """Record the finished outputs; call last, after every output is in place."""
        out_dir = self.out_dir(cfg, upstream)
        previous: dict[str, dict] = {}
        with contextlib.suppress(OSError, ValueError, KeyError):  # the previous stamp's hashes of unchanged files
            previous = json.loads(self.stamp_path(cfg, upstream).read_text())["files"]
        stored = stored_objects(out_dir)
        remember_stamped(out_dir, previous, stored)
        entries = {}
        for f in sorted(Path(p) for p in files):
            rel = f.relative_to(out_dir).as_posix()
            if not f.exists() and stored is not None and rel in previous and in_store(stored.get(rel), previous[rel]):
                entries[rel] = previous[rel]  # a unit this run did not touch, in the store only
                continue
            f = local_copy(f)  # in the store only, and unstamped (another machine's killed run): hashed here
            st = f.stat()
            entries[rel] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha256": file_fingerprint(f),
                **({} if (v := stored_version(f)) is None else {"version": v}),  # the store's object, when uploaded
            }
        fingerprint = sha256_text(json.dumps({k: v["sha256"] for k, v in entries.items()}, sort_keys=True))
        record = StageRecord(
            stage=self.name,
            key=self.key(cfg, upstream),
            out_dir=str(out_dir),
            fingerprint=fingerprint,
            info=info or {},
        )
        write_json_atomic(self.stamp_path(cfg, upstream), {"record": record.model_dump(), "files": entries})
        return record

    def valid_record(self, cfg: PipelineConfig, upstream: dict[str, StageRecord]) -> StageRecord | None:
        """The stamped record if it matches the current key and every output still matches it."""
        path = self.stamp_path(cfg, upstream)
        try:
            stamp = json.loads(path.read_text())
            record = StageRecord.model_validate(stamp["record"])
        except (OSError, ValueError, KeyError):
            return None
        if record.key != self.key(cfg, upstream):
            return None
        out_dir = Path(self.out_dir(cfg, upstream))
        stored = stored_objects(out_dir)  # a working copy of a URL folder: the store holds the outputs
        for rel, meta in stamp["files"].items():
            if not (in_store(stored.get(rel), meta) if stored is not None else on_disk(out_dir / rel, meta)):
                return None
        remember_stamped(out_dir, stamp["files"], stored)
        return relocated(record, out_dir)


def on_disk(f: Path, meta: dict[str, Any]) -> bool:
    """Whether a local file is the one a stamp recorded: its size, and its mtime or else its sha256."""
    try:
        st = f.stat()
    except OSError:
        return False
    return st.st_size == meta["size"] and (st.st_mtime_ns == meta["mtime_ns"] or sha256_file(f) == meta["sha256"])


def in_store(info: dict[str, Any] | None, meta: dict[str, Any]) -> bool:
    """Whether a stored object (its info, None when missing) is the file a stamp recorded: its size, and
    its store version when the stamp has it (a file uploaded before the stamp was written)."""
    return info is not None and info.get("size") == meta["size"] \
        and ("version" not in meta or object_version(info) == meta["version"])


def remember_stamped(out_dir: Path, files: dict[str, dict], stored: dict[str, dict] | None = None) -> None:
    """Trust a stamp's sha256 of each file still at its recorded size and mtime, as `valid_record` does:
    a stage re-stamping a grown dataset, or a next stage naming its units by their inputs' bytes,
    hashes only the files that changed (at 100M images the crop chunks are terabytes). With `stored`
    (a working copy's store listing), also of each file not here whose store object is the stamped one."""
    for rel, meta in files.items():
        f = Path(out_dir) / rel
        if stored is not None and not f.exists():
            if in_store(stored.get(rel), meta):
                remember_stored(f, meta["sha256"])
            continue
        with contextlib.suppress(OSError):
            st = f.stat()
            if (st.st_size, st.st_mtime_ns) == (meta["size"], meta["mtime_ns"]):
                remember_fingerprint(f, meta["size"], meta["mtime_ns"], meta["sha256"])


def stage_cache_key(stage: Stage) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect `cache_key_fn` for tasks with the signature `(cfg, **upstream_records)`."""

    def key_fn(_ctx: Any, params: dict[str, Any]) -> str:
        params = dict(params)
        cfg = params.pop("cfg")
        params.pop("force", None)
        return stage.key(cfg, {k: v for k, v in params.items() if isinstance(v, StageRecord)})

    return key_fn


def relocated(record: StageRecord, out_dir: str | Path) -> StageRecord:
    """`record` as found in `out_dir`: its folder, and every path under its recorded folder in its
    info, moved there (a stamp read in a moved clone, or in another machine's copy of a URL folder)."""
    old, new = record.out_dir.rstrip("/"), str(out_dir).rstrip("/")
    if old == new:
        return record

    def move(v: Any) -> Any:
        if isinstance(v, str) and (v == old or v.startswith(old + "/")):
            return new + v[len(old):]
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    return record.model_copy(update={"out_dir": new, "info": move(record.info)})


def read_stamp(out_dir: str | Path, name: str) -> StageRecord | None:
    """The record a finished stage left in `out_dir` (for running a later stage on its own)."""
    try:
        stamp = json.loads((Path(out_dir) / f".stage-{name}.json").read_text())
        return relocated(StageRecord.model_validate(stamp["record"]), out_dir)
    except (OSError, ValueError, KeyError):
        return None


def require_stamp(out_dir: str | Path, name: str, hint: str) -> StageRecord:
    """Like `read_stamp`, but a clear error naming the flow to run first."""
    pull_tree(out_dir, skip=BULK, keep=STAMPS)  # a working copy of a URL folder: what a cache check pulls
    record = read_stamp(out_dir, name)
    if record is None:
        raise FileNotFoundError(f"no finished '{name}' stage in {out_dir}: run {hint} first")
    return record
