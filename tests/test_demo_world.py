"""The demo world: deterministic bytes, realistic variety, labels that match the pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagdit.demo import draw, labels, world
from tagdit.formats.wd_image import centre_crop, to_rgb_on_white

N = 70  # > 64 so generation runs on the process pool, and > 3 cycles of the 20 file variants


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory) -> tuple[Path, world.WorldSummary]:
    out = tmp_path_factory.mktemp("world")
    return out, world.generate_world(out, n=N, seed=3, workers=2)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_serial_or_parallel(demo_world, tmp_path):
    out, _ = demo_world
    again = world.generate_world(tmp_path / "again", n=N, seed=3, workers=1)
    assert tree_bytes(out / "images") == tree_bytes(tmp_path / "again" / "images")
    assert (out / "labels.json").read_text() == (tmp_path / "again" / "labels.json").read_text().replace(
        str(tmp_path / "again"), str(out))
    assert again.n_images == N


def test_other_seed_and_the_tagger_stream_give_other_images():
    a, b, t = world.make_item(3, 5), world.make_item(4, 5), world.make_item(3, 5, world.TRAIN_STREAM)
    assert a.data != b.data and a.data != t.data


def test_world_has_formats_modes_sizes_and_odd_names(demo_world):
    out, s = demo_world
    assert set(s.formats) == {"JPEG", "PNG", "WEBP"}
    assert {"RGB", "RGBA", "L", "LA", "P", "CMYK"} <= set(s.modes)
    assert 48 <= s.min_side and s.max_side <= 600 and s.max_side >= 200
    assert 0 < s.non_square < N
    labels = world.load_labels(out)["images"]
    assert len(labels) == N
    names = list(labels)
    assert any("/" in n for n in names) and any("/" not in n for n in names)  # sub-folders and top level
    assert any(n.endswith((".jpeg", ".JPG")) for n in names)
    assert any(" " in n or n.count(".") > 1 for n in names)  # spaces / extra dots in file names


def test_every_labelled_file_opens_with_its_recorded_format_mode_and_size(demo_world):
    out, _ = demo_world
    for rel, meta in world.load_labels(out)["images"].items():
        with Image.open(out / "images" / rel) as img:
            img.load()
            assert (img.format, img.mode, list(img.size)) == (meta["format"], meta["mode"], meta["size"]), rel


def test_broken_files_fail_to_decode_and_readme_is_not_an_image(demo_world):
    out, s = demo_world
    assert len(s.broken) >= 4
    for rel in s.broken:
        with pytest.raises(Exception):  # noqa: B017 - PIL raises OSError / UnidentifiedImageError / SyntaxError
            with Image.open(out / "images" / rel) as img:
                img.load()
    assert (out / "images" / "README.md").read_text().startswith("# Demo world")
    assert "README.md" in s.ignored and "README.md" not in world.load_labels(out)["images"]


def test_sidecars_are_comma_separated_and_name_the_image_tags(demo_world):
    out, s = demo_world
    labels = world.load_labels(out)
    assert len(s.sidecars) == len([i for i in range(N) if i % world.SIDECAR_EVERY == 7]) >= 2
    for txt in s.sidecars:
        tags = [t.strip().replace("_", " ") for t in (out / "images" / txt).read_text().split(",")]
        image = next(r for r in labels["images"] if Path(r).with_suffix(".txt").as_posix() == txt)
        assert set(labels["images"][image]["tags"]) <= set(tags) and "1girl" in tags


def test_tags_follow_the_rules_of_each_group(demo_world):
    out, _ = demo_world
    for rel, meta in world.load_labels(out)["images"].items():
        tags = set(meta["tags"])
        assert len(tags & set(labels.LENGTHS)) == 1 and len(tags & set(labels.MOUTHS)) == 1, rel
        assert len(tags & set(labels.BACKGROUNDS)) == 1, rel
        grey = meta["mode"] in ("L", "LA") or "monochrome" in tags
        if grey:
            assert {"monochrome", "greyscale", "white background"} <= tags and not tags & set(labels.HAIR)
        else:
            assert len(tags & set(labels.HAIR)) == 1, rel
            assert len(tags & {*labels.EYES, "closed eyes"}) == 1, rel
        if meta["mode"] in ("RGBA", "LA"):
            assert "white background" in tags


def test_transparent_images_composite_to_their_tagged_white_background(demo_world):
    out, _ = demo_world
    seen = 0
    for rel, meta in world.load_labels(out)["images"].items():
        if meta["mode"] in ("RGBA", "LA"):
            img = Image.open(out / "images" / rel)
            assert img.getchannel("A").getpixel((0, 0)) == 0
            assert np.asarray(to_rgb_on_white(img))[0, 0].min() >= 250  # transparent black -> white
            assert np.asarray(img.convert("RGB"))[0, 0].max() == 0  # (dropping alpha would give black)
            seen += 1
    assert seen >= 4


def test_greyscale_images_have_equal_channels(demo_world):
    out, _ = demo_world
    for rel, meta in world.load_labels(out)["images"].items():
        if "greyscale" in meta["tags"]:
            rgb = np.asarray(Image.open(out / "images" / rel).convert("RGB")).astype(int)
            assert np.abs(rgb[..., 0] - rgb[..., 2]).max() <= 2, rel


def test_character_tag_iff_its_fixed_look():
    spec = labels.Spec("blue hair", "long hair", "yellow eyes", False, "smile", ("hair bow",), "pink background",
                      grey=False, transparent=False)
    assert "aoi (tagdit)" in spec.tags()
    spec.accessories = ("hair bow", "hat")
    assert "aoi (tagdit)" not in spec.tags()
    spec.accessories, spec.grey = ("hair bow",), True
    assert "aoi (tagdit)" not in spec.tags()


@pytest.mark.parametrize("size", [(300, 180), (180, 300)])
def test_everything_tagged_lies_inside_the_centre_square(size):
    """Outside the central square a wide image shows only background, a tall one only body below."""
    spec = labels.Spec("red hair", "long hair", "blue eyes", False, "open mouth", labels.ACCESSORIES,
                      "green background", grey=False, transparent=False)
    img = np.asarray(draw.render(spec, size, np.random.default_rng(0)).convert("RGB")).astype(int)
    w, h = size
    s = min(w, h)
    bg = img[0, 0]
    if w > h:
        margin = np.concatenate([img[:, : (w - s) // 2 - 1], img[:, (w + s) // 2 + 1 :]], axis=1)
    else:
        margin = img[: (h - s) // 2 - 1]  # above the square (hats)
    assert np.abs(margin - bg).max() <= 8


def test_features_survive_a_64px_centre_crop():
    """Eye colour is still visible at the dataset resolution: the iris colour is in the crop."""
    spec = labels.Spec("black hair", "short hair", "green eyes", False, "smile", (), "white background",
                      grey=False, transparent=False)
    img = draw.render(spec, (400, 260), np.random.default_rng(1))
    crop = np.asarray(centre_crop(img, 64)).astype(int)
    green = (crop[..., 1] > 130) & (crop[..., 0] < 100) & (crop[..., 2] < 120)
    assert green.sum() >= 12  # two irises of several pixels each


def test_decode_roundtrip_of_every_variant():
    for i in range(len(world.VARIANTS)):
        item = world.make_item(0, i)
        img = Image.open(io.BytesIO(item.data))
        assert img.format == item.fmt and img.size == item.size
