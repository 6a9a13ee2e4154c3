"""A small line chart drawn with PIL (matplotlib is not a dependency): axes, ticks, labels, a legend."""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]


@dataclass
class Series:
    name: str
    colour: Colour
    points: list[tuple[float, float]]  # (x, y), in x order


def nice_ticks(hi: float, count: int = 5) -> list[float]:
    """Ticks 0, d, 2d, ... up to the first at or past `hi`, d a 1/2/5 x 10^k step (0..1000 by 200 for 900)."""
    if hi <= 0:
        return [0.0, 1.0]
    raw = hi / count
    d = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: (s < raw, abs(s - raw)))
    return [i * d for i in range(math.ceil(hi / d - 1e-9) + 1)]


def _label(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e4 else f"{v / 1000:g}k"


def line_chart(series: list[Series], x_label: str, y_label: str, y_ticks: list[float],
               size: tuple[int, int] = (640, 320)) -> Image.Image:
    """Lines through each series' points (a lone point drawn as a dot), on x from 0 to a nice round end."""
    w, h = size
    font = ImageFont.load_default(size=12)
    left, right, top, bottom = 52, 16, 28, 62  # room for the y label, y tick labels, x tick labels + x label + legend
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    x_ticks = nice_ticks(max((x for s in series for x, _ in s.points), default=0))
    x_hi, (y_lo, y_hi) = x_ticks[-1], (y_ticks[0], y_ticks[-1])

    def xy(x: float, y: float) -> tuple[float, float]:
        y = min(max(y, y_lo), y_hi)
        return left + x / x_hi * (w - left - right), top + (y_hi - y) / (y_hi - y_lo) * (h - top - bottom)

    for v in y_ticks:
        (x0, y), (x1, _) = xy(0, v), xy(x_hi, v)
        draw.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        draw.text((x0 - 6, y), _label(v), fill="black", font=font, anchor="rm")
    for v in x_ticks:
        x, y = xy(v, y_lo)
        draw.line([(x, y), (x, y + 4)], fill="black")
        draw.text((x, y + 6), _label(v), fill="black", font=font, anchor="ma")
    draw.line([xy(0, y_hi), xy(0, y_lo), xy(x_hi, y_lo)], fill="black")  # the axes
    draw.text(((left + w - right) / 2, h - bottom + 22), x_label, fill="black", font=font, anchor="ma")
    draw.text((4, 6), y_label, fill="black", font=font)
    legend_x = left
    for s in series:
        pts = [xy(x, y) for x, y in s.points]
        if len(pts) > 1:
            draw.line(pts, fill=s.colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=s.colour)
        text = s.name + (f" {s.points[-1][1]:.3f}" if s.points else "")
        draw.text((legend_x, h - 16), text, fill=s.colour, font=font)
        legend_x += draw.textlength(text, font=font) + 18
    return img
