"""Inception KIDs of a DiT checkpoint: `evaluate.kid_images` samples drawn for the captions of random
validation images, scored against the validation images under each named variant (models.kid)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tagdit.config import PipelineConfig
from tagdit.sampling.painter import Painter
from tagdit.sampling.prompts import caption

log = logging.getLogger(__name__)

BATCH = 32  # KID_measure.R's batch: generated images per draw
SEED = 100_000  # the KID samples' noise seeds start here, apart from the tag-fidelity samples' (1000 + i)
EXTRACTOR = "InceptionV3 pool features (2048-d)"


def variant_note(name: str, weights: str | None) -> str:
    """Where a measured variant differs from its reference, in one line."""
    if name == "original":
        return (f"KID_measure.R ran Keras' InceptionV3 'imagenet' weights on float pixels of samples drawn "
                f"without a prompt against training batches; here {weights} on 8-bit pixels of samples "
                f"for validation captions against validation images")
    return "pytorch-fid's preprocessing (bilinear resize, no antialiasing); the TF reference resizes slightly differently"


@functools.cache
def _inception_missing(where: Path) -> None:
    """Say once per process why the Inception KIDs are absent."""
    log.info("evaluate: no Inception-v3 weights, so the Inception KIDs are recorded as not computed; put "
             "pytorch-fid's FID weights (or torchvision's inception_v3_google-0cc3c7bd.pth) in %s or set "
             "evaluate.inception_weights", where.parent)


def kid_conditions(captions: list[list[str]], n: int, seed: int = 0) -> list[list[str]]:
    """`n` captions of random validation images (with replacement, seeded); an untagged image gives
    the null condition, as its caption would in training."""
    if not captions:
        return [[] for _ in range(n)]
    picks = np.random.default_rng(seed).integers(0, len(captions), n)
    return [captions[i] for i in picks]


def draw_kid_samples(cfg: PipelineConfig, painter: Painter, conds: list[list[str]]) -> Iterable[Image.Image]:
    """The KID samples, one per condition, CFG at evaluate.cfg_scale, by evaluate.kid_sampler, in batches of 32."""
    started = time.perf_counter()
    for start in range(0, len(conds), BATCH):
        rows = conds[start:start + BATCH]
        yield from painter.draw(rows, [[]] * len(rows), cfg.evaluate.kid_sampler, cfg.evaluate.cfg_scale, seeds=SEED + start)
        done = min(start + BATCH, len(conds))
        if done % (10 * BATCH) == 0 or done == len(conds):
            log.info("evaluate: %d/%d KID samples drawn (%.0f s)", done, len(conds), time.perf_counter() - started)


def _features_by_size(model: Any, images: Iterable[Image.Image], sizes: set[int]) -> dict[int, np.ndarray]:
    """Pool features (N, 2048) of `images` at each input size, from one pass over them (never all in memory)."""
    from models.inception import FEATURE_DIM, inception_features

    out: dict[int, list[np.ndarray]] = {s: [np.zeros((0, FEATURE_DIM))] for s in sizes}
    batch: list[Image.Image] = []

    def flush() -> None:
        for s in sizes:
            out[s].append(inception_features(model, batch, size=s, batch=BATCH))
        batch.clear()

    for im in images:
        batch.append(im)
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    return {s: np.concatenate(f) for s, f in out.items()}


def not_computed(cfg: PipelineConfig, name: str, note: str) -> dict[str, Any]:
    """A variant's record when no score could be measured."""
    from models.kid import VARIANTS

    v = VARIANTS[name]
    return {"variant": name, "extractor": EXTRACTOR, "weights": None, "input_size": v.input_size, "generated": 0,
            "real": 0, "sampler": cfg.evaluate.kid_sampler.name, "cfg_scale": cfg.evaluate.cfg_scale,
            "subset_size": v.subset_size, "subsets": 0, "mean": None, "std": None, "note": note}


def inception_kids(cfg: PipelineConfig, painter: Painter, reals: Iterable[tuple[Image.Image, dict]]) -> dict[str, dict]:
    """Variant name -> KidScore fields, for every `evaluate.kid_variants`: the KID of `kid_images`
    samples against `reals` (validation images, streamed); not computed without weights or images."""
    from models.inception import find_inception_weights, hub_cache_path, load_inception
    from models.kid import VARIANTS

    names = cfg.evaluate.kid_variants
    path = find_inception_weights(cfg.evaluate.inception_weights)
    if path is None or cfg.evaluate.kid_images == 0:
        if path is None:
            _inception_missing(hub_cache_path())
        why = "no Inception-v3 weights found" if path is None else "evaluate.kid_images = 0"
        return {n: not_computed(cfg, n, why) for n in names}
    model, weights = load_inception(path, painter.device)
    sizes = {VARIANTS[n].input_size for n in names}
    captions: list[list[str]] = []

    def real_images() -> Iterable[Image.Image]:
        for im, meta in reals:
            captions.append(caption(meta, painter.vocab, painter.max_tags))
            yield im

    real = _features_by_size(model, real_images(), sizes)
    if len(captions) < 2:
        return {n: not_computed(cfg, n, f"{len(captions)} validation image(s): KID needs 2") for n in names}
    conds = kid_conditions(captions, cfg.evaluate.kid_images)
    fake = _features_by_size(model, draw_kid_samples(cfg, painter, conds), sizes)
    out = {}
    for n in names:
        v = VARIANTS[n]
        s = v.mmd2(real[v.input_size], fake[v.input_size], seed=0)  # (subsets,)
        out[n] = {"variant": n, "extractor": EXTRACTOR, "weights": weights.name, "input_size": v.input_size,
                  "generated": len(conds), "real": len(captions), "sampler": cfg.evaluate.kid_sampler.name,
                  "cfg_scale": cfg.evaluate.cfg_scale, "subset_size": min(v.subset_size, len(captions), len(conds)),
                  "subsets": len(s), "mean": float(s.mean()), "std": float(s.std(unbiased=False)),
                  "note": variant_note(n, weights.name)}
    return out
