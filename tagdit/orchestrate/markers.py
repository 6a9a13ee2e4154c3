"""Resume markers: does the partial work in a folder belong to this key?

A stage's finished outputs are judged by its stamp (`Stage.valid_record`). Work in progress — a
training run's checkpoints, latent shards written so far, one demo unit — is judged by a marker
beside it: the key (or identity) it was made under, and optionally the files it vouches for with
their sizes. One reader and one writer for every such marker; `prepare_out_dir` keeps a run folder
whose `identity.json` matches and moves any other aside.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tagdit.files import write_json_atomic
from tagdit.store_folders import remove_tree
from tagdit.stores import move_tree

log = logging.getLogger(__name__)
SUPERSEDED = ".superseded-"  # `<name>.superseded-<time>`: a run moved aside, read by no stage


def marker_matches(marker: Path, key: Any) -> bool:
    """True when `marker` was written for `key` and every file it lists still has its size."""
    try:
        stamp = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if isinstance(stamp, dict) and set(stamp) == {"key", "files"}:
        root = marker.parent
        try:
            sizes_ok = all((root / rel).stat().st_size == size for rel, size in stamp["files"].items())
        except OSError:
            return False
        return stamp["key"] == key and sizes_ok
    return stamp == key  # a bare identity (training runs, latent folders)


def write_marker(marker: Path, key: Any, files: Iterable[Path] | None = None) -> None:
    """Record `key` (and, when given, the sizes of `files` under the marker's folder)."""
    if files is None:
        write_json_atomic(marker, key)
        return
    root = marker.parent
    write_json_atomic(marker, {"key": key, "files": {Path(f).relative_to(root).as_posix(): Path(f).stat().st_size
                                                     for f in files}})


def prepare_out_dir(out_dir: Path, identity: dict[str, Any], force: bool, what: str,
                    continue_despite: str | None = None) -> None:
    """Keep a resumable run; move any other non-empty folder aside (never delete it silently).

    `force` deletes the folder. A folder whose `identity.json` is missing or differs holds a run of
    another configuration (or of unknown origin): it becomes `<name>.superseded-<time>`, logged.
    `continue_despite`: an identity entry whose change is no reason to start over (the run continues
    on grown data when its user asked for it: logged, and the marker takes the new value).
    """
    marker = out_dir / "identity.json"
    if continue_despite and marker.is_file() and not marker_matches(marker, identity):
        try:
            old = json.loads(marker.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict) and {k: v for k, v in old.items() if k != continue_despite} == \
                {k: v for k, v in identity.items() if k != continue_despite}:
            log.warning("%s: continuing the %s run although its %s changed (it was asked to continue on new data)",
                        out_dir, what, continue_despite)
            write_marker(marker, identity)
    if force:  # a folder in a working copy: the store's objects go too, also those never pulled here
        remove_tree(out_dir)
    elif out_dir.exists() and not marker_matches(marker, identity):
        if any(out_dir.iterdir()):
            aside = out_dir.with_name(f"{out_dir.name}{SUPERSEDED}{time.strftime('%Y%m%d-%H%M%S')}")
            why = "another configuration" if marker.is_file() else "unknown configuration (no identity.json)"
            log.warning("%s holds a %s run of %s; moved it to %s", out_dir, what, why, aside)
            move_tree(out_dir, aside)  # in the store too: the run is kept there, not deleted by the next push
    write_marker(marker, identity)
