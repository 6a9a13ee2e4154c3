"""Image grids with captions (rows = prompts, columns = seeds) and small inline previews."""

from __future__ import annotations

import base64
import io
import textwrap

from PIL import Image, ImageDraw, ImageFont


def render_grid(rows: list[list[Image.Image]], captions: list[str], col_labels: list[str], pad: int = 4) -> Image.Image:
    """One row of tiles per caption; the caption is written under its row."""
    if len(rows) != len(captions):
        raise ValueError("one caption per row")
    tile = rows[0][0].size[0]
    font = ImageFont.load_default()
    ncols = max(len(r) for r in rows)
    width = ncols * (tile + pad) + pad
    chars = max(8, width // 6)  # the default bitmap font is ~6 px per character
    wrapped = [textwrap.wrap(c, chars) or [""] for c in captions]
    line_h = 12
    header = line_h + pad
    height = header + sum(tile + pad + line_h * len(w) + pad for w in wrapped)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((pad + j * (tile + pad), 2), label, fill="black", font=font)
    y = header
    for row, lines in zip(rows, wrapped, strict=True):
        for j, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((tile, tile)), (pad + j * (tile + pad), y))
        y += tile + pad
        for line in lines:
            draw.text((pad, y), line, fill="black", font=font)
            y += line_h
        y += pad
    return grid


def image_data_uri(img: Image.Image, max_width: int = 512, jpeg_quality: int | None = None) -> str:
    """A downscaled PNG (or JPEG, for photos) as a data URI, small enough to live in a Prefect artifact."""
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if jpeg_quality:
        img.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

