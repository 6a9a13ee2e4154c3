"""The demo tagger's training data: its own stream of world images, seen the way the pipeline sees them.

Each training image gives two 64 px views: the whole image through the WD recipe pooled 7 x 7 (what
the exported graph computes inside), and a degraded 64 px centre crop through the same recipe (what
the dataset and the DiT produce).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from tagdit.demo.parallel import ordered_map
from tagdit.demo.world import TRAIN_STREAM, decode, make_item
from tagdit.formats.wd_image import centre_crop, wd_square


def wd_pooled_view(img: Image.Image, size: int = 448, pool: int = 7) -> np.ndarray:
    """(size/pool, size/pool, 3) uint8 RGB: the WD recipe (docs/design.md §6) then a pool x pool box average.

    Equals what the demo tagger's graph computes from `tagdit.formats.wd_image.wd_preprocess` (up to
    rounding), at a fraction of the cost: PIL's `reduce` averages in uint8.
    """
    return np.asarray(wd_square(img, size).reduce(pool))


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
    return list(ordered_map(training_example, [(seed, j) for j in indices], workers))
