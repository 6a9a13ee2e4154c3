import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tagdit.config import load_config
from tagdit.data.tagger import WDTagger
from tagdit.formats.wd_image import centre_box
from tasks.crop import crop_stage
from tasks.tag import parse_sidecar, source_square, tag_stage
from tests.wd_fixture import GOOD, _jpeg_with_orientation, build_wd_model


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


def build_detail_model(folder: Path) -> Path:
    """A WD-interface tagger that sees only fine detail: `striped` = sigmoid(0.05 · mean |∂x| − 5)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    names = ["general", "sensitive", "questionable", "explicit", "striped"]
    w = np.array([[0, 0, 0, 0, 0.05]], np.float32)  # (1, T): only `striped` reads the feature
    b = np.array([1, 0, 0, 0, -5], np.float32)
    const = {"s0": [0], "e0": [447], "s1": [1], "e1": [448], "ax": [2], "all": [1, 2, 3], "one": [1]}
    graph = helper.make_graph([
        helper.make_node("Slice", ["input_1:0", "s1", "e1", "ax"], ["right"]),
        helper.make_node("Slice", ["input_1:0", "s0", "e0", "ax"], ["left"]),
        helper.make_node("Sub", ["right", "left"], ["dx"]),
        helper.make_node("Abs", ["dx"], ["adx"]),
        helper.make_node("ReduceMean", ["adx", "all"], ["g"], keepdims=0),  # (N,)
        helper.make_node("Unsqueeze", ["g", "one"], ["g1"]),  # (N, 1)
        helper.make_node("MatMul", ["g1", "W"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["predictions_sigmoid"]),
    ], "detail", [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["N", 448, 448, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["N", len(names)])],
        [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in const.items()]
        + [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    rows = [f"{i},{n},{9 if i < 4 else 0},1" for i, n in enumerate(names)]
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + "\n".join(rows) + "\n")
    return folder


def stripes(w: int, h: int, period: int) -> Image.Image:
    """Black and white vertical stripes, `period` px each: a detail no 32 px crop keeps."""
    cols = (np.arange(w) // period) % 2 * 255
    return Image.fromarray(np.tile(cols.astype(np.uint8), (h, 1))).convert("RGB")


def test_tagger_reads_the_source_resolution_not_the_small_crop(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    stripes(448, 448, 1).save(src / "fine.png")
    stripes(1000, 950, 4).save(src / "large.png")  # reduced 2x before the tagger: still striped
    Image.new("RGB", (500, 400), (128, 128, 128)).save(src / "flat.png")
    wd = build_detail_model(tmp_path / "wd")
    cfg = config(tmp_path, (src, wd))
    crop = crop_stage(cfg)
    rows = by_source(crop, tag_rows(tag_stage(cfg, crop)))
    assert "striped" in rows["fine.png"]["tags"] and "striped" in rows["large.png"]["tags"]
    assert "striped" not in rows["flat.png"]["tags"]
    # the dataset-size crop (32 px) lost the stripes: tagging it, as before, misses the tag
    crops = {r["source"]: r["image"] for c in crop.info["chunks"] for r in pq.read_table(f"{crop.out_dir}/{c}").to_pylist()}
    tagger = WDTagger(wd / "model.onnx", wd / "selected_tags.csv")
    old = list(tagger.tag_images([Image.open(io.BytesIO(crops["fine.png"]))]))[0]
    assert "striped" not in old.tags


@pytest.mark.parametrize(("fmt", "size"), [("JPEG", (3000, 2000)), ("PNG", (2000, 1500)), ("JPEG", (449, 600)),
                                           ("PNG", (897, 897)), ("JPEG", (1799, 1800)), ("JPEG", (1400, 1400)),
                                           ("PNG", (300, 200))])
def test_source_square_is_reduced_but_never_below_the_tagger_size(tmp_path, fmt, size):
    import hashlib

    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", size, (200, 30, 30)).save(path, fmt)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    box = list(centre_box(*size))
    img = source_square(path, sha, list(size), box, 448)
    side = box[2] - box[0]
    assert img.mode == "RGB" and img.width == img.height
    largest = side if side < 2 * 448 else side // 2 + 1  # reduced at least 2x once it can be
    assert min(side, 448) <= img.width <= largest


def test_source_square_follows_exif_and_pads_on_white(tmp_path):
    import hashlib

    raw = Image.new("RGB", (1200, 900), (255, 0, 0))
    raw.paste((0, 0, 255), (0, 0, 600, 900))  # left half blue; orientation 6 turns it to the top half
    path = tmp_path / "rot.jpg"
    path.write_bytes(_jpeg_with_orientation(raw, 6))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    img = np.asarray(source_square(path, sha, [900, 1200], [0, 150, 900, 1050], 448)).astype(int)
    assert img.shape[0] >= 448
    assert (abs(img[10, 10] - [0, 0, 255]) < 40).all() and (abs(img[-10, 10] - [255, 0, 0]) < 40).all()
    wide = tmp_path / "wide.png"
    Image.new("RGB", (900, 300), (0, 255, 0)).save(wide)
    sha = hashlib.sha256(wide.read_bytes()).hexdigest()
    pad = np.asarray(source_square(wide, sha, [900, 300], [0, -300, 900, 600], 448))
    assert pad.shape == (450, 450, 3) and (pad[:140] == 255).all() and (pad[-140:] == 255).all()
    assert (pad[160:290] == [0, 255, 0]).all()
    with pytest.raises(RuntimeError, match="changed since the crop stage"):
        source_square(wide, "0" * 64, [900, 300], [0, -300, 900, 600], 448)
