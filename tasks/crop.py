"""Crop stage: every file under `data.source` -> a crop chunk row (a square crop or a reject).

The Prefect contract only: `CROP` (what the stage's key hashes), `crop_chunk_task` (one chunk on
the stage's task runner, see `tagdit.orchestrate.chunks`), `crop_stage` (lists the files, runs the
missing chunks, stamps the outputs) and `crop_task`. The cropping itself is `tagdit.data.crop`;
the chunk files are `tagdit.formats.chunks`. Chunk files carry a digest of their inputs in their
name, so a killed run resumes and a changed file recomputes only its chunk.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from prefect import get_run_logger, task

from tagdit.config import PipelineConfig
from tagdit.data.crop import CropParams, SourceFile, chunk_digest, list_sources, process_chunk
from tagdit.files import remove_stale_temps
from tagdit.formats.chunks import read_crop_chunk
from tagdit.orchestrate.chunks import chunk_runner, offload, run_units, unit_task
from tagdit.orchestrate.stage import Stage, StageRecord, stage_cache_key, tree_fingerprint

log = logging.getLogger(__name__)


@unit_task(name="crop-chunk", run_name="crop {dst.name}")
def crop_chunk_task(source: Path, files: list[SourceFile], p: CropParams, dst: Path) -> tuple[int, int]:
    """One crop chunk (on the local runner's process pool when it has one); returns (ok, rejected)."""
    return offload(process_chunk, source, files, p, dst)


CROP = Stage(
    name="crop",
    version=2,  # 2: a row for every file found (non-images rejected with a reason), sidecars counted apart
    modules=("tasks.crop", "tagdit.data.crop", "tagdit.formats.chunks", "tagdit.formats.wd_image"),
    sections=("data.resolution", "crop.mode", "crop.min_size", "crop.max_pixels", "crop.chunk_size",
              "shards.image_format", "shards.jpeg_quality"),
    out_dir=lambda cfg, up: cfg.dataset_dir / "work" / "crop",
    extra_inputs=lambda cfg: {"source": tree_fingerprint(cfg.data.source)},
)


def crop_stage(cfg: PipelineConfig, force: bool = False) -> StageRecord:
    """Run (or resume) the crop stage; returns its record."""
    if not force and (rec := CROP.valid_record(cfg, {})):
        return rec
    out = CROP.out_dir(cfg, {})
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    source = Path(cfg.data.source)
    if not source.is_dir():
        raise FileNotFoundError(f"data.source={str(source)!r} is not a folder")
    p, cs = CropParams.from_config(cfg), cfg.crop.chunk_size
    files, sidecars = list_sources(source)
    chunks = [files[i : i + cs] for i in range(0, len(files), cs)]
    dsts = [out / f"chunk-{i:06d}-{chunk_digest(c, p, CROP.code_key())}.parquet" for i, c in enumerate(chunks)]
    todo = [i for i, d in enumerate(dsts) if not d.exists()]
    log.info("crop: %d files (+ %d sidecars) in %d chunks under %s; %d chunks to do", len(files), sidecars,
             len(chunks), source, len(todo))
    if todo:
        workers = min(cfg.crop.workers or os.cpu_count() or 1, len(todo))
        params = [{"source": source, "files": chunks[i], "p": p, "dst": dsts[i]} for i in todo]
        with chunk_runner(cfg.prefect, threads=workers, processes=workers) as runner:
            run_units(runner, crop_chunk_task, params, "crop", [len(chunks[i]) for i in todo], "img")
    for stale in set(out.glob("chunk-*.parquet")) - set(dsts):
        stale.unlink()
    ok = sum(sum(read_crop_chunk(d, ["ok"]).column("ok").to_pylist()) for d in dsts)
    info = {"found": len(files), "sidecars": sidecars, "ok": ok, "rejected": len(files) - ok,
            "chunks": [d.name for d in dsts], "source": str(source)}
    log.info("crop: %d found = %d cropped + %d rejected (and %d sidecars)", len(files), ok, len(files) - ok,
             sidecars)
    return CROP.write_stamp(cfg, {}, dsts, info)


@task(name="crop", cache_key_fn=stage_cache_key(CROP), persist_result=True)
def crop_task(cfg: PipelineConfig, force: bool = False) -> StageRecord:
    """Prefect task: square crops of every image under data.source."""
    rec = crop_stage(cfg, force=force)
    get_run_logger().info("crop: %(found)d files found = %(ok)d cropped + %(rejected)d rejected "
                          "(and %(sidecars)d sidecars)", {"sidecars": 0, **rec.info})
    return rec
