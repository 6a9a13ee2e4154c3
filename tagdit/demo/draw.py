"""Drawing a demo character: a flat-shaded anime-style head painted with PIL into the central square.

Features are drawn big enough to survive a 64 px centre crop; nothing tagged lies outside the
image's central square, so a centre crop keeps every tagged feature.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from tagdit.demo.labels import BACKGROUNDS, EYES, HAIR, RGB, Spec

SKIN: RGB = (255, 226, 204)
OUTLINE: RGB = (46, 32, 40)
BOW_COLOURS: list[RGB] = [(222, 40, 62), (250, 250, 250), (60, 90, 204), (250, 140, 190), (36, 36, 40)]
HAT_COLOURS: list[RGB] = [(72, 52, 40), (52, 52, 62), (112, 40, 132), (32, 92, 62), (172, 150, 110)]
FRAME_COLOURS: list[RGB] = [(30, 30, 30), (150, 30, 40), (60, 60, 140)]
SHIRT_COLOURS: list[RGB] = [(240, 240, 240), (60, 70, 120), (180, 40, 50), (70, 120, 80), (40, 40, 40),
                            (230, 200, 120)]


def _jitter(rng: np.random.Generator, c: RGB, amount: int = 12) -> RGB:
    return tuple(int(v) for v in np.clip(np.array(c) + rng.integers(-amount, amount + 1, 3), 0, 255))


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
