"""Stage cache keys, output stamps and the Prefect glue that makes every stage cached and safe.

Prefect's default cache key includes the flow-run id, and a cached path is a "hit" even when the
file is gone (DESIGN §7). So each stage declares:
  * which config sections and which code modules it depends on,
  * where its outputs live,
and gets a key = hash(stage, code version, config sections, upstream fingerprints, extra inputs).
When a stage finishes it writes a stamp (`.stage-<name>.json`) listing its outputs with sizes and
sha256. A cache hit is trusted only if that stamp matches the key and the files still match it;
otherwise the flow runs the task with `refresh_cache=True`.
"""

from __future__ import annotations

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
from tagdit.files import sha256_file, sha256_text, write_json_atomic


class StageRecord(BaseModel):
    """What a stage hands to the next one: paths and small facts, never tensors."""

    stage: str
    key: str  # cache key the outputs were produced under
    out_dir: str
    fingerprint: str  # hash of the outputs' hashes; downstream keys depend on it
    info: dict[str, Any] = {}  # counts, metrics, notable paths
    cached: bool = False  # set by run_stage: True when Prefect served it from the cache


@cache
def code_version(*modules: str) -> str:
    """Hash of the source files of the given modules (the stage's code and the models it uses)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"module {name!r} not found for code versioning")
        h.update(name.encode())
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if k not in _FILE_HASHES:
        _FILE_HASHES[k] = sha256_file(p)
    return _FILE_HASHES[k]


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
    modules: tuple[str, ...]  # code that defines the stage's output
    sections: tuple[str, ...]  # config it depends on (dotted)
    out_dir: Callable[[PipelineConfig, dict[str, StageRecord]], Path]
    extra_inputs: Callable[[PipelineConfig], dict[str, str]] = field(default=lambda cfg: {})

    def key(self, cfg: PipelineConfig, upstream: dict[str, StageRecord]) -> str:
        payload = {
            "stage": self.name,
            "code": code_version(*self.modules),
            "config": config_sections(cfg, self.sections),
            "upstream": {k: v.fingerprint for k, v in sorted(upstream.items())},
            "extra": self.extra_inputs(cfg),
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
        entries = {}
        for f in sorted(Path(p) for p in files):
            st = f.stat()
            entries[f.relative_to(out_dir).as_posix()] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha256": file_fingerprint(f),
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
        out_dir = Path(record.out_dir)
        for rel, meta in stamp["files"].items():
            f = out_dir / rel
            try:
                st = f.stat()
            except OSError:
                return None
            if st.st_size != meta["size"]:
                return None
            if st.st_mtime_ns != meta["mtime_ns"] and sha256_file(f) != meta["sha256"]:
                return None
        return record


def stage_cache_key(stage: Stage) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect `cache_key_fn` for tasks with the signature `(cfg, **upstream_records)`."""

    def key_fn(_ctx: Any, params: dict[str, Any]) -> str:
        params = dict(params)
        cfg = params.pop("cfg")
        params.pop("force", None)
        return stage.key(cfg, {k: v for k, v in params.items() if isinstance(v, StageRecord)})

    return key_fn


def run_stage(stage_task: Any, stage: Stage, cfg: PipelineConfig, force: bool = False, **upstream: StageRecord) -> StageRecord:
    """Call a stage's Prefect task, bypassing the cache when its outputs are missing or changed."""
    from prefect import get_run_logger

    fresh = not force and stage.valid_record(cfg, upstream) is not None
    if not fresh:
        why = "forced" if force else "no valid outputs on disk for this key"
        get_run_logger().info("stage %s: %s -> computing", stage.name, why)
    kwargs: dict[str, Any] = dict(upstream)
    if force:
        kwargs["force"] = True
    state = stage_task.with_options(refresh_cache=not fresh)(cfg, **kwargs, return_state=True)
    record = state.result()  # raises the task's error if it failed
    hit = state.name == "Cached"
    if hit:
        get_run_logger().info("stage %s: cache hit (%s)", stage.name, record.key)
    return record.model_copy(update={"cached": hit})


PIPELINE_ORDER = ("demo", "crop", "tag", "shard", "train_vae", "encode", "train_dit", "evaluate")


def expand_force(force: list[str] | None, order: tuple[str, ...] = PIPELINE_ORDER) -> set[str]:
    """Stages to recompute: each named stage and every stage after it in `order`."""
    if not force:
        return set()
    unknown = sorted(set(force) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(order)}")
    first = min(order.index(s) for s in force)
    return set(order[first:])


def read_stamp(out_dir: str | Path, name: str) -> StageRecord | None:
    """The record a finished stage left in `out_dir` (for running a later stage on its own)."""
    try:
        stamp = json.loads((Path(out_dir) / f".stage-{name}.json").read_text())
        return StageRecord.model_validate(stamp["record"])
    except (OSError, ValueError, KeyError):
        return None


def require_stamp(out_dir: str | Path, name: str, hint: str) -> StageRecord:
    """Like `read_stamp`, but a clear error naming the flow to run first."""
    record = read_stamp(out_dir, name)
    if record is None:
        raise FileNotFoundError(f"no finished '{name}' stage in {out_dir}: run {hint} first")
    return record
