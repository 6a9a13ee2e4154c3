import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagdit.config import load_config
from tagdit.data.crop import CropParams, Reject, _decoded, crop_image, sample_key
from tagdit.formats.chunks import read_crop_chunk
from tagdit.formats.dataset_tables import read_manifest, read_rejects
from tasks.crop import crop_stage
from tests.wd_fixture import BAD, GOOD, OTHER


def config(tmp_path, source, *extra):
    return load_config(None, [f"data.source={source}", f"data.root={tmp_path / 'shards'}", "data.name=t",
                              "data.resolution=32", "crop.min_size=32", "crop.max_pixels=1000000",
                              "crop.workers=1", *extra])


def rows(rec):
    return [r for c in rec.info["chunks"] for r in read_crop_chunk(Path(rec.out_dir) / c).to_pylist()]


def pixels(row) -> np.ndarray:
    img = Image.open(io.BytesIO(row["image"]))
    assert img.mode == "RGB" and img.size == (32, 32)
    return np.asarray(img).astype(int)


def test_every_valid_kind_is_cropped_and_every_bad_input_rejected_with_reason(tmp_path, corpus):
    rec = crop_stage(config(tmp_path, corpus, "data.buckets=4"))
    by_src = {r["source"]: r for r in rows(rec)}
    assert rec.info["found"] == GOOD + BAD + OTHER == len(by_src)
    assert (rec.info["ok"], rec.info["rejected"], rec.info["sidecars"]) == (GOOD, BAD + OTHER, 1)
    assert "red.txt" not in by_src  # red.jpg's sidecar
    reasons = {s: r["reason"] for s, r in by_src.items() if not r["ok"]}
    assert "empty" in reasons["empty.png"]
    assert "not a decodable image" in reasons["not_an_image.jpg"]
    assert "decode failed" in reasons["truncated.jpg"] and "truncated" in reasons["truncated.jpg"]
    assert "too small" in reasons["tiny.png"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "unreadable" in reasons["unreadable.jpg"]
    assert {"sub/Blue.PNG", "sub/deeper/yellow.GIF", "image.TIFF", "image.webp", "image.bmp"} <= set(by_src)
    red = pixels(by_src["red.jpg"])
    assert (abs(red - [255, 0, 0]) < 8).all()
    assert by_src["red.jpg"]["sidecar"] == "Hand_Drawn, red, ^_^\n"
    assert by_src["red.jpg"]["crop_box"] == [20, 0, 100, 80] and by_src["red.jpg"]["orig_size"] == [120, 80]
    rgba = pixels(by_src["rgba.png"])  # transparent left half -> white
    assert (rgba[:, :12] == 255).all() and (abs(rgba[:, 20:] - [0, 255, 0]) < 3).all()
    pal = pixels(by_src["palette_transparent.png"])  # transparent top half -> white
    assert (pal[:12] == 255).all() and (abs(pal[20:] - [255, 0, 0]) < 3).all()
    deep = pixels(by_src["deep16.png"])  # 16-bit ramp scaled to 8 bits, not clipped to white
    assert deep.min() < 60 and 200 < deep.max() < 256 and deep[0, 0, 0] < deep[-1, -1, 0]
    assert (abs(pixels(by_src["cmyk.jpg"]) - [255, 0, 0]) < 12).all()
    assert by_src["exif_rotated.jpg"]["orig_size"] == [60, 100]  # EXIF orientation 6 applied
    assert (abs(pixels(by_src["grey.jpg"]) - 128) < 3).all()
    assert len({r["key"] for r in by_src.values()}) == len(by_src)


def test_pad_mode_fits_whole_image_on_white_and_records_box(tmp_path, corpus):
    rec = crop_stage(config(tmp_path, corpus, "crop.mode=pad"))
    row = next(r for r in rows(rec) if r["source"] == "wide.jpeg")
    assert row["crop_box"] == [0, -150, 400, 250]
    px = pixels(row)
    assert (px[:10] == 255).all() and (px[-10:] == 255).all()
    assert (abs(px[15:17] - [255, 0, 0]) < 10).all()


def test_huge_jpeg_is_decoded_at_reduced_size(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8000, 6000), (0, 128, 255)).save(buf, "JPEG", quality=80)
    p = CropParams(64, "center", 32, None, "png", 95)
    img, orig = _decoded(buf.getvalue(), p)
    assert orig == (8000, 6000) and img.size == (1000, 750)  # 1/8 DCT scaling, not 48 MP
    data, orig, box = crop_image(buf.getvalue(), p)
    assert box == (1000, 0, 7000, 6000)
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    with pytest.raises(Reject, match="decompression bomb"):
        crop_image(buf.getvalue(), CropParams(64, "center", 32, 40_000_000, "png", 95))


