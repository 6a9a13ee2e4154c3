"""Tag stage: WD 1.4 tags for every crop, merged with sidecar `name.txt` tags; one tag chunk per crop chunk.

The Prefect contract only: `TAG` (what the stage's key hashes), `tag_chunks_task` (a few consecutive
chunks, about `crop.unit_files` images, on the stage's task runner, `tagdit.orchestrate.chunks`, each
chunk on a worker per device of `prefect.devices`, with the ONNX tagger loaded once per worker
process), `tag_stage` and `tag_task` (the `gpu` slot). The tagging itself is `tagdit.data.tag`; the
chunk files are
`tagdit.formats.chunks`. A tag chunk is named by its crop chunk's bucket and a digest of the crop
chunk's bytes, the tagger files and the tag settings: a killed run resumes at the first missing
chunk, a changed crop chunk re-tags only itself, and in it only its new or changed crops (the rest
are copied from the bucket's previous tag chunk).
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import get_run_logger, task

from tagdit.config import PipelineConfig, TaggerConfig
from tagdit.data.tag import forget_taggers, tag_chunk_on, tagger_cuda_devices
from tagdit.data.tagger import ResolvedTagger, resolve_tagger
from tagdit.data.walk import source_base
from tagdit.files import remove_stale_temps, sha256_text
from tagdit.formats.chunks import chunk_bucket, chunk_name, tag_chunk_rows
from tagdit.orchestrate.chunks import chunk_runner, items_per_run, pack_units, run_units, unit_task
from tagdit.orchestrate.device_workers import DeviceRun, local_devices, on_devices
from tagdit.orchestrate.stage import (
    Stage,
    StageRecord,
    config_sections,
    file_fingerprint,
    stage_cache_key,
)
from tagdit.store_folders import names_in, remove, remove_tree
from tagdit.store_streams import each_read

log = logging.getLogger(__name__)


@unit_task(name="tag-chunks", run_name="tag chunks {first}-{last}")
def tag_chunks_task(chunks: list[tuple[Path, Path, Path | None]], tagger: ResolvedTagger, tcfg: TaggerConfig,
                    source: str | Path, tagger_key: str, first: int, last: int) -> list[DeviceRun]:
    """Some consecutive (crop chunk, tag chunk, the bucket's previous tag chunk) triples, all queued on
    the device workers at once, each on a free worker's tagger (or this process's); a run's value is the
    rows written."""
    runs = on_devices(tag_chunk_on, [(c, dst, tagger, tcfg, source, prev, tagger_key) for c, dst, prev in chunks])
    for (_, dst, _), run in zip(chunks, runs, strict=True):
        log.info("tag: %s -> %d rows on %s", dst.name, run.value, run.device or "the default device")
    return runs


TAG = Stage(
    name="tag",
    version=4,  # 2: the tagger reads the source square; 3: Pillow's resize; 4: per bucket, rows record their input
    modules=("tasks.tag", "tagdit.data.tag", "tagdit.data.tagger", "tagdit.data.onnx_session", "tagdit.formats.chunks",
             "tagdit.formats.selected_tags", "tagdit.formats.wd_image",
             "tagdit.devices:unit_threads", "tagdit.devices:is_fake",  # a fake device's one thread
             "tagdit.data.crop:fetch_bytes", "tagdit.data.crop:locate", "tagdit.data.walk:source_base"),  # the source read
    sections=("tagger.general_threshold", "tagger.character_threshold", "tagger.mcut", "tagger.exclude",
              "tagger.sidecar", "tagger.resize", "tagger.pre_shrink"),
    out_dir=lambda cfg, up: cfg.dataset_dir / "work" / "tag",
    reads_store=True,
    extra_inputs=lambda cfg: resolve_tagger(cfg.tagger).key_inputs(),  # the commit and the files' bytes
)


def tagger_key(cfg: PipelineConfig) -> str:
    """The code, settings and tagger files' bytes: only these count, so a commit that leaves them alone re-tags nothing."""
    settings = repr(sorted(config_sections(cfg, TAG.sections).items()))
    tagger = repr(sorted(resolve_tagger(cfg.tagger).fingerprint.items()))
    return sha256_text(TAG.code_key(), settings, tagger)


def chunk_digest(cfg: PipelineConfig, crop_chunk: Path, key: str | None = None) -> str:
    """A tag chunk's name: the tagger key (`key`, when already made) and the bytes of the crop chunk it tags."""
    return sha256_text(key or tagger_key(cfg), file_fingerprint(crop_chunk))[:16]


def tag_stage(cfg: PipelineConfig, crop: StageRecord, force: bool = False) -> StageRecord:
    """Run (or resume) the tag stage on the crop stage's chunks; returns its record."""
    if not force and (rec := TAG.valid_record(cfg, {"crop": crop})):
        return rec
    out = TAG.out_dir(cfg, {"crop": crop})
    if force:
        remove_tree(out)  # (and the store's objects of a URL dataset: units are found by name there too)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    crop_chunks, key = [Path(crop.out_dir) / c for c in crop.info["chunks"]], tagger_key(cfg)
    dsts = [out / chunk_name(chunk_bucket(c.name), chunk_digest(cfg, c, key)) for c in crop_chunks]  # a bucket keeps its number
    existing = names_in(out, "chunk-*.parquet")  # one listing, not a stat per chunk (and the store's of a URL dataset)
    todo = [i for i, d in enumerate(dsts) if d.name not in existing]
    log.info("tag: %d chunks, %d to do", len(dsts), len(todo))
    if todo:
        earlier: dict[int, Path] = {}  # each bucket's earlier tag chunk: rows of unchanged crops are copied
        for name in sorted(existing):
            earlier.setdefault(chunk_bucket(name), out / name)
        previous = {i: earlier.get(chunk_bucket(dsts[i].name)) for i in todo}
        devices = local_devices(cfg.prefect.devices, tagger_cuda_devices())
        packs = pack_units(todo, items_per_run(cfg), 4 * len(devices))
        params = [{"chunks": [(crop_chunks[i], dsts[i], previous[i]) for i in pack], "tagger": resolve_tagger(cfg.tagger),
                   "tcfg": cfg.tagger, "source": source_base(crop.info["source"]), "tagger_key": key,
                   "first": chunk_bucket(dsts[pack[0]].name), "last": chunk_bucket(dsts[pack[-1]].name)}
                  for pack in packs]
        try:  # on one device one chunk at a time: ONNX uses the whole device (every core of a CPU)
            with chunk_runner(cfg.prefect, devices=devices) as runner:
                run_units(runner, tag_chunks_task, params, "tag", [len(p) for p in packs], "chunk")
        finally:
            forget_taggers()  # the local runner's session; a Dask worker keeps its own
    for stale in existing - {d.name for d in dsts}:
        remove(out / stale)
    n = sum(each_read(tag_chunk_rows, dsts))
    info = {"tagged": n, "chunks": [d.name for d in dsts], "sidecar_mode": cfg.tagger.sidecar,
            **resolve_tagger(cfg.tagger).record_info()}
    log.info("tag: %d images tagged", n)
    return TAG.write_stamp(cfg, {"crop": crop}, dsts, info)


@task(name="tag", cache_key_fn=stage_cache_key(TAG), persist_result=True, tags=["gpu"])
def tag_task(cfg: PipelineConfig, crop: StageRecord, force: bool = False) -> StageRecord:
    """Prefect task: WD 1.4 tags (+ sidecar tags) for every crop."""
    rec = tag_stage(cfg, crop, force=force)
    get_run_logger().info("tag: %(tagged)d images tagged (sidecar mode %(sidecar_mode)s)", rec.info)
    return rec
