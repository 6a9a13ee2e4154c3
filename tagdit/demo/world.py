"""The demo world: deterministic synthetic drawn characters whose WD/Danbooru tags are known.

Each image is a flat-shaded anime-style head (hair, face, big eyes, mouth, optional hat / glasses /
hair bow) on a solid background, drawn with PIL into the image's central square so a centre crop
keeps every tagged feature. Features are drawn big enough to survive a 64 px crop. Image `i` of a
world depends only on (seed, i), so worlds of different sizes share their first images and the demo
tagger can train on its own stream of images that never equals the evaluation images.
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
from PIL import Image, ImageDraw, ImageFilter
from pydantic import BaseModel

from tagdit.files import write_json_atomic
from tagdit.tagger import to_rgb_on_white

log = logging.getLogger(__name__)

WORLD_STREAM = 0x574F524C  # rng stream of the world's images ("WORL")
TRAIN_STREAM = 0x54524149  # rng stream of the demo tagger's training images ("TRAI")

RGB = tuple[int, int, int]

HAIR: dict[str, RGB] = {
    "blonde hair": (247, 214, 102),
    "black hair": (40, 36, 46),
    "blue hair": (58, 104, 214),
    "pink hair": (248, 150, 196),
    "red hair": (206, 38, 44),
    "white hair": (238, 238, 244),
    "brown hair": (124, 78, 42),
}
LENGTHS = ("short hair", "long hair")
EYES: dict[str, RGB] = {
    "blue eyes": (40, 110, 232),
    "red eyes": (214, 30, 40),
    "green eyes": (40, 172, 72),
    "yellow eyes": (242, 202, 30),
    "purple eyes": (142, 60, 204),
}
MOUTHS = ("smile", "open mouth", "closed mouth")
ACCESSORIES = ("hat", "glasses", "hair bow")
BACKGROUNDS: dict[str, RGB] = {
    "white background": (255, 255, 255),
    "blue background": (126, 172, 240),
    "pink background": (250, 182, 212),
    "green background": (150, 214, 150),
    "yellow background": (250, 234, 140),
}
GREY_TAGS = ("monochrome", "greyscale")
# Characters (category 4): a fixed look; an image shows the character iff its attributes match.
CHARACTERS: dict[str, dict] = {
    "aoi (tagdit)": {"hair": "blue hair", "length": "long hair", "eyes": "yellow eyes",
                     "accessories": ("hair bow",)},
    "akane (tagdit)": {"hair": "red hair", "length": "short hair", "eyes": "green eyes",
                       "accessories": ("glasses",)},
}
GENERAL_TAGS: list[str] = [*HAIR, *LENGTHS, *EYES, "closed eyes", *MOUTHS, *ACCESSORIES,
                           *BACKGROUNDS, *GREY_TAGS]
CHARACTER_TAGS: list[str] = list(CHARACTERS)
RATINGS = ("general", "sensitive", "questionable", "explicit")  # every demo image is "general"

SKIN: RGB = (255, 226, 204)
OUTLINE: RGB = (46, 32, 40)
BOW_COLOURS: list[RGB] = [(222, 40, 62), (250, 250, 250), (60, 90, 204), (250, 140, 190), (36, 36, 40)]
HAT_COLOURS: list[RGB] = [(72, 52, 40), (52, 52, 62), (112, 40, 132), (32, 92, 62), (172, 150, 110)]
FRAME_COLOURS: list[RGB] = [(30, 30, 30), (150, 30, 40), (60, 60, 140)]
SHIRT_COLOURS: list[RGB] = [(240, 240, 240), (60, 70, 120), (180, 40, 50), (70, 120, 80), (40, 40, 40),
                            (230, 200, 120)]

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
class Spec:
    """What one image shows (its tags follow from this)."""

    hair: str
    length: str
    eyes: str
    eyes_closed: bool
    mouth: str
    accessories: tuple[str, ...]
    background: str
    grey: bool
    transparent: bool

    def tags(self) -> list[str]:
        """True tags in display form: general tags in GENERAL_TAGS order, then characters."""
        on = {self.length, self.mouth, *self.accessories}
        if self.eyes_closed:
            on.add("closed eyes")
        if self.grey:
            on |= {"white background", *GREY_TAGS}  # greyscale art is drawn on white, colours untagged
        else:
            on |= {self.hair, "white background" if self.transparent else self.background}
            if not self.eyes_closed:
                on.add(self.eyes)
        chars = [name for name, look in CHARACTERS.items() if self.is_character(look)]
        return [t for t in GENERAL_TAGS if t in on] + chars

    def is_character(self, look: dict) -> bool:
        return (not self.grey and not self.eyes_closed and self.hair == look["hair"]
                and self.length == look["length"] and self.eyes == look["eyes"]
                and set(self.accessories) == set(look["accessories"]))


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


# ---------------------------------------------------------------- sampling


def _jitter(rng: np.random.Generator, c: RGB, amount: int = 12) -> RGB:
    return tuple(int(v) for v in np.clip(np.array(c) + rng.integers(-amount, amount + 1, 3), 0, 255))


def sample_spec(rng: np.random.Generator, mode: str) -> Spec:
    """Draw the attributes of one image (characters are over-sampled so the tagger sees them)."""
    grey = mode in ("L", "LA", "grey-RGB")
    transparent = mode in ("RGBA", "LA")
    accessories = tuple(a for a in ACCESSORIES if rng.random() < 0.22)
    spec = Spec(
        hair=str(rng.choice(list(HAIR))),
        length=str(rng.choice(LENGTHS)),
        eyes=str(rng.choice(list(EYES))),
        eyes_closed=bool(rng.random() < 0.15),
        mouth=str(rng.choice(MOUTHS, p=[0.4, 0.3, 0.3])),
        accessories=accessories,
        background=str(rng.choice(list(BACKGROUNDS), p=[0.3, 0.175, 0.175, 0.175, 0.175])),
        grey=grey,
        transparent=transparent,
    )
    u = rng.random()
    if not grey and u < 0.12:  # 6% each: a character's look, a third of them off by one detail
        look = CHARACTERS[CHARACTER_TAGS[int(u / 0.06)]]
        spec.hair, spec.length, spec.eyes = look["hair"], look["length"], look["eyes"]
        spec.accessories, spec.eyes_closed = tuple(look["accessories"]), False
        if rng.random() < 1 / 3:  # a near miss: not the character (teaches the tagger what matters)
            miss = int(rng.integers(3))
            if miss == 0:
                spec.accessories = tuple(a for a in ACCESSORIES if (a in spec.accessories) != (a == "hat"))
            elif miss == 1:
                spec.eyes = str(rng.choice([e for e in EYES if e != look["eyes"]]))
            else:
                spec.length = next(x for x in LENGTHS if x != look["length"])
    return spec


def sample_size(rng: np.random.Generator) -> tuple[int, int]:
    """(w, h): short side log-uniform 48..440 px, a third square, the rest up to 1.6:1 either way."""
    short = int(round(math.exp(rng.uniform(math.log(48), math.log(440)))))
    aspect = float(rng.choice([1.0, 1.0, 1.0, 1.25, 4 / 3, 1.5, 1.6]))
    long = min(600, int(round(short * aspect)))
    return (short, long) if rng.random() < 0.6 else (long, short)


# ---------------------------------------------------------------- drawing


class Painter:
    """Draws in unit coordinates of the image's central square (with a small random head jitter)."""

    def __init__(self, img: Image.Image, rng: np.random.Generator):
        self.draw = ImageDraw.Draw(img)
        w, h = img.size
        self.s = min(w, h)
        self.ox, self.oy = (w - self.s) / 2, (h - self.s) / 2
        self.k = rng.uniform(0.93, 1.03)  # head scale
        self.dx, self.dy = rng.uniform(-0.02, 0.02, 2)

    def p(self, u: float, v: float) -> tuple[float, float]:
        u = 0.5 + (u - 0.5) * self.k + self.dx
        v = 0.5 + (v - 0.5) * self.k + self.dy
        return self.ox + u * self.s, self.oy + v * self.s

    def w(self, f: float) -> int:
        return max(1, round(f * self.s * self.k))

    def box(self, cx: float, cy: float, rx: float, ry: float) -> list[float]:
        return [*self.p(cx - rx, cy - ry), *self.p(cx + rx, cy + ry)]

    def ellipse(self, cx, cy, rx, ry, fill=None, outline=OUTLINE, width=0.012) -> None:
        self.draw.ellipse(self.box(cx, cy, rx, ry), fill=fill, outline=outline, width=self.w(width))

    def poly(self, pts, fill, outline=OUTLINE, width=0.012) -> None:
        self.draw.polygon([self.p(u, v) for u, v in pts], fill=fill, outline=outline, width=self.w(width))

    def rect(self, x0, y0, x1, y1, fill, outline=OUTLINE, width=0.012, r=0.03) -> None:
        self.draw.rounded_rectangle([*self.p(x0, y0), *self.p(x1, y1)], radius=self.w(r), fill=fill,
                                    outline=outline, width=self.w(width))

    def arc(self, cx, cy, rx, ry, start, end, fill=OUTLINE, width=0.024) -> None:
        self.draw.arc(self.box(cx, cy, rx, ry), start, end, fill=fill, width=self.w(width))

    def line(self, pts, fill=OUTLINE, width=0.02) -> None:
        self.draw.line([self.p(u, v) for u, v in pts], fill=fill, width=self.w(width), joint="curve")


