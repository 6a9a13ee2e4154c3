"""Tag stage: WD 1.4 tags for every crop, merged with sidecar `name.txt` tags; one file per chunk.

One tag chunk per crop chunk, named by a digest of the crop chunk's bytes, the tagger files and the
tag settings: a killed run resumes at the first missing chunk, a changed crop chunk re-tags only
itself. Rows: key, tags (score order), scores (sidecar tags score 1.0), categories, rating.
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task

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
from tagdit.tagger import BATCH_END, TagResult, resolve_tagger

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


def tag_chunks(tagger, crop_chunks: list[Path], dsts: list[Path], tcfg: TaggerConfig) -> None:
    """Tag crop chunks as one stream (preprocessing never waits at chunk boundaries); each tag
    chunk is written atomically as soon as its last image is tagged."""
    from PIL import Image
    from tqdm import tqdm

    def images() -> Iterator:
        for c in crop_chunks:
            for b in _ok_rows(c, ["image"]).column("image").to_pylist():
                yield Image.open(io.BytesIO(b))
            yield BATCH_END  # batches never straddle chunks: a resumed run gets the same floats

    results = tagger.tag_images(images())
    category = tagger.labels.category_of()
    for c, dst in tqdm(list(zip(crop_chunks, dsts, strict=True)), desc="tag", unit="chunk", disable=len(dsts) < 2):
        meta = _ok_rows(c, ["key", "sidecar"]).to_pydict()
        rows = []
        for key, side in zip(meta["key"], meta["sidecar"], strict=True):
            res = next(results)
            tags, scores = merge_tags(res, parse_sidecar(side, tcfg.exclude), tcfg.sidecar)
            cats = [category.get(t, UNKNOWN) for t in tags]
            rows.append({"key": key, "tags": tags, "scores": scores, "categories": cats, "rating": res.rating})
        with atomic_path(dst) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=TAG_SCHEMA), tmp)
    if next(results, None) is not None:
        raise RuntimeError("crop chunks changed while they were being tagged")


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
    from tagdit.tagger import WDTagger

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
        tagger = WDTagger.from_config(cfg.tagger)
        tag_chunks(tagger, [crop_chunks[i] for i in todo], [dsts[i] for i in todo], cfg.tagger)
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
