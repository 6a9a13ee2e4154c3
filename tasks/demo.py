"""Demo stage: the synthetic demo world (`demo.out`) and its WD-interface tagger (`demo.tagger_out`).

Two resumable units, each skipped when its marker matches its own key: the world (depends on the
generator code, `demo.n_images`, `demo.seed`) and the tagger (depends on the generator and tagger
code, `demo.seed` and its training knobs; not on `n_images` beyond the evaluation set). Changing
the world's size therefore does not retrain the tagger.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from prefect import task

from tagdit.config import PipelineConfig
from tagdit.files import remove_stale_temps, sha256_text
from tagdit.orchestrate.markers import marker_matches, write_marker
from tagdit.orchestrate.stage import Stage, StageRecord, code_version, stage_cache_key

log = logging.getLogger(__name__)

WORLD_MODULES = ("tagdit.demo.labels", "tagdit.demo.draw", "tagdit.demo.world")
TAGGER_MODULES = (*WORLD_MODULES, "tagdit.demo.tagger_data", "tagdit.demo.tagger", "tagdit.data.tagger",
                  "tagdit.data.onnx_session", "tagdit.formats.selected_tags", "tagdit.formats.wd_image")
TAGGER_FILES = ("model.onnx", "selected_tags.csv", "report.json")
EVAL_IMAGES = 400  # held-out world images the tagger report is measured on (fewer if the world is smaller)


def demo_root(cfg: PipelineConfig) -> Path:
    """The folder holding both outputs (the stage stamp lives here)."""
    return Path(os.path.commonpath([cfg.demo.out.resolve(), cfg.demo.tagger_out.resolve()]))


DEMO = Stage(
    name="demo",
    modules=("tasks.demo", *TAGGER_MODULES),
    sections=("demo.out", "demo.tagger_out", "demo.n_images", "demo.seed", "demo.tagger_images",
              "demo.tagger_epochs"),
    out_dir=lambda cfg, up: demo_root(cfg),
)


def world_key(cfg: PipelineConfig) -> str:
    d = cfg.demo
    return sha256_text(code_version(*WORLD_MODULES), str(d.n_images), str(d.seed))


def tagger_key(cfg: PipelineConfig) -> str:
    d = cfg.demo
    return sha256_text(code_version(*TAGGER_MODULES), str(d.seed), str(d.tagger_images), str(d.tagger_epochs),
                       str(min(EVAL_IMAGES, d.n_images)))


def world_files(out: Path) -> list[Path]:
    return sorted(p for p in (out / "images").rglob("*") if p.is_file()) + [out / "labels.json"]


def build_world_unit(cfg: PipelineConfig) -> dict[str, Any]:
    """Generate the world unless its marker says this exact world is already there."""
    from tagdit.demo.world import generate_world, load_labels

    out, marker, key = cfg.demo.out, cfg.demo.out / ".world-done.json", world_key(cfg)
    if marker_matches(marker, key):
        log.info("demo world: up to date in %s", out)
        return load_labels(out)["summary"]
    marker.unlink(missing_ok=True)
    remove_stale_temps(out)
    for tmp in out.glob(".images.tmp-*"):  # a killed generation's half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
    summary = generate_world(out, cfg.demo.n_images, cfg.demo.seed).model_dump()
    write_marker(marker, key, world_files(out))
    return summary


def build_tagger_unit(cfg: PipelineConfig) -> dict[str, Any]:
    """Train + export + evaluate the tagger unless its marker says it is already built."""
    from tagdit.demo.tagger import build_demo_tagger

    out, marker, key = cfg.demo.tagger_out, cfg.demo.tagger_out / ".tagger-done.json", tagger_key(cfg)
    if marker_matches(marker, key):
        log.info("demo tagger: up to date in %s", out)
        return json.loads((out / "report.json").read_text())
    marker.unlink(missing_ok=True)
    report = build_demo_tagger(out, seed=cfg.demo.seed, world_seed=cfg.demo.seed, n_train=cfg.demo.tagger_images,
                               epochs=cfg.demo.tagger_epochs, n_eval=min(EVAL_IMAGES, cfg.demo.n_images))
    write_marker(marker, key, [out / f for f in TAGGER_FILES])
    return report


def clear_outputs(cfg: PipelineConfig) -> None:
    """Delete everything the stage wrote (for force)."""
    shutil.rmtree(cfg.demo.out / "images", ignore_errors=True)
    for f in (cfg.demo.out / "labels.json", cfg.demo.out / ".world-done.json", cfg.demo.tagger_out / ".tagger-done.json",
              *(cfg.demo.tagger_out / f for f in TAGGER_FILES), DEMO.stamp_path(cfg, {})):
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


def build_demo(cfg: PipelineConfig, force: bool = False) -> StageRecord:
    """Build (or reuse) the demo world and the demo tagger; returns the stage record."""
    if not force and (rec := DEMO.valid_record(cfg, {})):
        return rec
    if force:
        clear_outputs(cfg)
    world = build_world_unit(cfg)
    report = build_tagger_unit(cfg)
    files = [*world_files(cfg.demo.out), *(cfg.demo.tagger_out / f for f in TAGGER_FILES)]
    return DEMO.write_stamp(cfg, {}, [f.resolve() for f in files], headline(world, report))


@task(name="build-demo", cache_key_fn=stage_cache_key(DEMO), persist_result=True)
def build_demo_task(cfg: PipelineConfig, force: bool = False) -> StageRecord:
    """Prefect wrapper of `build_demo`."""
    return build_demo(cfg, force)