def _head_top(n: int = 16) -> list[tuple[float, float]]:
    return [(0.5 + 0.345 * math.cos(a), 0.47 + 0.335 * math.sin(a))
            for a in np.linspace(math.pi, 2 * math.pi, n)]


BANGS_TIPS = [(0.845, 0.47), (0.80, 0.68), (0.72, 0.40), (0.66, 0.47), (0.58, 0.35), (0.50, 0.46),
              (0.42, 0.35), (0.34, 0.47), (0.28, 0.40), (0.20, 0.68)]


def draw_character(p: Painter, spec: Spec, rng: np.random.Generator) -> None:
    """Paint the character back to front."""
    hair = _jitter(rng, HAIR[spec.hair])
    skin = _jitter(rng, SKIN, 6)
    # back hair: long hair falls past the shoulders on both sides
    p.ellipse(0.5, 0.47, 0.35 + 0.012, 0.33 + 0.012, fill=OUTLINE, outline=None)
    if spec.length == "long hair":
        p.rect(0.12, 0.47, 0.88, 1.7, fill=hair, r=0.06)
    p.ellipse(0.5, 0.47, 0.35, 0.33, fill=hair, outline=None)
    p.rect(0.44, 0.76, 0.56, 0.96, fill=tuple(int(c * 0.92) for c in skin), r=0.0)  # neck
    p.ellipse(0.5, 1.22, 0.27, 0.32, fill=_jitter(rng, SHIRT_COLOURS[rng.integers(len(SHIRT_COLOURS))]))
    p.ellipse(0.5, 0.55, 0.27, 0.30, fill=skin)  # face
    p.poly(_head_top() + BANGS_TIPS, fill=hair)
    for cx in (0.385, 0.615):
        _eye(p, cx, 0.585, spec, rng)
    p.line([(0.5, 0.665), (0.495, 0.685)], fill=tuple(int(c * 0.75) for c in skin), width=0.012)  # nose
    _mouth(p, spec.mouth)
    if "glasses" in spec.accessories:
        frame = FRAME_COLOURS[rng.integers(len(FRAME_COLOURS))]
        for cx in (0.385, 0.615):
            p.ellipse(cx, 0.585, 0.105, 0.1, outline=frame, width=0.024)
        p.line([(0.49, 0.575), (0.51, 0.575)], fill=frame, width=0.024)
        p.line([(0.28, 0.57), (0.235, 0.55)], fill=frame, width=0.024)
        p.line([(0.72, 0.57), (0.765, 0.55)], fill=frame, width=0.024)
    if "hat" in spec.accessories:
        _hat(p, rng)
    if "hair bow" in spec.accessories:
        bg = (255, 255, 255) if spec.grey or spec.transparent else BACKGROUNDS[spec.background]
        _bow(p, rng, (hair, bg), right=bool(rng.random() < 0.5))


