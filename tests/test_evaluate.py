"""Evaluation helpers: default prompts, tag fidelity, VAE round trip, the markdown artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.vae import build_vae
from tagdit.config import VAE_PRESETS
from tagdit.painter import Painter
from tagdit.stage import StageRecord
from tagdit.vocab import SPECIALS, Vocab
from tasks.evaluate import artifact_markdown, default_prompts, fidelity, metrics_table, reconstruct


def reals_with(captions: list[list[str]]) -> list[tuple[Image.Image, dict]]:
    return [(Image.new("RGB", (16, 16)), {"tags": c}) for c in captions]


def test_default_prompts_are_distinct_tag_sets_that_spread_over_the_vocabulary():
    grey = ["white background", "monochrome", "greyscale", "short hair"]
    captions = [grey] * 20 + [list(reversed(grey))] * 20 + [["white background", "monochrome", "greyscale", "long hair"]] * 10
    captions += [["blue hair", "pink background", "long hair"]] * 3 + [["red hair", "yellow background", "short hair"]] * 2
    vocab = Vocab([*SPECIALS, *sorted({t for c in captions for t in c})])
    prompts = default_prompts(reals_with(captions), vocab, n=3, max_tags=16)
    assert len({frozenset(p) for p in prompts}) == 3  # the reversed caption is the same prompt
    assert frozenset(prompts[0]) == frozenset(grey)  # the most frequent combination comes first
    # the next picks bring tags the first did not use, rather than another greyscale variant
    assert {"blue hair", "red hair"} <= {t for p in prompts[1:] for t in p}


def test_fidelity_is_mean_per_image_recall_and_precision():
    got = fidelity([["a", "b"], ["c"]], [["a", "x"], ["c", "d", "e", "f"]])
    assert got == {"recall": pytest.approx((0.5 + 0.25) / 2), "precision": pytest.approx((0.5 + 1.0) / 2), "n": 2}
    assert fidelity([[]], [[]]) == {"recall": 0.0, "precision": 0.0, "n": 1}


def test_reconstruct_round_trips_every_image_and_scores_psnr():
    torch.manual_seed(0)
    vae = build_vae(VAE_PRESETS["demo"]).eval()
    gen = Painter(dit=None, vae=vae, vocab=None, stats=None, device=torch.device("cpu"), checkpoint=Path("ckpt"))
    reals = [(Image.new("RGB", (16, 16), (i * 30, 100, 200)), {"tags": []}) for i in range(5)]
    recs, psnr = reconstruct(gen, reals, batch=2)
    assert len(recs) == 5 and recs[0].size == (16, 16)
    assert 0 < psnr < 60


def test_artifacts_have_the_grid_the_metrics_and_paths_but_no_file_links(tmp_path: Path):
    grid = tmp_path / "grid-ddim50.png"
    Image.new("RGB", (8, 8), "red").save(grid)
    row = {"recall": 0.5, "precision": 0.6, "n": 4}
    metrics = {"dit_checkpoint": "ckpt-0000010", "grids": {"ddim50": str(grid)}, "cfg_scale": 4.0, "sampler": "ddim50",
               "cfg": row, "unconditional": row, "real": row, "reconstructed": row, "tag_recall_ratio": 0.9,
               "vae_psnr_db": 20.0, "dit_val_loss": 0.1, "kid_tagger": {"cfg": 0.01, "unconditional": 0.2}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    record = StageRecord(stage="evaluate", key="k", out_dir=str(tmp_path), fingerprint="f",
                         info={"metrics": str(tmp_path / "metrics.json")})
    md = artifact_markdown(record)
    assert "data:image/png;base64," in md
    assert md.count("| 0.500 | 0.600 |") == 4
    assert str(grid.resolve()) in md and "file://" not in md and "tag_recall_ratio" in md
    table = {row["metric"]: row["value"] for row in metrics_table(record)}
    assert table["dit_checkpoint"] == "ckpt-0000010" and table["tag_recall_ratio"] == 0.9
    assert table["kid_tagger_cfg"] == 0.01 and table["recall_real"] == 0.5
