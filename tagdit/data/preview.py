"""What went into the shards, to look at: random crops captioned with their tags, and rejects by reason."""

from __future__ import annotations

import random
import re
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from tagdit.formats.dataset_tables import read_manifest, read_rejects
from tagdit.formats.image_shards import image_bytes, iter_image_samples, open_image

TILE = 128  # px per crop in the preview
CAPTION_LINES = 4  # tag lines under each crop (the most confident tags first)


def pick_samples(dataset_dir: Path, n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """`n` manifest rows drawn at random (the same ones for the same shards and seed), in shard order."""
    rows = read_manifest(dataset_dir, columns=["key", "split", "shard", "tags"])
    chosen = random.Random(seed).sample(rows, min(n, len(rows)))
    return sorted(chosen, key=lambda r: (r["split"], r["shard"], r["key"]))


def load_crops(dataset_dir: Path, rows: list[dict[str, Any]]) -> list[Image.Image]:
    """The crops of `rows`, read from their shards (each shard opened once)."""
    wanted = {r["key"] for r in rows}
    found: dict[str, Image.Image] = {}
    for shard in dict.fromkeys(r["shard"] for r in rows):
        for raw in iter_image_samples(Path(dataset_dir) / "images" / shard):
            if raw["__key__"] in wanted:
                found[raw["__key__"]] = open_image(image_bytes(raw))
    return [found[r["key"]] for r in rows]


def captioned_grid(images: list[Image.Image], captions: list[str], cols: int = 8, pad: int = 4) -> Image.Image:
    """Tiles of `TILE` px, each with its caption wrapped under it."""
    font = ImageFont.load_default()
    line_h, chars = 12, TILE // 6  # the default bitmap font is ~6 px per character
    cell_h = TILE + CAPTION_LINES * line_h + 2 * pad
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (TILE + pad) + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = pad + (i % cols) * (TILE + pad), pad + (i // cols) * cell_h
        grid.paste(img.convert("RGB").resize((TILE, TILE), Image.Resampling.BICUBIC), (x, y))
        lines = textwrap.wrap(caption, chars) or ["(no tags)"]
        if len(lines) > CAPTION_LINES:
            lines = lines[: CAPTION_LINES - 1] + [lines[CAPTION_LINES - 1][: chars - 1] + "…"]
        for j, line in enumerate(lines):
            draw.text((x, y + TILE + 2 + j * line_h), line, fill="black", font=font)
    return grid


def preview(dataset_dir: Path, n: int = 32, seed: int = 0) -> Image.Image:
    """A grid of `n` random crops of the dataset, each captioned with its tags."""
    rows = pick_samples(dataset_dir, n, seed)
    return captioned_grid(load_crops(dataset_dir, rows), [", ".join(r["tags"]) for r in rows])


def reason_kind(reason: str) -> str:
    """The kind of a reject reason, without its particulars: 'too small: 20x30 (…)' -> 'too small'."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip() or reason


def rejects_by_reason(dataset_dir: Path) -> list[dict[str, Any]]:
    """One row per kind of reject, most frequent first: count, and one example file with its full reason."""
    rows = read_rejects(dataset_dir)
    counts = Counter(reason_kind(r["reason"]) for r in rows)
    first = {}
    for r in rows:
        first.setdefault(reason_kind(r["reason"]), r)
    return [{"reason": kind, "count": n, "stage": first[kind]["stage"], "example": first[kind]["path"],
             "example reason": first[kind]["reason"]} for kind, n in counts.most_common()]