def _eye(p: Painter, cx: float, cy: float, spec: Spec, rng: np.random.Generator) -> None:
    if spec.eyes_closed:
        if rng.random() < 0.5:
            p.arc(cx, cy - 0.02, 0.07, 0.045, 20, 160)  # happy closed eyes (U)
        else:
            p.arc(cx, cy + 0.03, 0.07, 0.045, 200, 340)  # sleepy closed eyes (n)
        return
    iris = _jitter(rng, EYES[spec.eyes], 10)
    p.ellipse(cx, cy, 0.072, 0.088, fill=(252, 252, 252))
    p.ellipse(cx, cy + 0.01, 0.056, 0.074, fill=iris, outline=None)
    p.ellipse(cx, cy + 0.015, 0.026, 0.04, fill=tuple(int(c * 0.4) for c in iris), outline=None)
    p.ellipse(cx - 0.02, cy - 0.02, 0.017, 0.017, fill=(255, 255, 255), outline=None)
    p.arc(cx, cy, 0.078, 0.094, 200, 340, width=0.026)  # upper lash line


def _mouth(p: Painter, mouth: str) -> None:
    if mouth == "smile":
        p.arc(0.5, 0.725, 0.085, 0.065, 20, 160, width=0.032)
    elif mouth == "open mouth":
        p.ellipse(0.5, 0.775, 0.052, 0.045, fill=(124, 22, 36))
        p.ellipse(0.5, 0.8, 0.03, 0.015, fill=(236, 112, 122), outline=None)
    else:
        p.line([(0.46, 0.78), (0.54, 0.78)], width=0.03)