def test_sample_keys_are_stable_unique_and_webdataset_safe():
    paths = ["a/b.jpg", "a_b.jpg", "a/b.png", "x.y.z.JPG", "über/ß.png"]
    keys = [sample_key(p) for p in paths]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k for k in keys)
    assert sample_key("a/b.jpg") == keys[0]


def test_parallel_workers_write_the_same_chunks_as_one_process(tmp_path, corpus):
    one = crop_stage(config(tmp_path / "one", corpus, "data.buckets=4"))
    two = crop_stage(config(tmp_path / "two", corpus, "data.buckets=4", "crop.workers=2"))
    assert one.info["chunks"] == two.info["chunks"] and len(one.info["chunks"]) == 4 == one.info["buckets"]
    for c in one.info["chunks"]:
        assert open(f"{one.out_dir}/{c}", "rb").read() == open(f"{two.out_dir}/{c}", "rb").read()
    assert one.fingerprint == two.fingerprint


def test_changed_image_recomputes_only_its_bucket(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(src / f"{i}.png")
    cfg = config(tmp_path, src, "data.buckets=3")
    first = crop_stage(cfg)
    assert crop_stage(cfg) == first  # unchanged: the stamped record, no work
    Image.new("RGB", (40, 40), (0, 0, 255)).save(src / "3.png")
    os.utime(src / "3.png", ns=(1, 1))
    second = crop_stage(cfg)
    changed = [a != b for a, b in zip(first.info["chunks"], second.info["chunks"], strict=True)]
    assert len(changed) >= 2 and sum(changed) == 1 and second.fingerprint != first.fingerprint
    assert sorted(p.name for p in (tmp_path / "shards/t/work/crop").glob("chunk-*")) == sorted(second.info["chunks"])


def test_every_file_found_is_a_crop_or_a_reject_with_its_reason(tmp_path, wd_model):
    from tasks.shard import shard_stage
    from tasks.tag import tag_stage

    src = tmp_path / "awkward"
    (src / "sub").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden folder: not walked
    Image.new("RGB", (40, 40), (255, 0, 0)).save(src / "a.png")
    (src / "a.txt").write_text("smile\n")  # a's sidecar
    Image.new("RGB", (40, 40), (0, 0, 255)).save(src / "sub" / "photo", "PNG")  # a PNG without an extension
    (src / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (src / "doc.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    (src / "empty.jpg").write_bytes(b"")
    (src / "zero").write_bytes(b"")
    (src / "notes.txt").write_text("no image called notes\n")
    (src / "data.json").write_text("{}")
    (src / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (src / "sub" / "layers.psd").write_bytes(b"8BPS not really a photoshop file")
    cfg = config(tmp_path, src, f"tagger.path={wd_model}", "data.buckets=3", "shards.val_fraction=0")
    crop = crop_stage(cfg)
    assert (crop.info["found"], crop.info["ok"], crop.info["rejected"], crop.info["sidecars"]) == (10, 2, 8, 1)
    shards = shard_stage(cfg, crop, tag_stage(cfg, crop))
    assert shards.info["found"] == 10 == shards.info["sharded"] + shards.info["rejected"]
    reasons = {r["path"]: r["reason"] for r in read_rejects(tmp_path / "shards/t")}
    assert set(reasons) == {"logo.svg", "doc.pdf", "empty.jpg", "zero", "notes.txt", "data.json", ".DS_Store",
                            "sub/layers.psd"}
    assert reasons["logo.svg"].startswith("not a raster image") and reasons["doc.pdf"].startswith("not a raster image")
    assert reasons["empty.jpg"] == "empty file" and reasons["zero"] == "unreadable image: empty file"
    assert reasons["notes.txt"].startswith("unreadable image:") and "not a sidecar" in reasons["notes.txt"]
    assert reasons["data.json"] == "unreadable image: not an image format Pillow can open (.json)"
    assert reasons[".DS_Store"] == "hidden file"
    assert "decode failed" in reasons["sub/layers.psd"] or "not a decodable image" in reasons["sub/layers.psd"]
    manifest = read_manifest(tmp_path / "shards/t")
    assert sorted(r["source"] for r in manifest) == ["a.png", "sub/photo"]
    assert "smile" in next(r for r in manifest if r["source"] == "a.png")["tags"]
