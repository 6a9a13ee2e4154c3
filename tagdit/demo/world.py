"""The demo world: deterministic synthetic drawn characters whose WD/Danbooru tags are known.

Image `i` of a world depends only on (seed, i): its attributes (`labels.sample_spec`), size, drawing
(`draw.render`), file format, stored mode, folder and name. Worlds of different sizes therefore
share their first images, and the demo tagger trains on its own stream of images that never equals
the evaluation images. `generate_world` writes the files, a few broken ones, and `labels.json`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel

from tagdit.demo.draw import render
from tagdit.demo.labels import CHARACTER_TAGS, GENERAL_TAGS, sample_spec
from tagdit.demo.parallel import default_workers, ordered_map
from tagdit.files import write_json_atomic

log = logging.getLogger(__name__)

WORLD_STREAM = 0x574F524C  # rng stream of the world's images ("WORL")
TRAIN_STREAM = 0x54524149  # rng stream of the demo tagger's training images ("TRAI")

# (format, stored mode): one cycle of file variants; image i gets VARIANTS[i % len(VARIANTS)].
VARIANTS: list[tuple[str, str]] = [
    ("JPEG", "RGB"), ("PNG", "RGB"), ("WEBP", "RGB"), ("JPEG", "RGB"), ("PNG", "RGBA"),
    ("JPEG", "L"), ("PNG", "P"), ("JPEG", "RGB"), ("WEBP", "RGBA"), ("PNG", "RGB"),
    ("JPEG", "CMYK"), ("PNG", "L"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("PNG", "LA"),
    ("JPEG", "grey-RGB"), ("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "RGBA"), ("WEBP", "RGB"),
]
FOLDERS = ("", "artist-a", "artist-b/sketches", "phone", "misc/2019")
SIDECAR_EVERY = 50  # image i has a sidecar `stem.txt` when i % SIDECAR_EVERY == 7


@dataclass
class Item:
    """One generated file: where it goes, its bytes and what it shows."""

    rel: str  # path relative to the world's images/ folder
    data: bytes
    tags: list[str]
    fmt: str
    mode: str
    size: tuple[int, int]
    sidecar: list[str] | None = None  # tags written to `stem.txt` beside the image


class WorldSummary(BaseModel):
    """What `generate_world` wrote."""

    out: str
    seed: int
    n_images: int
    formats: dict[str, int]
    modes: dict[str, int]
    broken: dict[str, str]  # relative path -> why it cannot be read
    sidecars: list[str]
    ignored: list[str]  # non-image files the pipeline must skip
    tag_counts: dict[str, int]
    min_side: int
    max_side: int
    non_square: int


def sample_size(rng: np.random.Generator) -> tuple[int, int]:
    """(w, h): short side log-uniform 48..440 px, a third square, the rest up to 1.6:1 either way."""
    short = int(round(math.exp(rng.uniform(math.log(48), math.log(440)))))
    aspect = float(rng.choice([1.0, 1.0, 1.0, 1.25, 4 / 3, 1.5, 1.6]))
    long = min(600, int(round(short * aspect)))
    return (short, long) if rng.random() < 0.6 else (long, short)


def encode(img: Image.Image, fmt: str, mode: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """Convert to the stored mode and encode; returns (bytes, PIL mode as stored)."""
    if mode == "RGBA":
        out = img
    elif mode == "LA":
        out = img.convert("LA")
    elif mode == "P":
        out = img.convert("RGB").quantize(colors=int(rng.integers(24, 65)), method=Image.Quantize.MEDIANCUT,
                                          dither=Image.Dither.NONE)
    elif mode == "grey-RGB":
        out = img.convert("L").convert("RGB")
    else:
        out = img.convert(mode)  # RGB, L, CMYK
    buf = io.BytesIO()
    if fmt == "JPEG":
        out.save(buf, "JPEG", quality=int(rng.integers(72, 96)))
    elif fmt == "WEBP":
        out.save(buf, "WEBP", quality=int(rng.integers(80, 93)), method=4)
    else:
        out.save(buf, "PNG")
    return buf.getvalue(), out.mode


def make_item(seed: int, i: int, stream: int = WORLD_STREAM) -> Item:
    """Image i of the world `seed` (or of the tagger's training stream): bytes, path and tags."""
    rng = np.random.default_rng([stream, seed, i])
    fmt, mode = VARIANTS[i % len(VARIANTS)]
    spec = sample_spec(rng, mode)
    size = sample_size(rng)
    data, stored_mode = encode(render(spec, size, rng), fmt, mode, rng)
    folder = FOLDERS[int(rng.integers(len(FOLDERS)))]
    u = rng.random()
    stem = f"img {i:05d}" if u < 0.06 else f"char.{i:05d}.final" if u < 0.12 else f"{i:05d}"
    ext = {"PNG": ".png", "WEBP": ".webp"}.get(fmt) or str(rng.choice([".jpg"] * 8 + [".jpeg", ".JPG"]))
    tags = spec.tags()
    sidecar = None
    if i % SIDECAR_EVERY == 7:  # hand-written captions: extra tags, sometimes in raw `a_b` form
        raw = (i // SIDECAR_EVERY) % 2 == 0
        sidecar = ["1girl", "solo"] + [t.replace(" ", "_") if raw else t for t in tags]
    rel = f"{folder}/{stem}{ext}" if folder else f"{stem}{ext}"
    return Item(rel, data, tags, fmt, stored_mode, size, sidecar)


def broken_files(seed: int) -> dict[str, tuple[bytes, str]]:
    """A handful of unreadable files: relative path -> (bytes, why)."""
    good = make_item(seed, 0).data  # VARIANTS[0] is a JPEG
    return {
        "misc/truncated.jpg": (good[: len(good) * 2 // 5], "truncated JPEG"),
        "misc/empty.png": (b"", "empty file"),
        "misc/not-an-image.webp": (b"This is a text file with an image extension.\n", "not an image"),
        "misc/bad-header.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(64)), "corrupt PNG header"),
    }


README = """# Demo world images

Synthetic drawn characters generated by `tagdit.demo.world` (tags in ../labels.json).
This file is not an image: the pipeline must skip it.
"""


def generate_world(out: Path, n: int = 2000, seed: int = 0, workers: int = 0) -> WorldSummary:
    """Write `out/images/...` (n images + broken files + README) and `out/labels.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".images.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    images: dict[str, dict] = {}
    sidecars: dict[str, list[str]] = {}
    for item in ordered_map(make_item, [(seed, i) for i in range(n)], workers or default_workers()):
        (tmp / item.rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / item.rel).write_bytes(item.data)
        images[item.rel] = {"tags": item.tags, "format": item.fmt, "mode": item.mode, "size": list(item.size)}
        if item.sidecar is not None:
            txt = str(Path(item.rel).with_suffix(".txt").as_posix())
            (tmp / txt).write_text(", ".join(item.sidecar) + "\n")
            sidecars[txt] = item.sidecar
    broken = {}
    for rel, (data, why) in broken_files(seed).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
        broken[rel] = why
    (tmp / "README.md").write_text(README)
    dst = out / "images"
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    summary = summarise(out, seed, images, broken, sidecars)
    write_json_atomic(out / "labels.json", {
        "images": images, "broken": broken, "sidecars": sidecars, "ignored": ["README.md"],
        "general_tags": GENERAL_TAGS, "character_tags": CHARACTER_TAGS, "summary": summary.model_dump(),
    })
    log.info("demo world: %d images (%s), %d broken, %d sidecars in %s", n, summary.formats, len(broken),
             len(sidecars), dst)
    return summary


def summarise(out: Path, seed: int, images: dict[str, dict], broken: dict[str, str],
              sidecars: dict[str, list[str]]) -> WorldSummary:
    """Counts of what was written: formats, modes, sides, tags."""
    sides = [s for m in images.values() for s in m["size"]]
    return WorldSummary(
        out=str(out),
        seed=seed,
        n_images=len(images),
        formats=dict(sorted(Counter(m["format"] for m in images.values()).items())),
        modes=dict(sorted(Counter(m["mode"] for m in images.values()).items())),
        broken=broken,
        sidecars=sorted(sidecars),
        ignored=["README.md"],
        tag_counts=dict(Counter(t for m in images.values() for t in m["tags"]).most_common()),
        min_side=min(sides, default=0),
        max_side=max(sides, default=0),
        non_square=sum(m["size"][0] != m["size"][1] for m in images.values()),
    )


def load_labels(out: Path) -> dict:
    """The labels.json of a generated world."""
    return json.loads((Path(out) / "labels.json").read_text())


def decode(data: bytes) -> Image.Image:
    """Bytes -> loaded PIL image."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


__all__ = ["generate_world", "make_item", "load_labels", "decode", "WorldSummary", "Item", "WORLD_STREAM",
           "TRAIN_STREAM"]
