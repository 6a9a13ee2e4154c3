"""Every project module a stage's code imports is part of that stage's code version (or is listed
below as code that cannot change the stage's outputs): editing it must invalidate the cache."""

from __future__ import annotations

import ast
import importlib.util

import pytest

from tasks.crop import CROP
from tasks.demo import DEMO
from tasks.encode import ENCODE
from tasks.evaluate import EVALUATE
from tasks.shard import SHARD
from tasks.tag import TAG
from tasks.train_dit import TRAIN_DIT
from tasks.train_vae import TRAIN_VAE

PROJECT = ("tagdit", "models", "tasks")
# Code that decides how a stage runs, never what it writes: leaving it out of the code version keeps
# a cache valid across edits that cannot change the outputs.
NOT_OUTPUT_CODE = {
    "tagdit.config": "its values are in the key (the stage's config sections)",
    "tagdit.files": "atomic writes and hashing",
    "tagdit.orchestrate.stage": "the cache machinery itself",
    "tagdit.orchestrate.chunks": "how units are scheduled (processes, Dask)",
    "tagdit.orchestrate.device_workers": "which device's worker runs a unit; the bytes are one device's (tested)",
    "tagdit.orchestrate.markers": "reads and writes resume markers; the key they hold is the stage's",
    "tagdit.data.prefetch": "reads ahead in a thread; same items, same order",
    "tagdit.demo.parallel": "maps work over processes; same results, same order",
    "tagdit.train.launch": "starts torchrun; the ranks run the listed code",
    "tagdit.train.samples": "sample grids while training never change the checkpoints (tested)",
    "tagdit.train.reports": "progress, grids and rank errors shown in Prefect, not the stage's files",
    "tagdit.train.disk": "refuses a run that cannot fit; what it writes does not change",
    "tagdit.evaluation.report": "artifacts and TensorBoard, not the stage's files",
    "tagdit.stores": "copies finished files to and from a URL folder; the bytes are the stage's",
    "tagdit.store_folders": "which files a folder and its store hold, a copy to open, deletions; the bytes are the stage's",
    "tagdit.store_streams": "reads a store's shards as they are stored; training on them equals training on a copy (tested)",
    "tagdit.train.nodes": "where the ranks run (rendezvous, the shared-folder check); the ranks run the listed code",
    "tagdit.train.stop": "a cancel's stop flag: a checkpoint sooner, and resuming from it is exact (tested)",
}


def _module_file(name: str) -> str | None:
    """`name` when it is a project module with its own source file (not a package), else None."""
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None
    ok = spec is not None and spec.origin and spec.origin.endswith(".py") and not spec.submodule_search_locations
    return name if ok else None


def project_imports(module: str) -> set[str]:
    """Project modules `module` imports anywhere in its code (function-level imports included)."""
    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT:
            found = _module_file(node.module)  # `from pkg.mod import name`
            out |= {found} if found else {m for a in node.names if (m := _module_file(f"{node.module}.{a.name}"))}
        elif isinstance(node, ast.Import):
            out |= {m for a in node.names if a.name.split(".")[0] in PROJECT and (m := _module_file(a.name))}
    return out


def uncovered(stage) -> set[str]:
    """Project modules reachable from the stage's whole-module entries that its code version misses."""
    whole = {m for m in stage.modules if ":" not in m}
    partial = {m.split(":")[0] for m in stage.modules if ":" in m}  # deliberately one definition only
    missing, seen, todo = set(), set(), list(whole)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for imported in project_imports(module):
            if imported in whole:
                todo.append(imported)
            elif imported not in partial and imported not in NOT_OUTPUT_CODE:
                missing.add(f"{module} -> {imported}")
    return missing


@pytest.mark.parametrize("stage", [DEMO, CROP, TAG, SHARD, TRAIN_VAE, ENCODE, TRAIN_DIT, EVALUATE], ids=lambda s: s.name)
def test_code_a_stage_imports_is_in_its_code_version(stage):
    assert uncovered(stage) == set()


def test_the_check_sees_a_missing_module():
    from dataclasses import replace

    assert "tasks.encode -> tagdit.data.encode" in uncovered(replace(ENCODE, modules=("tasks.encode",)))
    assert "tagdit.data.encode -> tagdit.devices" in uncovered(replace(ENCODE, modules=("tasks.encode", "tagdit.data.encode")))
