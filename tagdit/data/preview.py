"""What went into the shards, to look at: random crops captioned with their tags, and rejects by reason."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from tagdit.formats.dataset_tables import manifest_row_groups, read_manifest, rejects_table
from tagdit.formats.image_shards import image_bytes, iter_image_samples, open_image
from tagdit.store_streams import readable

TILE = 128  # px per crop in the preview
CAPTION_LINES = 4  # tag lines under each crop (the most confident tags first)


def pick_samples(dataset_dir: Path, n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """`n` manifest rows drawn at random (the same ones for the same shards and seed), in shard order.

    Whole row groups are drawn at random until they hold 4n rows, and the rows drawn from those:
    the manifest's rows are in key-hash order, so a row group is a random sample already, and the
    memory is a few row groups' whatever the dataset's size.
    """
    rng = random.Random(seed)
    sizes = manifest_row_groups(dataset_dir)
    groups, held = list(range(len(sizes))), 0
    rng.shuffle(groups)
    for i, g in enumerate(groups):
        held += sizes[g]
        if held >= 4 * n:
            groups = groups[: i + 1]
            break
    rows = read_manifest(dataset_dir, columns=["key", "split", "shard", "tags"], row_groups=sorted(groups))
    chosen = rng.sample(rows, min(n, len(rows)))
    return sorted(chosen, key=lambda r: (r["split"], r["shard"], r["key"]))


def load_crops(dataset_dir: Path, rows: list[dict[str, Any]]) -> list[Image.Image]:
    """The crops of `rows`, read from their shards (each shard opened once)."""
    wanted = {r["key"] for r in rows}
    found: dict[str, Image.Image] = {}
    for shard in dict.fromkeys(r["shard"] for r in rows):
        for raw in iter_image_samples(readable(Path(dataset_dir) / "images" / shard)):
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


def rejects_by_reason(dataset_dir: Path) -> list[dict[str, Any]]:
    """One row per kind of reject (its reason without particulars: 'too small: 20x30 (…)' -> 'too small'),
    most frequent first, counted in Arrow: count, and its first file with its full reason."""
    t = rejects_table(dataset_dir)
    kind = pc.utf8_trim_whitespace(pc.replace_substring_regex(t.column("reason"), r"(?s)[:(].*", ""))
    kind = pc.if_else(pc.equal(kind, ""), t.column("reason"), kind)
    t = t.append_column("kind", kind).append_column("row", pa.array(range(len(t)), pa.int64()))
    groups = t.group_by("kind").aggregate([("row", "count"), ("row", "min")])
    groups = groups.sort_by([("row_count", "descending"), ("row_min", "ascending")])
    first = t.take(groups.column("row_min")).to_pylist()
    return [{"reason": r["kind"], "count": n, "stage": r["stage"], "example": r["path"], "example reason": r["reason"]}
            for r, n in zip(first, groups.column("row_count").to_pylist(), strict=True)]
