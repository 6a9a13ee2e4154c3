import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagdit.config import load_config
from tagdit.data.tag import loaded_tagger, parse_sidecar, source_square
from tagdit.data.tagger import WDTagger
from tagdit.demo.stand_in_taggers import build_pixel_model, build_wd_model, drawn_image
from tagdit.formats.chunks import read_crop_chunk, read_tag_chunk
from tagdit.formats.wd_image import centre_box, wd_preprocess, wd_preprocess_torch
from tasks.crop import crop_stage
from tasks.tag import chunk_digest, tag_stage
from tests.wd_fixture import GOOD, _jpeg_with_orientation, reference_prepare


def config(tmp_path, world, *extra):
    src, wd = world
    return load_config(None, [f"data.source={src}", f"data.root={tmp_path / 'shards'}", "data.name=t",
                              "data.resolution=32", "crop.max_pixels=1000000", "crop.workers=1",
                              "data.buckets=4", f"tagger.path={wd}", *extra])


def tag_rows(rec):
    rows = [r for c in rec.info["chunks"] for r in read_tag_chunk(Path(rec.out_dir) / c).to_pylist()]
    return {r["key"]: r for r in rows}


def by_source(crop, rows):
    keys = {r["source"]: r["key"] for c in crop.info["chunks"]
            for r in read_crop_chunk(Path(crop.out_dir) / c, ["key", "source"]).to_pylist()}
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


@pytest.mark.parametrize("pre_shrink", [False, True])
def test_first_squares_decode_while_the_session_loads_unless_pre_shrink_needs_its_size(tmp_path, world, monkeypatch,
                                                                                      pre_shrink):
    import threading

    import tagdit.data.tag as tag_lib

    cfg = config(tmp_path, world, f"tagger.pre_shrink={str(pre_shrink).lower()}")
    crop = crop_stage(cfg)
    decoding, load = threading.Event(), tag_lib.loaded_tagger
    real_square = tag_lib.source_square
    monkeypatch.setattr(tag_lib, "source_square", lambda *a: decoding.set() or real_square(*a))

    def slow_load(*a):  # a first load: the decode threads have begun by the time it ends, or they wait for it
        began = decoding.wait(timeout=0.5 if pre_shrink else 30)
        seen.append(began)
        return load(*a)

    seen: list[bool] = []
    monkeypatch.setattr(tag_lib, "loaded_tagger", slow_load)
    rec = tag_stage(cfg, crop)
    assert rec.info["tagged"] == GOOD and seen[0] is (not pre_shrink)


def test_a_source_changed_after_cropping_fails_its_chunk_by_name_and_leaves_no_decode_threads(tmp_path, world):
    import shutil
    import threading
    import time

    src = tmp_path / "src"
    shutil.copytree(world[0], src, symlinks=True)  # the corpus holds a dangling link
    cfg = config(tmp_path, (src, world[1]))
    crop = crop_stage(cfg)
    before = threading.active_count()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(src / "red.jpg")  # new bytes under a cropped name
    with pytest.raises(RuntimeError, match=r"red\.jpg changed since the crop stage read it"):
        tag_stage(cfg, crop)
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_tagger_only_and_sidecar_only_modes(tmp_path, world):
    cfg = config(tmp_path, world, "tagger.sidecar=tagger")
    crop = crop_stage(cfg)
    only_tagger = by_source(crop, tag_rows(tag_stage(cfg, crop)))
    assert "hand drawn" not in only_tagger["red.jpg"]["tags"] and "red" in only_tagger["red.jpg"]["tags"]
    cfg = config(tmp_path, world, "tagger.sidecar=sidecar")
    only_side = by_source(crop, tag_rows(tag_stage(cfg, crop)))
    assert only_side["red.jpg"]["tags"] == ["hand drawn", "red", "^_^"]
    assert only_side["sub/Blue.PNG"]["tags"] == []


