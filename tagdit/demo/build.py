"""Building the demo's two outputs: the synthetic world (`demo.out`) and its WD-interface tagger.

`build_world` and `build_tagger` (re)make one output each, `world_files` and `TAGGER_FILES` name
what they wrote, `clear_outputs` removes both and `headline` is the small summary a stage record
carries. Whether a unit needs rebuilding (its resume marker and key) is `tasks.demo`'s business.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tagdit.files import remove_stale_temps

TAGGER_FILES = ("model.onnx", "selected_tags.csv", "report.json")
EVAL_IMAGES = 400  # held-out world images the tagger report is measured on (fewer if the world is smaller)
WORLD_MARKER = ".world-done.json"
TAGGER_MARKER = ".tagger-done.json"


def world_files(out: Path) -> list[Path]:
    """Every file of the world under `out`: its images and `labels.json`."""
    return sorted(p for p in (out / "images").rglob("*") if p.is_file()) + [out / "labels.json"]


def world_summary(out: Path) -> dict[str, Any]:
    """The summary of the world already under `out`."""
    from tagdit.demo.world import load_labels

    return load_labels(out)["summary"]


def build_world(out: Path, n_images: int, seed: int) -> dict[str, Any]:
    """Generate the world into `out` (after clearing a killed generation's leftovers); returns its summary."""
    from tagdit.demo.world import generate_world

    remove_stale_temps(out)
    for tmp in out.glob(".images.tmp-*"):  # a killed generation's half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
    return generate_world(out, n_images, seed).model_dump()


def tagger_report(out: Path) -> dict[str, Any]:
    """The report of the tagger already under `out`."""
    return json.loads((out / "report.json").read_text())


def build_tagger(out: Path, seed: int, n_train: int, epochs: int, n_images: int) -> dict[str, Any]:
    """Train, export and evaluate the demo tagger into `out`; returns its report."""
    from tagdit.demo.tagger import build_demo_tagger

    return build_demo_tagger(out, seed=seed, world_seed=seed, n_train=n_train, epochs=epochs,
                             n_eval=min(EVAL_IMAGES, n_images))


def clear_outputs(out: Path, tagger_out: Path) -> None:
    """Delete the world, the tagger and both resume markers."""
    shutil.rmtree(out / "images", ignore_errors=True)
    for f in (out / "labels.json", out / WORLD_MARKER, tagger_out / TAGGER_MARKER, *(tagger_out / f for f in TAGGER_FILES)):
        f.unlink(missing_ok=True)


def headline(world: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The small facts the record carries: world counts and the tagger's precision/recall per view."""
    views = {v: {k: round(m[k], 4) for k in ("precision", "recall", "min_precision", "min_recall", "exact_match")}
             for v, m in report["views"].items()}
    return {
        "images": world["n_images"], "formats": world["formats"], "modes": world["modes"],
        "broken": len(world["broken"]), "sidecars": len(world["sidecars"]),
        "tagger": views, "tagger_eval_images": report["n_eval"], "tagger_seconds": report["seconds"]["total"],
    }
