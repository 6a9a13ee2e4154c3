"""Demo stage: the synthetic demo world (`demo.out`) and its WD-interface tagger (`demo.tagger_out`).

The Prefect contract only: `DEMO`, the two units' keys and resume markers, `build_demo` and
`build_demo_task`; building the world and the tagger is `tagdit.demo.build`. Each unit is skipped
when its marker matches its own key: the world (depends on the generator code, `demo.n_images`,
`demo.seed`) and the tagger (depends on the generator and tagger code, `demo.seed` and its training
knobs; not on `n_images` beyond the evaluation set). Changing the world's size therefore does not
retrain the tagger.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prefect import task

from tagdit.config import PipelineConfig
from tagdit.demo.build import (
    EVAL_IMAGES,
    TAGGER_FILES,
    TAGGER_MARKER,
    WORLD_MARKER,
    build_tagger,
    build_world,
    clear_outputs,
    headline,
    tagger_report,
    world_files,
    world_summary,
)
from tagdit.files import sha256_text
from tagdit.orchestrate.markers import marker_matches, write_marker
from tagdit.orchestrate.stage import Stage, StageRecord, code_version, stage_cache_key

log = logging.getLogger(__name__)

WORLD_MODULES = ("tagdit.demo.labels", "tagdit.demo.draw", "tagdit.demo.world")
TAGGER_MODULES = (*WORLD_MODULES, "tagdit.demo.tagger_data", "tagdit.demo.tagger", "tagdit.data.tagger",
                  "tagdit.data.onnx_session", "tagdit.formats.selected_tags", "tagdit.formats.wd_image")


def demo_root(cfg: PipelineConfig) -> Path:
    """The folder holding both outputs (the stage stamp lives here)."""
    return Path(os.path.commonpath([cfg.demo.out.resolve(), cfg.demo.tagger_out.resolve()]))


DEMO = Stage(
    name="demo-world",
    modules=("tasks.demo", "tagdit.demo.build", *TAGGER_MODULES),
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


def build_world_unit(cfg: PipelineConfig) -> dict[str, Any]:
    """Generate the world unless its marker says this exact world is already there."""
    out, key = cfg.demo.out, world_key(cfg)
    if marker_matches(out / WORLD_MARKER, key):
        log.info("demo world: up to date in %s", out)
        return world_summary(out)
    (out / WORLD_MARKER).unlink(missing_ok=True)
    summary = build_world(out, cfg.demo.n_images, cfg.demo.seed)
    write_marker(out / WORLD_MARKER, key, world_files(out))
    return summary


def build_tagger_unit(cfg: PipelineConfig) -> dict[str, Any]:
    """Train + export + evaluate the tagger unless its marker says it is already built."""
    out, key = cfg.demo.tagger_out, tagger_key(cfg)
    if marker_matches(out / TAGGER_MARKER, key):
        log.info("demo tagger: up to date in %s", out)
        return tagger_report(out)
    (out / TAGGER_MARKER).unlink(missing_ok=True)
    report = build_tagger(out, cfg.demo.seed, cfg.demo.tagger_images, cfg.demo.tagger_epochs, cfg.demo.n_images)
    write_marker(out / TAGGER_MARKER, key, [out / f for f in TAGGER_FILES])
    return report


def build_demo(cfg: PipelineConfig, force: bool = False) -> StageRecord:
    """Build (or reuse) the demo world and the demo tagger; returns the stage record."""
    if not force and (rec := DEMO.valid_record(cfg, {})):
        return rec
    if force:
        clear_outputs(cfg.demo.out, cfg.demo.tagger_out)
        DEMO.stamp_path(cfg, {}).unlink(missing_ok=True)
    world = build_world_unit(cfg)
    report = build_tagger_unit(cfg)
    files = [*world_files(cfg.demo.out), *(cfg.demo.tagger_out / f for f in TAGGER_FILES)]
    return DEMO.write_stamp(cfg, {}, [f.resolve() for f in files], headline(world, report))


@task(name="demo-world", cache_key_fn=stage_cache_key(DEMO), persist_result=True)
def build_demo_task(cfg: PipelineConfig, force: bool = False) -> StageRecord:
    """Prefect wrapper of `build_demo`."""
    return build_demo(cfg, force)