def test_changed_onnx_model_or_threshold_retags_and_unchanged_reuses(tmp_path, world):
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
    stripes(1000, 950, 4).save(src / "large.png")  # resized 2.1x by the tagger: still striped
    Image.new("RGB", (500, 400), (128, 128, 128)).save(src / "flat.png")
    wd = build_detail_model(tmp_path / "wd")
    cfg = config(tmp_path, (src, wd))
    crop = crop_stage(cfg)
    rows = by_source(crop, tag_rows(tag_stage(cfg, crop)))
    assert "striped" in rows["fine.png"]["tags"] and "striped" in rows["large.png"]["tags"]
    assert "striped" not in rows["flat.png"]["tags"]
    # the dataset-size crop (32 px) lost the stripes: tagging it, as before, misses the tag
    crops = {r["source"]: r["image"] for c in crop.info["chunks"] for r in read_crop_chunk(Path(crop.out_dir) / c).to_pylist()}
    tagger = WDTagger(wd / "model.onnx", wd / "selected_tags.csv")
    old = list(tagger.tag_images([Image.open(io.BytesIO(crops["fine.png"]))]))[0]
    assert "striped" not in old.tags


@pytest.mark.parametrize(("fmt", "size"), [("JPEG", (3000, 2000)), ("PNG", (2000, 1500)), ("JPEG", (449, 600)),
                                           ("PNG", (897, 897)), ("JPEG", (1799, 1800)), ("JPEG", (1400, 1400)),
                                           ("PNG", (300, 200))])
def test_pre_shrink_reduces_the_source_square_but_never_below_the_tagger_size(tmp_path, fmt, size):
    import hashlib

    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", size, (200, 30, 30)).save(path, fmt)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    box = list(centre_box(*size))
    assert source_square(path, sha, list(size), box).size == (box[2] - box[0],) * 2  # by default: full size
    img = source_square(path, sha, list(size), box, shrink_to=448)
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
    img = np.asarray(source_square(path, sha, [900, 1200], [0, 150, 900, 1050])).astype(int)
    assert img.shape[0] >= 448
    assert (abs(img[10, 10] - [0, 0, 255]) < 40).all() and (abs(img[-10, 10] - [255, 0, 0]) < 40).all()
    wide = tmp_path / "wide.png"
    Image.new("RGB", (900, 300), (0, 255, 0)).save(wide)
    sha = hashlib.sha256(wide.read_bytes()).hexdigest()
    pad = np.asarray(source_square(wide, sha, [900, 300], [0, -300, 900, 600]))
    assert pad.shape == (900, 900, 3) and (pad[:300] == 255).all() and (pad[-300:] == 255).all()
    assert (pad[300:600] == [0, 255, 0]).all()
    shrunk = np.asarray(source_square(wide, sha, [900, 300], [0, -300, 900, 600], shrink_to=448))
    assert shrunk.shape == (450, 450, 3) and (shrunk[:140] == 255).all() and (shrunk[160:290] == [0, 255, 0]).all()
    with pytest.raises(RuntimeError, match="changed since the crop stage"):
        source_square(wide, "0" * 64, [900, 300], [0, -300, 900, 600])


