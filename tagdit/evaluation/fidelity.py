"""Tag fidelity and KID of a painter's samples: the tagger reads the prompted tags back from pixels."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tagdit.config import PipelineConfig, SamplerConfig
from tagdit.data.metrics import psnr
from tagdit.sampling.painter import Painter, to_pil
from tagdit.sampling.prompts import caption

log = logging.getLogger(__name__)


def fidelity(predicted: list[list[str]], wanted: list[list[str]]) -> dict[str, float]:
    """Mean recall and precision of the wanted tags among the tagger's tags, per image."""
    rec, prec = [], []
    for pred, want in zip(predicted, wanted, strict=True):
        hit = len(set(pred) & set(want))
        rec.append(hit / max(1, len(want)))
        prec.append(hit / max(1, len(pred)))
    return {"recall": float(np.mean(rec)), "precision": float(np.mean(prec)), "n": len(wanted)}


def reconstruct(painter: Painter, reals: list[tuple[Image.Image, dict]], batch: int = 64) -> tuple[list[Image.Image], float]:
    """VAE round trip (posterior mean) of the real images: (reconstructions, mean PSNR in dB on [0, 1])."""
    import torch

    recs, scores = [], []
    for i in range(0, len(reals), batch):
        x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im, _ in reals[i:i + batch]])
        x = (x / 127.5 - 1).to(painter.device)  # (B, 3, H, W)
        with torch.no_grad():
            rec = painter.vae.decode(painter.vae.encode(x)[0]).float().clamp(-1, 1)
        scores.append(psnr(rec, x))
        recs += to_pil(rec)
    return recs, float(torch.cat(scores).mean()) if scores else float("nan")


def tagger_reads(tagger: Any, images: list[Image.Image]) -> tuple[list[list[str]], Any]:
    """The tagger's tags for each image and its score vectors (N, tags), from one pass."""
    probs = list(tagger.probabilities(images))
    return [tagger.select_tags(p).tags for p in probs], np.stack(probs) if probs else np.zeros((0, 0))


def draw_for_metrics(cfg: PipelineConfig, painter: Painter, conds: list[list[str]],
                     sampler: SamplerConfig | None = None, unconditional: bool = True) -> tuple[list, list]:
    """(CFG samples, unconditional samples): one each per prompt row, in bounded batches, by
    `sampler` (default: the first); the unconditional list is empty when not asked for."""
    sampler = sampler or cfg.evaluate.samplers[0]
    cond_imgs, uncond_imgs = [], []
    for start in range(0, len(conds), 32):  # each batch holds k CFG rows (+ k null rows)
        chunk = conds[start:start + 32]
        k = len(chunk)
        rows = chunk + [[]] * k if unconditional else chunk
        imgs = painter.draw(rows, [[]] * len(rows), sampler, cfg.evaluate.cfg, seeds=1000 + start)
        cond_imgs += imgs[:k]
        uncond_imgs += imgs[k:]
    return cond_imgs, uncond_imgs


