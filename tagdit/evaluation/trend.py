"""A run's evaluations as a trend: one row per evaluated checkpoint, rebuilt from its evaluation folders."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PIL import Image

from tagdit.evaluation.plot import Series, line_chart
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


def trend_plot(rows: list[dict[str, Any]]) -> Image.Image:
    """Tag recall with and without CFG and their ratio (0 to 1) against the training step, from step 0;
    the legend gives the latest checkpoint's values."""
    series = [Series(name, colour, [(r["step"] or 0, r[name]) for r in rows]) for name, colour in SERIES]
    return line_chart(series, "training step", "tag recall", [i / 5 for i in range(6)])