# Score changes measured on pixel-sensitive random-weight taggers (docs/design.md §6; benchmarks/
# tag_pipeline_realcost.py): torch's resize moved scores by at most 0.0015, pre-shrinking large sources
# by up to 0.44 (a few tags; 0.05 % of tag decisions flipped); the bounds leave room for other images.
TORCH_RESIZE_TOL, PRE_SHRINK_TOL = 0.005, 0.5


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def drawings(tmp_path_factory) -> tuple[list[Path], Path]:
    """(large and small drawings as JPEG / PNG files, one with alpha; a pixel-sensitive tagger calibrated on them)."""
    folder = tmp_path_factory.mktemp("drawings")
    rng = np.random.default_rng(3)
    paths = []
    for i, (w, h, fmt, mode) in enumerate([(2000, 1500, "JPEG", "RGB"), (1000, 1300, "PNG", "RGBA"),
                                           (1200, 1800, "JPEG", "RGB"), (640, 480, "PNG", "RGB")]):
        paths.append(folder / f"{i}.{fmt.lower()}")
        drawn_image(rng, w, h, mode).save(paths[-1], fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    return paths, build_pixel_model(folder / "wd", [Image.open(p) for p in paths])


def test_default_source_square_is_the_reference_input_bit_for_bit(drawings):
    from PIL import ImageOps

    for path in drawings[0]:
        full = ImageOps.exif_transpose(Image.open(path))
        w, h = full.size
        centre, side = centre_box(w, h), max(w, h)
        pad = [(w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side]
        ours = wd_preprocess(source_square(path, sha(path), [w, h], list(centre)), 448)
        np.testing.assert_array_equal(ours, reference_prepare(full.crop(centre)))
        ours = wd_preprocess(source_square(path, sha(path), [w, h], pad), 448)
        np.testing.assert_array_equal(ours, reference_prepare(full))  # the reference pads the whole image


def test_opt_in_recipes_stay_within_their_measured_tolerance_on_a_pixel_sensitive_tagger(drawings):
    paths, model = drawings
    tagger = WDTagger.from_dir(model, batch_size=8)

    def probs(shrink: bool, prep) -> np.ndarray:  # (N, T) with the pad box: the whole image
        sizes = [Image.open(p).size for p in paths]
        boxes = [[(w - max(w, h)) // 2, (h - max(w, h)) // 2, (w + max(w, h)) // 2, (h + max(w, h)) // 2]
                 for w, h in sizes]
        return tagger.predict(np.stack([prep(source_square(p, sha(p), list(s), b, 448 if shrink else None), 448)
                                        for p, s, b in zip(paths, sizes, boxes, strict=True)]))

    ref = probs(False, wd_preprocess)
    torch_resize, pre_shrink = np.abs(probs(False, wd_preprocess_torch) - ref), np.abs(probs(True, wd_preprocess) - ref)
    assert 0 < torch_resize.max() <= TORCH_RESIZE_TOL  # > 0: this tagger sees a level's difference
    assert 0.01 < pre_shrink.max() <= PRE_SHRINK_TOL


def test_resize_and_pre_shrink_are_opt_in_and_in_the_chunk_key(tmp_path, world):
    cfg = config(tmp_path, world)
    assert (cfg.tagger.resize, cfg.tagger.pre_shrink) == ("pillow", False)
    chunk = world[1] / "model.onnx"  # any file stands for a crop chunk here
    names = {chunk_digest(config(tmp_path, world, *o), chunk)
             for o in [(), ("tagger.resize=torch",), ("tagger.pre_shrink=true",)]}
    assert len(names) == 3
    torch_cfg = config(tmp_path, world, "tagger.resize=torch")
    from tagdit.data.tagger import resolve_tagger

    assert loaded_tagger(resolve_tagger(torch_cfg.tagger), torch_cfg.tagger)._preprocess is wd_preprocess_torch


def test_tag_stage_warns_once_when_torch_sees_cuda_but_onnxruntime_offers_no_cuda(tmp_path, world, monkeypatch,
                                                                                 caplog):
    import logging

    import onnxruntime
    import torch

    import tagdit.data.onnx_session as onnx_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(onnx_mod, "_installed", {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}.get)
    monkeypatch.setattr(onnx_mod, "_WARNED_GPU_IDLE", False)
    cfg = config(tmp_path, world)
    crop = crop_stage(cfg)
    with caplog.at_level(logging.WARNING):
        tag_stage(cfg, crop)
        tag_stage(cfg, crop, force=True)  # a second session load in this process
    warnings = [r for r in caplog.records if "TAGGING RUNS ON THE CPU" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "BOTH onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0" in warnings[0].getMessage()


@pytest.mark.numerics  # the default session's single-threaded runs vs each worker's one thread
def test_tag_runs_a_worker_per_fake_device_and_writes_the_single_device_chunks(tmp_path, world, monkeypatch):
    import tasks.tag
    from tests.test_encode import assert_a_worker_per_device, unit_runs

    one = config(tmp_path / "one", world)
    crop = crop_stage(one)
    rec_one = tag_stage(one, crop)  # auto on a CPU: in this process
    runs = unit_runs(monkeypatch, tasks.tag)
    two = config(tmp_path / "one", world, "prefect.devices=[cpu:0,cpu:1]", "data.name=t2")
    rec_two = tag_stage(two, crop)
    assert len(runs) == 4 and sum(r.value for r in runs) == rec_one.info["tagged"] == GOOD
    assert_a_worker_per_device(runs, {"cpu:0", "cpu:1"})
    assert rec_one.info["chunks"] == rec_two.info["chunks"]
    for name in rec_one.info["chunks"]:
        assert (Path(rec_one.out_dir) / name).read_bytes() == (Path(rec_two.out_dir) / name).read_bytes(), name
