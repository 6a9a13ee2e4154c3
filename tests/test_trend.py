"""The nightly trend: one row per evaluated checkpoint of a run, rebuilt from its evaluation folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tagdit.evaluation.plot import nice_ticks
from tagdit.evaluation.trend import SERIES, trend_plot, trend_rows
from tagdit.formats.eval_metrics import EvalMetrics, Fidelity


def evaluation(folder: Path, step: int, recall: float, mtime: float) -> None:
    folder.mkdir(parents=True)
    fid, real = Fidelity(recall=recall, precision=0.5, n=8), Fidelity(recall=0.8, precision=0.9, n=8)
    EvalMetrics(dit_checkpoint=f"ckpt-{step:07d}", dit_step=step, sampler="ddim50", cfg_scale=7.0, cfg=fid,
                unconditional=Fidelity(recall=recall / 2, precision=0.4, n=8), real=real, reconstructed=real,
                tag_recall_ratio=recall / 0.8, kid_tagger={"cfg": 0.01 * step, "unconditional": 0.1},
                vae_psnr_db=21.5, dit_val_loss=1 / step, grids={}).write(folder / "metrics.json")
    os.utime(folder / "metrics.json", (mtime, mtime))


def test_rows_by_step_with_the_latest_evaluation_of_each_checkpoint(tmp_path):
    evaluation(tmp_path / "ckpt-0000400-aaaa", 400, 0.6, mtime=1_000)
    evaluation(tmp_path / "ckpt-0000200-bbbb", 200, 0.4, mtime=2_000)
    evaluation(tmp_path / "ckpt-0000400-cccc", 400, 0.7, mtime=3_000)  # the same checkpoint, evaluated again
    (tmp_path / "ckpt-0000600-dddd").mkdir()  # an evaluation still running: no metrics.json yet
    (tmp_path / "tb").mkdir()
    rows = trend_rows(tmp_path)
    assert [(r["step"], r["tag recall (CFG)"], r["tag recall (no CFG)"]) for r in rows] == [(200, 0.4, 0.2), (400, 0.7, 0.35)]
    assert rows[1]["recall ratio"] == 0.875 and rows[1]["KID (tagger)"] == 4.0 and rows[1]["val loss"] == 0.0025
    plot = trend_plot(rows)
    assert plot.size == (640, 320) and len(plot.getcolors(10_000)) > 3  # lines, points and labels drawn
    assert trend_rows(tmp_path / "missing") == [] and trend_plot([]).size == (640, 320)


def test_the_x_axis_runs_from_step_0_to_a_round_number_past_the_last_checkpoint():
    assert nice_ticks(900) == [0, 200, 400, 600, 800, 1000] and nice_ticks(433_200)[-1] == 500_000
    assert nice_ticks(7) == [0, 2, 4, 6, 8] and nice_ticks(0) == [0, 1]


def test_a_single_checkpoint_is_a_dot_at_its_step_not_a_degenerate_axis():
    """One evaluation at step 900 read "step 900 ... step 900" across the whole axis."""
    plot = np.asarray(trend_plot([{"step": 900, "tag recall (CFG)": 0.5, "tag recall (no CFG)": 0.25,
                                   "recall ratio": 0.8}]))
    ys, xs = np.nonzero((plot[:250] == SERIES[0][1]).all(-1))  # the CFG series' colour above the legend
    assert len(xs) and 0.85 < (xs.mean() - 52) / (640 - 52 - 16) < 0.95  # at 900 of an axis to 1000
