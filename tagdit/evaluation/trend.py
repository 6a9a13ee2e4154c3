"""A run's evaluations as a trend: one row per evaluated checkpoint, rebuilt from its evaluation folders."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from tagdit.formats.eval_metrics import EvalMetrics


def _round(x: float | None, places: int = 5) -> float | None:
    return None if x is None else round(x, places)


def _kids(m: EvalMetrics) -> dict[str, float | None]:
    """The evaluation's KIDs of its CFG samples: over the tagger's scores, and each Inception variant's."""
    return {"KID (tagger)": _round(m.kid_tagger.get("cfg"))} | {
        f"KID ({name})": _round(k.mean) for name, k in m.kid.items()}


def trend_rows(eval_dir: Path) -> list[dict[str, Any]]:
    """Every `<eval_dir>/*/metrics.json`, the latest evaluation of each checkpoint, by training step."""
    latest: dict[str, tuple[float, EvalMetrics]] = {}
    for path in Path(eval_dir).glob("*/metrics.json"):
        try:
            m = EvalMetrics.read(path)
        except Exception:  # written by an older, incompatible version: not part of the trend
            continue
        when = path.stat().st_mtime
        if m.dit_checkpoint not in latest or when > latest[m.dit_checkpoint][0]:
            latest[m.dit_checkpoint] = (when, m)
    rows = []
    for when, m in sorted(latest.values(), key=lambda wm: (wm[1].dit_step or -1, wm[0])):
        rows.append({
            "step": m.dit_step, "tag recall (CFG)": round(m.cfg.recall, 4),
            "tag recall (no CFG)": round(m.unconditional.recall, 4), "recall ratio": round(m.tag_recall_ratio, 4),
            "ratio se": _round(m.tag_recall_ratio_se, 4),
            **_kids(m), "val loss": _round(m.dit_val_loss),
            "sampler": m.sampler, "cfg": m.cfg_scale, "evaluated": time.strftime("%Y-%m-%d %H:%M", time.localtime(when)),
        })  # fmt: skip
    columns = list(dict.fromkeys(k for r in rows for k in r))  # KID variants may differ between evaluations
    return [{k: r.get(k) for k in columns} for r in rows]


SERIES = (("tag recall (CFG)", (31, 119, 180)), ("tag recall (no CFG)", (150, 150, 150)),
          ("recall ratio", (214, 39, 40)))


def trend_plot(rows: list[dict[str, Any]], size: tuple[int, int] = (480, 240)) -> Image.Image:
    """Tag recall with and without CFG and their ratio against the training step (y from 0 to 1)."""
    w, h = size
    left, right, top, bottom = 36, 12, 10, 34
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    steps = [r["step"] or 0 for r in rows]
    lo, hi = min(steps, default=0), max(steps, default=1)
    span = (hi - lo) or 1

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - lo) / span * (w - left - right), top + (1 - min(max(value, 0), 1)) * (h - top - bottom))

    for v in (0, 0.5, 1):
        draw.line([xy(lo, v), xy(hi, v)], fill=(225, 225, 225))
        draw.text((4, xy(lo, v)[1] - 6), f"{v:.1f}", fill="black", font=font)
    draw.text((left, h - bottom + 4), f"step {lo}", fill="black", font=font)
    draw.text((w - right - 60, h - bottom + 4), f"step {hi}", fill="black", font=font)
    for i, (name, colour) in enumerate(SERIES):
        points = [xy(s, r[name]) for s, r in zip(steps, rows, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((left + i * 150, h - 14), name, fill=colour, font=font)
    return img