def _hat(p: Painter, rng: np.random.Generator) -> None:
    colour = _jitter(rng, HAT_COLOURS[rng.integers(len(HAT_COLOURS))])
    band = _jitter(rng, BOW_COLOURS[rng.integers(len(BOW_COLOURS))])
    if rng.random() < 0.5:  # top hat
        p.rect(0.29, 0.05, 0.71, 0.26, fill=colour, r=0.03)
        p.rect(0.29, 0.19, 0.71, 0.245, fill=band, r=0.0)
    else:  # witch hat
        p.poly([(0.5 + rng.uniform(-0.06, 0.06), 0.02), (0.27, 0.26), (0.73, 0.26)], fill=colour)
    p.ellipse(0.5, 0.265, 0.40, 0.065, fill=colour)


def _bow(p: Painter, rng: np.random.Generator, avoid: tuple[RGB, ...], right: bool) -> None:
    """A hair bow in a colour that stands out from the hair and the background."""
    choices = [c for c in BOW_COLOURS if all(sum(abs(a - b) for a, b in zip(c, x, strict=True)) > 120 for x in avoid)]
    colour = _jitter(rng, choices[rng.integers(len(choices))])
    cx, cy = (0.785, 0.38) if right else (0.215, 0.38)
    p.poly([(cx, cy), (cx - 0.11, cy - 0.09), (cx - 0.11, cy + 0.09)], fill=colour)
    p.poly([(cx, cy), (cx + 0.11, cy - 0.09), (cx + 0.11, cy + 0.09)], fill=colour)
    p.ellipse(cx, cy, 0.036, 0.036, fill=colour)


