"""Tag stage: WD 1.4 tags for every crop, merged with sidecar `name.txt` tags; one file per chunk.

One tag chunk per crop chunk, named by a digest of the crop chunk's bytes, the tagger files and the
tag settings: a killed run resumes at the first missing chunk, a changed crop chunk re-tags only
itself. Each missing chunk is a `tag_chunk_task` on the stage's task runner (`tagdit.chunks`), with
the ONNX tagger loaded once per worker process. Rows: key, tags (score order), scores (sidecar tags
score 1.0), categories, rating.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from tagdit.chunks import chunk_runner, run_units, unit_task
from tagdit.config import PipelineConfig, TaggerConfig
from tagdit.files import atomic_path, remove_stale_temps, sha256_text
from tagdit.formats.selected_tags import UNKNOWN, display_name
from tagdit.stage import (
    Stage,
    StageRecord,
    config_sections,
    file_fingerprint,
    stage_cache_key,
)
from tagdit.tagger import ResolvedTagger, TagResult, WDTagger, resolve_tagger

log = logging.getLogger(__name__)

SIDECAR_SCORE = 1.0  # a human-written tag is certain
TAG_SCHEMA = pa.schema([
    ("key", pa.string()), ("tags", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
    ("categories", pa.list_(pa.int16())), ("rating", pa.string()),
])  # fmt: skip


def parse_sidecar(text: str | None, exclude: tuple[str, ...] = ()) -> list[str]:
    """`Long_Hair, smile ,, smile` -> ["long hair", "smile"]: lower case, deduplicated, in order."""
    if not text:
        return []
    excluded = {display_name(t.lower()) for t in exclude}
    out: list[str] = []
    for raw in text.replace("\n", ",").split(","):
        t = display_name(raw.strip().lower())
        if t and t not in out and t not in excluded:
            out.append(t)
    return out


def merge_tags(res: TagResult, sidecar: list[str], mode: str) -> tuple[list[str], list[float]]:
    """Combine tagger and sidecar tags per `tagger.sidecar` (merge | sidecar | tagger)."""
    if mode == "tagger":
        return res.tags, res.scores
    if mode == "sidecar":
        return sidecar, [SIDECAR_SCORE] * len(sidecar)
    rest = [(t, s) for t, s in zip(res.tags, res.scores, strict=True) if t not in sidecar]
    return sidecar + [t for t, _ in rest], [SIDECAR_SCORE] * len(sidecar) + [s for _, s in rest]


def _ok_rows(crop_chunk: Path, columns: list[str]) -> pa.Table:
    return pq.read_table(crop_chunk, columns=["ok", *columns]).filter(pc.field("ok"))


def tag_chunk(tagger, crop_chunk: Path, dst: Path, tcfg: TaggerConfig) -> int:
    """Tag one crop chunk into `dst` (atomic); returns the rows written."""
    from PIL import Image

    table = _ok_rows(crop_chunk, ["key", "sidecar", "image"])
    images = (Image.open(io.BytesIO(b)) for b in table.column("image").to_pylist())
    results = tagger.tag_images(images)  # batches never straddle chunks: a resumed run gets the same floats
    category = tagger.labels.category_of()
    rows = []
    for key, side, res in zip(table.column("key").to_pylist(), table.column("sidecar").to_pylist(), results,
                              strict=True):
        tags, scores = merge_tags(res, parse_sidecar(side, tcfg.exclude), tcfg.sidecar)
        cats = [category.get(t, UNKNOWN) for t in tags]
        rows.append({"key": key, "tags": tags, "scores": scores, "categories": cats, "rating": res.rating})
    with atomic_path(dst) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=TAG_SCHEMA), tmp)
    return len(rows)


_TAGGERS: dict[str, WDTagger] = {}  # this process's loaded tagger, keyed on its files and settings


def loaded_tagger(tagger: ResolvedTagger, tcfg: TaggerConfig) -> WDTagger:
    """The ONNX tagger for these files and settings, loaded once per worker process."""
    key = tagger.model_dump_json() + tcfg.model_dump_json()
    if key not in _TAGGERS:
        _TAGGERS.clear()  # one model at a time
        _TAGGERS[key] = WDTagger(tagger.model, tagger.tags_csv, tcfg.general_threshold, tcfg.character_threshold,
                                 tcfg.mcut, tcfg.exclude, tcfg.batch_size)
    return _TAGGERS[key]


@unit_task(name="tag-chunk", run_name="tag {dst.name}")
def tag_chunk_task(crop_chunk: Path, dst: Path, tagger: ResolvedTagger, tcfg: TaggerConfig) -> int:
    """One tag chunk, with this worker process's loaded tagger; returns the rows written."""
    return tag_chunk(loaded_tagger(tagger, tcfg), crop_chunk, dst, tcfg)


