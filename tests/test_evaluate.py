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
from tagdit.evaluation.fidelity import fidelity, recall_se, reconstruct, tag_fidelity
from tagdit.evaluation.kid import _inception_missing, inception_kids, kid_conditions
from tagdit.evaluation.report import artifact_markdown, log_to_tensorboard
from tagdit.files import sha256_file
from tagdit.formats.eval_metrics import EvalMetrics, KidScore
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


def test_recall_se_is_the_within_prompt_standard_error_of_the_mean_recall():
    wanted = [["a", "b"]] * 3 + [["c"]] * 3  # 2 prompts x 3 samples, prompt-major
    got = [["a", "b"], ["a"], [], ["c"], ["c"], ["c"]]  # recalls 1, 0.5, 0 | 1, 1, 1
    # s² = 0.25 and 0 within the prompts: sqrt((0.25 + 0) / 3) / 2; the spread between prompts is not noise
    assert recall_se(got, wanted, per_prompt=3) == pytest.approx(np.sqrt(0.25 / 3) / 2)
    assert recall_se(got, wanted, per_prompt=1) is None


@pytest.mark.numerics
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
               "vae_psnr_db": 20.0, "dit_val_loss": 0.123456789, "kid_tagger": {"cfg": 0.0123456789, "unconditional": 0.2}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    record = StageRecord(stage="evaluate", key="k", out_dir=str(tmp_path), fingerprint="f",
                         info={"metrics": str(tmp_path / "metrics.json")})
    md = artifact_markdown(record.info["metrics"])
    assert "data:image/png;base64," in md
    assert "DiT val loss: 0.1235 · kid_tagger (CFG): 0.01235" in md and "456789" not in md  # rounded, not raw floats
    assert md.count("| 0.500 | 0.600 |") == 4
    metrics["sampler_recall"] = {"ddim50": {"sampler": "ddim", "steps": 50, **row},
                                 "dpmpp20": {"sampler": "dpmpp_2m", "steps": 20, "recall": 0.25, "precision": 0.5, "n": 4}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert "| CFG 4.0 samples (dpmpp20: dpmpp_2m, 20 steps) | 0.250 | 0.500 |" in artifact_markdown(record.info["metrics"])
    md = artifact_markdown(record.info["metrics"])
    assert str(grid.resolve()) in md and "file://" not in md and "tag_recall_ratio" in md


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


def test_tag_fidelity_reports_the_ratio_with_its_standard_error(tmp_path: Path, monkeypatch):
    cfg = load_config(None, ["evaluate.metric_samples=3"])
    rng = np.random.default_rng(0)
    reals = [(noise_image(rng, (200, 40, 40)), {"tags": ["red"]}) for _ in range(3)]
    got = tag_fidelity(cfg, NoisePainter(Vocab([*SPECIALS, "red"])), ColourTagger(), [["red"]], reals,
                       [im for im, _ in reals])
    assert "kid_inception" not in got and got["kid_tagger"]["cfg"] is not None
    assert got["cfg"]["recall_se"] == 0.0 and got["tag_recall_ratio_se"] == 0.0  # every sample recalls "red"
    assert got["unconditional"]["recall_se"] == 0.0 and got["real"].get("recall_se") is None


class CaptionPainter(NoisePainter):
    """Reddish noise for every row: what the KID samples' conditions are is checked separately."""

    def draw(self, conds, negs, sampler, cfg_scale, seeds):
        assert sampler.name == "ddim20" and sampler.steps == 20  # KID_measure.R's DDIM 20
        rng = np.random.default_rng(seeds)
        return [noise_image(rng, (200, 40, 40)) for _ in conds]


@pytest.mark.usefixtures("one_thread")
def test_inception_kids_name_their_variant_weights_and_sizes_and_only_run_with_weights(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = load_config(None, ["evaluate.kid_images=5", "evaluate.kid_variants=[original]"])
    rng = np.random.default_rng(0)
    reals = [(noise_image(rng, (200, 40, 40)), {"tags": ["red"]}) for _ in range(4)]
    painter = CaptionPainter(Vocab([*SPECIALS, "red"]))
    _inception_missing.cache_clear()
    with caplog.at_level(logging.INFO, logger="tagdit.evaluation.kid"):
        without = [inception_kids(cfg, painter, iter(reals)) for _ in range(2)]
    said = [r.getMessage() for r in caplog.records if "Inception-v3" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path / "hub" / "checkpoints") in said[0]  # once per process, saying where
    assert without[0]["original"] | {"note": ""} == {
        "variant": "original", "extractor": "InceptionV3 pool features (2048-d)", "weights": None, "input_size": 75,
        "generated": 0, "real": 0, "sampler": "ddim20", "cfg_scale": 4.0, "subset_size": 32, "subsets": 0,
        "mean": None, "std": None, "note": ""}
    hub_file = tmp_path / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth"
    hub_file.parent.mkdir(parents=True)
    torch.save(live_inception().state_dict(), hub_file)
    got = inception_kids(cfg, painter, iter(reals))["original"]
    assert (got["weights"], got["input_size"], got["generated"], got["real"]) == (
        "torchvision inception_v3_google-0cc3c7bd", 75, 5, 4)
    assert (got["subset_size"], got["subsets"]) == (4, 1) and np.isfinite(got["mean"]) and got["std"] == 0.0
    assert "Keras" in got["note"] and KidScore(**got).variant == "original"  # what metrics.json holds


def test_kid_conditions_are_captions_of_random_validation_images():
    captions = [["red"], ["blue", "long hair"], []]
    conds = kid_conditions(captions, 300, seed=0)
    assert len(conds) == 300 and all(c in captions for c in conds)
    assert {tuple(c) for c in conds} == {tuple(c) for c in captions}  # every image can be drawn, untagged too
    assert kid_conditions(captions, 300, seed=0) == conds and kid_conditions([], 2) == [[], []]


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


KID_ORIGINAL = {"variant": "original", "extractor": "InceptionV3 pool features (2048-d)",
                "weights": "pt_inception-2015-12-05", "input_size": 75, "generated": 1024, "real": 1400,
                "sampler": "ddim20", "cfg_scale": 4.0, "subset_size": 32, "subsets": 32, "mean": 0.0123, "std": 0.004}


def test_artifacts_and_tensorboard_show_the_kids_and_the_ratios_standard_error(tmp_path: Path, monkeypatch):
    import torch.utils.tensorboard

    grid = tmp_path / "grid-ddim50.png"
    Image.new("RGB", (8, 8), "red").save(grid)
    row = {"recall": 0.5, "precision": 0.6, "n": 4}
    not_computed = KID_ORIGINAL | {"variant": "standard", "weights": None, "mean": None, "std": None,
                                   "note": "no Inception-v3 weights found"}
    metrics = {"dit_checkpoint": "ckpt-0000010", "grids": {"ddim50": str(grid)}, "cfg_scale": 4.0, "sampler": "ddim50",
               "cfg": row, "unconditional": row, "real": row, "reconstructed": row, "tag_recall_ratio": 0.9,
               "tag_recall_ratio_se": 0.021, "samples_per_prompt": 8, "vae_psnr_db": 20.0, "dit_val_loss": 0.1,
               "kid_tagger": {"cfg": 0.01, "unconditional": 0.2},
               "kid": {"original": KID_ORIGINAL, "standard": not_computed}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    record = StageRecord(stage="evaluate", key="k", out_dir=str(tmp_path), fingerprint="f",
                         info={"metrics": str(tmp_path / "metrics.json")})
    md = artifact_markdown(record.info["metrics"])
    assert "kid_tagger (CFG): 0.01" in md and "0.900 ± 0.021" in md and "8 samples per prompt" in md
    assert "KID original: **0.01230 ± 0.00400** (std over 32 subsets of 32" in md and "pt_inception-2015-12-05, 75 px" in md
    assert "KID standard: not computed (no Inception-v3 weights found)" in md
    scalars = {}

    class Writer:
        def __init__(self, logdir): pass
        def __enter__(self): return self
        def __exit__(self, *exc): pass
        def add_image(self, *a, **kw): pass
        def add_scalar(self, tag, value, step): scalars[tag] = value

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", Writer)
    log_to_tensorboard(load_config(None, [f"run.root={tmp_path}"]), EvalMetrics(**metrics, dit_step=10))
    assert scalars == {"eval/tag_recall_ratio": 0.9, "eval/tag_recall_ratio_se": 0.021, "eval/kid_tagger_cfg": 0.01,
                       "eval/kid_tagger_unconditional": 0.2, "eval/kid_original": 0.0123}


def test_an_evaluation_written_before_the_kid_variants_still_reads_and_shows(tmp_path: Path):
    grid = tmp_path / "grid-ddim50.png"
    Image.new("RGB", (8, 8), "red").save(grid)
    row = {"recall": 0.5, "precision": 0.6, "n": 4}
    old = {"dit_checkpoint": "ckpt-0000010", "grids": {"ddim50": str(grid)}, "cfg_scale": 4.0, "sampler": "ddim50",
           "cfg": row, "unconditional": row, "real": row, "reconstructed": row, "tag_recall_ratio": 0.9,
           "vae_psnr_db": 20.0, "dit_val_loss": 0.1, "kid_tagger": {"cfg": 0.01, "unconditional": 0.2},
           "kid_inception": {"cfg": 0.03, "unconditional": None}}
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    record = StageRecord(stage="evaluate", key="k", out_dir=str(tmp_path), fingerprint="f",
                         info={"metrics": str(tmp_path / "metrics.json")})
    m = EvalMetrics.read(tmp_path / "metrics.json")
    assert m.kid == {} and m.tag_recall_ratio_se is None and m.cfg.recall_se is None
    md = artifact_markdown(record.info["metrics"])
    assert "kid_inception (CFG): 0.03" in md and "**tag_recall_ratio** (CFG / real): 0.900 ·" in md
    m.write(tmp_path / "again.json")  # a file written now keeps kid_inception only when it has one
    assert "kid_inception" in json.loads((tmp_path / "again.json").read_text())
    m.kid_inception = None
    m.write(tmp_path / "new.json")
    assert "kid_inception" not in json.loads((tmp_path / "new.json").read_text())