def render(spec: Spec, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """RGBA image of `size`: opaque, or a transparent background when spec.transparent."""
    w, h = size
    ss = 4 if min(w, h) < 100 else 2 if min(w, h) < 320 else 1  # supersampling = anti-aliasing
    bg = (0, 0, 0, 0) if spec.transparent else (*_jitter(rng, BACKGROUNDS[spec.background], 6), 255)
    if spec.grey and not spec.transparent:
        bg = (255, 255, 255, 255)
    img = Image.new("RGBA", (w * ss, h * ss), bg)
    draw_character(Painter(img, rng), spec, rng)
    return img.resize((w, h), Image.LANCZOS) if ss > 1 else img


# ---------------------------------------------------------------- encoding


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


# ---------------------------------------------------------------- how the pipeline sees an image


def wd_pooled_view(img: Image.Image, size: int = 448, pool: int = 7) -> np.ndarray:
    """(size/pool, size/pool, 3) uint8 RGB: the WD recipe (DESIGN §6) then a pool x pool box average.

    Equals what the demo tagger's graph computes from `tagdit.tagger.wd_preprocess` (up to rounding),
    at a fraction of the cost: PIL's `reduce` averages in uint8.
    """
    rgb = to_rgb_on_white(img)
    w, h = rgb.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return np.asarray(square.resize((size, size), Image.BICUBIC).reduce(pool))


def centre_crop(img: Image.Image, res: int = 64, resample: int = Image.LANCZOS) -> Image.Image:
    """The dataset's view of an image: on white, centre square, resized to `res` (RGB)."""
    rgb = to_rgb_on_white(img)
    w, h = rgb.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return rgb.resize((res, res), resample, box=box)


def degrade(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur / noise / JPEG like a small generated image may have (augmentation for the tagger)."""
    if rng.random() < 0.35:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    if rng.random() < 0.35:
        a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(2, 10), (*img.size[::-1], 3))
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.2:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(60, 95)))
        img = decode(buf.getvalue()).convert("RGB")
    return img


def training_example(seed: int, j: int, res: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A tagger training image from its own stream: (full-image view, degraded crop view, tags)."""
    item = make_item(seed, j, TRAIN_STREAM)
    img = decode(item.data)
    rng = np.random.default_rng([TRAIN_STREAM, seed, j, 1])
    resample = [Image.LANCZOS, Image.BICUBIC, Image.BILINEAR, Image.BOX][int(rng.integers(4))]
    crop = degrade(centre_crop(img, res, resample), rng)
    return wd_pooled_view(img), wd_pooled_view(crop), item.tags


def training_examples(seed: int, indices: range, workers: int = 1) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    """`training_example` for many indices, in index order, over `workers` processes."""
    return list(_map(training_example, [(seed, j) for j in indices], workers))


def _map(fn, args: list[tuple], workers: int):
    """Ordered map over forked processes (pure numpy/PIL work); in-process when workers <= 1."""
    if workers <= 1 or len(args) < 64:
        return (fn(*a) for a in args)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork: spawn would re-run an unguarded __main__ script; the children only draw and encode
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method))
    chunk = max(1, len(args) // (workers * 8))
    cols = list(zip(*args, strict=True))
    return _close_after(pool, pool.map(fn, *cols, chunksize=chunk))


def _close_after(pool, results):
    try:
        yield from results
    finally:
        pool.shutdown(cancel_futures=True)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


# ---------------------------------------------------------------- world


def generate_world(out: Path, n: int = 2000, seed: int = 0, workers: int = 0) -> WorldSummary:
    """Write `out/images/...` (n images + broken files + README) and `out/labels.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".images.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    images: dict[str, dict] = {}
    sidecars: dict[str, list[str]] = {}
    for item in _map(make_item, [(seed, i) for i in range(n)], workers or default_workers()):
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


__all__ = ["generate_world", "make_item", "load_labels", "decode", "WorldSummary", "Item", "Spec",
           "GENERAL_TAGS", "CHARACTER_TAGS", "RATINGS", "WORLD_STREAM", "TRAIN_STREAM"]