def sampler_recall(cfg: PipelineConfig, painter: Painter, tagger: Any, conds: list[list[str]],
                   first: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Tag fidelity of the CFG samples per sampler: the first sampler's (`first`, already measured)
    and every other one with `recall: true`, drawn for the same prompt rows and seeds."""
    samplers = cfg.evaluate.samplers
    out = {samplers[0].name: {"sampler": samplers[0].sampler, "steps": samplers[0].steps, **first}}
    for s in samplers[1:]:
        if s.recall:
            imgs, _ = draw_for_metrics(cfg, painter, conds, s, unconditional=False)
            out[s.name] = {"sampler": s.sampler, "steps": s.steps, **fidelity(tagger_reads(tagger, imgs)[0], conds)}
    return out


def _kid(real: np.ndarray, fake: np.ndarray) -> float | None:
    """KID's mean (models.kid defaults), None when either set has fewer than 2 images."""
    from models.kid import kid

    return kid(real, fake, seed=0)[0] if len(real) > 1 and len(fake) > 1 else None


@functools.cache
def _inception_missing(where: Path) -> None:
    """Say once per process why kid_inception is absent."""
    log.info("evaluate: no Inception-v3 weights, so only kid_tagger is reported; for kid_inception put "
             "torchvision's inception_v3_google-0cc3c7bd.pth at %s or set evaluate.inception_weights", where)


def inception_kid(cfg: PipelineConfig, device: Any, reals: list[Image.Image],
                  samples: dict[str, list[Image.Image]]) -> dict[str, float | None] | None:
    """KID over Inception-v3 pool features of each sample set against the real images; None when no
    weights are found (`evaluate.inception_weights`, else torch hub's cache: never downloaded)."""
    from models.inception import (
        find_inception_weights,
        hub_cache_path,
        inception_features,
        load_inception,
    )

    path = find_inception_weights(cfg.evaluate.inception_weights)
    if path is None:
        _inception_missing(hub_cache_path())
        return None
    model = load_inception(path, device)
    feat_real = inception_features(model, reals)  # (N, 2048)
    return {name: _kid(feat_real, inception_features(model, imgs)) for name, imgs in samples.items()}


def tag_fidelity(cfg: PipelineConfig, painter: Painter, tagger: Any, prompts: list[list[str]],
                 reals: list[tuple[Image.Image, dict]], recs: list[Image.Image]) -> dict[str, Any]:
    """Recall/precision of prompted tags for CFG samples, unconditional samples (the floor), real
    images (the ceiling: only those with an in-vocabulary tag) and their VAE reconstructions (the
    ceiling any latent model can reach); KID against the real images over the tagger's score vectors
    (`kid_tagger`) and, when its weights are found, over Inception-v3 features (`kid_inception`)."""
    m = cfg.evaluate.metric_samples
    conds = [p for p in prompts for _ in range(m)]
    cond_imgs, uncond_imgs = draw_for_metrics(cfg, painter, conds)
    pred_cond, feat_cond = tagger_reads(tagger, cond_imgs)
    pred_uncond, feat_uncond = tagger_reads(tagger, uncond_imgs)
    pred_real, feat_real = tagger_reads(tagger, [im for im, _ in reals])
    pred_rec, _ = tagger_reads(tagger, recs)
    real_caps = [caption(meta, painter.vocab, painter.max_tags) for _, meta in reals]
    tagged = [i for i, c in enumerate(real_caps) if c]  # images without an in-vocabulary tag have nothing to recall
    per_prompt = []
    for i, p in enumerate(prompts):
        sl = slice(i * m, (i + 1) * m)
        per_prompt.append({"prompt": ", ".join(p), "cfg": fidelity(pred_cond[sl], conds[sl]),
                           "unconditional": fidelity(pred_uncond[sl], conds[sl])})
    out = {
        "sampler": cfg.evaluate.samplers[0].name,
        "cfg_scale": cfg.evaluate.cfg,
        "samples_per_prompt": m,
        "cfg": fidelity(pred_cond, conds),
        "unconditional": fidelity(pred_uncond, conds),
        "real": fidelity([pred_real[i] for i in tagged], [real_caps[i] for i in tagged]),
        "reconstructed": fidelity([pred_rec[i] for i in tagged], [real_caps[i] for i in tagged]),
        "kid_tagger": {"cfg": _kid(feat_real, feat_cond), "unconditional": _kid(feat_real, feat_uncond)},
        "per_prompt": per_prompt,
    }
    out["sampler_recall"] = sampler_recall(cfg, painter, tagger, conds, out["cfg"])
    kid_inception = inception_kid(cfg, painter.device, [im for im, _ in reals],
                                  {"cfg": cond_imgs, "unconditional": uncond_imgs})
    if kid_inception is not None:
        out["kid_inception"] = kid_inception
    out["tag_recall_ratio"] = out["cfg"]["recall"] / max(out["real"]["recall"], 1e-9)
    return out
