"""Evaluation helpers: default prompts, tag fidelity, VAE round trip, the markdown artifact."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from models.inception import InceptionV3
from models.vae import build_vae
from tagdit.config import VAE_PRESETS, load_config
from tagdit.data.vocab import SPECIALS, Vocab
from tagdit.evaluation.fidelity import _inception_missing, fidelity, reconstruct, tag_fidelity
from tagdit.evaluation.report import artifact_markdown, log_to_tensorboard, metrics_table
from tagdit.files import sha256_file
from tagdit.formats.eval_metrics import EvalMetrics
from tagdit.orchestrate.stage import StageRecord
from tagdit.sampling.painter import Painter
from tagdit.sampling.prompts import default_prompts
from tasks.evaluate import _extra_inputs


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
    metrics["sampler_recall"] = {"ddim50": {"sampler": "ddim", "steps": 50, **row},
                                 "dpmpp20": {"sampler": "dpmpp_2m", "steps": 20, "recall": 0.25, "precision": 0.5, "n": 4}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert "| CFG 4.0 samples (dpmpp20: dpmpp_2m, 20 steps) | 0.250 | 0.500 |" in artifact_markdown(record)
    table = {row["metric"]: row["value"] for row in metrics_table(record)}
    assert table["recall_cfg_ddim50"] == 0.5 and table["recall_cfg_dpmpp20"] == 0.25
    md = artifact_markdown(record)
    assert str(grid.resolve()) in md and "file://" not in md and "tag_recall_ratio" in md
    table = {row["metric"]: row["value"] for row in metrics_table(record)}
    assert table["dit_checkpoint"] == "ckpt-0000010" and table["tag_recall_ratio"] == 0.9
    assert table["kid_tagger_cfg"] == 0.01 and table["recall_real"] == 0.5


# ---------------------------------------------------------------- KID over the tagger's scores and Inception-v3

def noise_image(rng: np.random.Generator, colour: tuple[int, int, int]) -> Image.Image:
    """16 px noise around `colour`."""
    return Image.fromarray(np.clip(rng.normal(colour, 40, (16, 16, 3)), 0, 255).astype(np.uint8))


class NoisePainter:
    """Draws reddish noise for prompts with tags, grey noise for empty (unconditional) rows."""

    device, max_tags = torch.device("cpu"), 4

    def __init__(self, vocab: Vocab):
        self.vocab = vocab

    def draw(self, conds, negs, sampler, cfg_scale, seeds):
        rng = np.random.default_rng(seeds)
        return [noise_image(rng, (200, 40, 40) if c else (128, 128, 128)) for c in conds]


class ColourTagger:
    """Scores (mean R, G, B) / 255; tags `red` when red dominates."""

    def probabilities(self, images):
        for im in images:
            yield np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) / 255

    def select_tags(self, p):
        return SimpleNamespace(tags=["red"] if p[0] > p[1] + 0.2 else [])


class SamplerPainter(NoisePainter):
    """Red for prompted rows, except with the sampler named `grey` (grey for every row)."""

    def draw(self, conds, negs, sampler, cfg_scale, seeds):
        imgs = super().draw(conds, negs, sampler, cfg_scale, seeds)
        rng = np.random.default_rng(seeds)
        return [noise_image(rng, (128, 128, 128)) for _ in conds] if sampler.name == "grey" else imgs


def test_each_sampler_asked_for_reports_the_recall_of_its_cfg_samples(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no Inception weights
    samplers = ('evaluate.samplers=[{name: ddim50}, {name: ddpm, eta: 1.0}, '
                '{name: dpmpp20, sampler: dpmpp_2m, steps: 20, recall: true}, {name: grey, recall: true}]')
    cfg = load_config(None, ["evaluate.metric_samples=3", samplers])
    rng = np.random.default_rng(0)
    reals = [(noise_image(rng, (200, 40, 40)), {"tags": ["red"]}) for _ in range(3)]
    got = tag_fidelity(cfg, SamplerPainter(Vocab([*SPECIALS, "red"])), ColourTagger(), [["red"]], reals,
                       [im for im, _ in reals])
    by = got["sampler_recall"]
    assert list(by) == ["ddim50", "dpmpp20", "grey"]  # the first always; ddpm was not asked for
    assert by["ddim50"]["recall"] == got["cfg"]["recall"] == 1.0
    assert (by["dpmpp20"]["sampler"], by["dpmpp20"]["steps"], by["dpmpp20"]["recall"]) == ("dpmpp_2m", 20, 1.0)
    assert by["grey"]["recall"] == 0.0 and by["grey"]["n"] == 3


def live_inception() -> InceptionV3:
    """Random Inception-v3 whose activations neither vanish nor explode (He-initialised convs)."""
    torch.manual_seed(0)
    model = InceptionV3()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


@pytest.mark.usefixtures("one_thread")
def test_tag_fidelity_reports_kid_inception_only_when_weights_are_in_torch_hubs_cache(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = load_config(None, ["evaluate.metric_samples=3"])
    rng = np.random.default_rng(0)
    reals = [(noise_image(rng, (200, 40, 40)), {"tags": ["red"]}) for _ in range(3)]
    args = (cfg, NoisePainter(Vocab([*SPECIALS, "red"])), ColourTagger(), [["red"]], reals, [im for im, _ in reals])
    _inception_missing.cache_clear()
    with caplog.at_level(logging.INFO, logger="tasks.evaluate"):
        without = [tag_fidelity(*args) for _ in range(2)]
    assert "kid_inception" not in without[0] and without[0]["kid_tagger"]["cfg"] is not None
    hub_file = tmp_path / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth"
    said = [r.getMessage() for r in caplog.records if "Inception-v3" in r.getMessage()]
    assert len(said) == 1 and str(hub_file) in said[0]  # once per process, saying where the file goes
    hub_file.parent.mkdir(parents=True)
    torch.save(live_inception().state_dict(), hub_file)
    got = tag_fidelity(*args)
    assert got["kid_tagger"] == without[0]["kid_tagger"]
    kid_inception = got["kid_inception"]
    assert set(kid_inception) == {"cfg", "unconditional"} and all(np.isfinite(v) for v in kid_inception.values())
    assert kid_inception["cfg"] < kid_inception["unconditional"]  # reddish samples look like the reddish reals


def test_the_stage_key_holds_the_inception_weights_hash_only_when_they_are_found(tmp_path: Path, monkeypatch):
    import tagdit.data.tagger

    monkeypatch.setattr(tagdit.data.tagger, "resolve_tagger", lambda tcfg: SimpleNamespace(key_inputs=lambda: {"commit": "c"}))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert _extra_inputs(load_config()) == {"commit": "c"}
    hub_file = tmp_path / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth"
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"weights")
    own = tmp_path / "own.pth"
    own.write_bytes(b"other weights")
    assert _extra_inputs(load_config()) == {"commit": "c", "inception_v3": sha256_file(hub_file)}
    explicit = load_config(None, [f"evaluate.inception_weights={own}"])
    assert _extra_inputs(explicit)["inception_v3"] == sha256_file(own)


def test_artifacts_and_tensorboard_show_kid_inception_when_present(tmp_path: Path, monkeypatch):
    import torch.utils.tensorboard

    grid = tmp_path / "grid-ddim50.png"
    Image.new("RGB", (8, 8), "red").save(grid)
    row = {"recall": 0.5, "precision": 0.6, "n": 4}
    metrics = {"dit_checkpoint": "ckpt-0000010", "grids": {"ddim50": str(grid)}, "cfg_scale": 4.0, "sampler": "ddim50",
               "cfg": row, "unconditional": row, "real": row, "reconstructed": row, "tag_recall_ratio": 0.9,
               "vae_psnr_db": 20.0, "dit_val_loss": 0.1, "kid_tagger": {"cfg": 0.01, "unconditional": 0.2},
               "kid_inception": {"cfg": 0.03, "unconditional": None}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    record = StageRecord(stage="evaluate", key="k", out_dir=str(tmp_path), fingerprint="f",
                         info={"metrics": str(tmp_path / "metrics.json")})
    assert "kid_tagger (CFG): 0.01" in artifact_markdown(record) and "kid_inception (CFG): 0.03" in artifact_markdown(record)
    table = {row["metric"]: row["value"] for row in metrics_table(record)}
    assert table["kid_inception_cfg"] == 0.03 and table["kid_inception_unconditional"] is None
    assert table["kid_tagger_unconditional"] == 0.2
    scalars = {}

    class Writer:
        def __init__(self, logdir): pass
        def __enter__(self): return self
        def __exit__(self, *exc): pass
        def add_image(self, *a, **kw): pass
        def add_scalar(self, tag, value, step): scalars[tag] = value

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", Writer)
    log_to_tensorboard(load_config(None, [f"run.root={tmp_path}"]), EvalMetrics(**metrics, dit_step=10))
    assert scalars == {"eval/tag_recall_ratio": 0.9, "eval/kid_tagger_cfg": 0.01, "eval/kid_tagger_unconditional": 0.2,
                       "eval/kid_inception_cfg": 0.03}
    del metrics["kid_inception"]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert "kid_inception" not in artifact_markdown(record) and "kid_inception_cfg" not in {r["metric"] for r in metrics_table(record)}