TAG = Stage(
    name="tag",
    modules=("tasks.tag", "tagdit.tagger", "tagdit.formats.selected_tags", "tagdit.formats.wd_image"),
    sections=("tagger.general_threshold", "tagger.character_threshold", "tagger.mcut", "tagger.exclude",
              "tagger.sidecar"),
    out_dir=lambda cfg, up: cfg.dataset_dir / "work" / "tag",
    extra_inputs=lambda cfg: resolve_tagger(cfg.tagger).key_inputs(),  # the commit and the files' bytes
)


def chunk_digest(cfg: PipelineConfig, crop_chunk: Path) -> str:
    """A tag chunk's name: only the tagger's bytes count, so a commit that leaves them alone re-tags nothing."""
    settings = repr(sorted(config_sections(cfg, TAG.sections).items()))
    tagger = repr(sorted(resolve_tagger(cfg.tagger).fingerprint.items()))
    return sha256_text(TAG.code_key(), settings, tagger, file_fingerprint(crop_chunk))[:16]


def tag_stage(cfg: PipelineConfig, crop: StageRecord, force: bool = False) -> StageRecord:
    """Run (or resume) the tag stage on the crop stage's chunks; returns its record."""
    if not force and (rec := TAG.valid_record(cfg, {"crop": crop})):
        return rec
    out = TAG.out_dir(cfg, {"crop": crop})
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    crop_chunks = [Path(crop.out_dir) / c for c in crop.info["chunks"]]
    dsts = [out / f"chunk-{i:06d}-{chunk_digest(cfg, c)}.parquet" for i, c in enumerate(crop_chunks)]
    todo = [i for i, d in enumerate(dsts) if not d.exists()]
    log.info("tag: %d chunks, %d to do", len(dsts), len(todo))
    if todo:
        params = [{"crop_chunk": crop_chunks[i], "dst": dsts[i], "tagger": resolve_tagger(cfg.tagger),
                   "tcfg": cfg.tagger} for i in todo]
        try:
            with chunk_runner(cfg.prefect) as runner:  # locally one chunk at a time: ONNX uses every core
                run_units(runner, tag_chunk_task, params, "tag", unit_name="chunk")
        finally:
            _TAGGERS.clear()  # the local runner's session; a Dask worker keeps its own
    for stale in set(out.glob("chunk-*.parquet")) - set(dsts):
        stale.unlink()
    n = sum(pq.read_metadata(d).num_rows for d in dsts)
    info = {"tagged": n, "chunks": [d.name for d in dsts], "sidecar_mode": cfg.tagger.sidecar,
            **resolve_tagger(cfg.tagger).record_info()}
    log.info("tag: %d images tagged", n)
    return TAG.write_stamp(cfg, {"crop": crop}, dsts, info)


@task(name="tag", cache_key_fn=stage_cache_key(TAG), persist_result=True)
def tag_task(cfg: PipelineConfig, crop: StageRecord, force: bool = False) -> StageRecord:
    """Prefect task: WD 1.4 tags (+ sidecar tags) for every crop."""
    rec = tag_stage(cfg, crop, force=force)
    get_run_logger().info("tag: %(tagged)d images tagged (sidecar mode %(sidecar_mode)s)", rec.info)
    return rec
