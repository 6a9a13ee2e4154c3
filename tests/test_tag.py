import pyarrow.parquet as pq

from tagdit.config import load_config
from tasks.crop import crop_stage
from tasks.tag import parse_sidecar, tag_stage
from tests.wd_fixture import GOOD, build_wd_model


def config(tmp_path, world, *extra):
    src, wd = world
    return load_config(None, [f"data.source={src}", f"data.root={tmp_path / 'shards'}", "data.name=t",
                              "data.resolution=32", "crop.max_pixels=1000000", "crop.workers=1",
                              "crop.chunk_size=7", f"tagger.path={wd}", *extra])


def tag_rows(rec):
    rows = [r for c in rec.info["chunks"] for r in pq.read_table(f"{rec.out_dir}/{c}").to_pylist()]
    return {r["key"]: r for r in rows}


def by_source(crop, rows):
    keys = {r["source"]: r["key"] for c in crop.info["chunks"]
            for r in pq.read_table(f"{crop.out_dir}/{c}", columns=["key", "source"]).to_pylist()}
    return {s: rows[k] for s, k in keys.items() if k in rows}


def test_sidecar_tags_merge_first_with_score_one_and_tagger_tags_follow(tmp_path, world):
    cfg = config(tmp_path, world)
    crop = crop_stage(cfg)
    rec = tag_stage(cfg, crop)
    rows = by_source(crop, tag_rows(rec))
    assert rec.info["tagged"] == GOOD == len(rows)
    red = rows["red.jpg"]
    assert red["tags"][:3] == ["hand drawn", "red", "^_^"] and red["scores"][:3] == [1.0, 1.0, 1.0]
    assert red["categories"][:3] == [-1, 0, 0] and red["tags"].count("red") == 1
    assert "test character" in rows["sub/Blue.PNG"]["tags"]
    assert "dark" in rows["image.TIFF"]["tags"] and "white background" in rows["image.bmp"]["tags"]
    for r in rows.values():
        assert r["scores"] == sorted(r["scores"], reverse=True)
        assert r["rating"] in {"general", "sensitive", "questionable", "explicit"}


def test_tagger_only_and_sidecar_only_modes(tmp_path, world):
    cfg = config(tmp_path, world, "tagger.sidecar=tagger")
    crop = crop_stage(cfg)
    only_tagger = by_source(crop, tag_rows(tag_stage(cfg, crop)))
    assert "hand drawn" not in only_tagger["red.jpg"]["tags"] and "red" in only_tagger["red.jpg"]["tags"]
    cfg = config(tmp_path, world, "tagger.sidecar=sidecar")
    only_side = by_source(crop, tag_rows(tag_stage(cfg, crop)))
    assert only_side["red.jpg"]["tags"] == ["hand drawn", "red", "^_^"]
    assert only_side["sub/Blue.PNG"]["tags"] == []


def test_changed_tagger_model_or_threshold_retags_and_unchanged_reuses(tmp_path, world):
    src, _ = world
    wd = build_wd_model(tmp_path / "wd2")
    cfg = config(tmp_path, (src, wd))
    crop = crop_stage(cfg)
    first = tag_stage(cfg, crop)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards/t/work/tag").glob("chunk-*")}
    assert tag_stage(cfg, crop) == first
    cfg2 = config(tmp_path, (src, wd), "tagger.general_threshold=0.05")
    assert tag_stage(cfg2, crop).info["chunks"] != first.info["chunks"]
    build_wd_model(wd, fixed_batch=1)  # different model bytes, same folder
    third = tag_stage(cfg, crop)
    assert third.key != first.key and set(third.info["chunks"]).isdisjoint(mtimes)


def test_parse_sidecar_normalises_and_deduplicates():
    assert parse_sidecar("Long_Hair, smile ,, smile\n^_^", ("smile",)) == ["long hair", "^_^"]
    assert parse_sidecar(None) == []
