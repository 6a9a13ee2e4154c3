"""Tag fidelity and tagger-feature KID of a painter's samples: the tagger reads the prompted tags back
from pixels. (Inception KIDs: tagdit.evaluation.kid.)"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from tagdit.config import PipelineConfig, SamplerConfig
from tagdit.data.metrics import psnr
from tagdit.sampling.painter import Painter, to_pil
from tagdit.sampling.prompts import caption

log = logging.getLogger(__name__)


def recalls(predicted: list[list[str]], wanted: list[list[str]]) -> np.ndarray:
    """Per-image recall of the wanted tags among the tagger's tags, (N,)."""
    return np.array([len(set(p) & set(w)) / max(1, len(w)) for p, w in zip(predicted, wanted, strict=True)])


def fidelity(predicted: list[list[str]], wanted: list[list[str]]) -> dict[str, float]:
    """Mean recall and precision of the wanted tags among the tagger's tags, per image."""
    prec = [len(set(p) & set(w)) / max(1, len(p)) for p, w in zip(predicted, wanted, strict=True)]
    return {"recall": float(np.mean(recalls(predicted, wanted))), "precision": float(np.mean(prec)), "n": len(wanted)}


def recall_se(predicted: list[list[str]], wanted: list[list[str]], per_prompt: int) -> float | None:
    """Standard error of the mean recall of P prompts x `per_prompt` samples (prompt-major), within
    prompts: sqrt(sum_p s_p^2 / m) / P (the stratified-mean formula). The prompts are a fixed choice,
    the same in every run, so only which noise each sample starts from is random; the spread between
    prompts is not noise of the estimate. None for one sample per prompt."""
    r = recalls(predicted, wanted)
    if per_prompt < 2 or len(r) == 0:
        return None
    r = r.reshape(-1, per_prompt)  # (P, m)
    return float(np.sqrt(r.var(axis=1, ddof=1).sum() / per_prompt) / len(r))


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
        imgs = painter.draw(rows, [[]] * len(rows), sampler, cfg.evaluate.cfg_scale, seeds=1000 + start)
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
    """KID's mean (KID_measure.R's batches of 32), None when either set has fewer than 2 images."""
    from models.kid import kid

    return kid(real, fake, seed=0)[0] if len(real) > 1 and len(fake) > 1 else None


def tag_fidelity(cfg: PipelineConfig, painter: Painter, tagger: Any, prompts: list[list[str]],
                 reals: list[tuple[Image.Image, dict]], recs: list[Image.Image]) -> dict[str, Any]:
    """Recall/precision of prompted tags for CFG samples, unconditional samples (the floor), real
    images (the ceiling: only those with an in-vocabulary tag) and their VAE reconstructions (the
    ceiling any latent model can reach); KID against the real images over the tagger's score vectors
    (`kid_tagger`); the recall's standard error over the samples (`recall_se`, see `recall_se`)."""
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
        "cfg_scale": cfg.evaluate.cfg_scale,
        "samples_per_prompt": m,
        "cfg": {**fidelity(pred_cond, conds), "recall_se": recall_se(pred_cond, conds, m)},
        "unconditional": {**fidelity(pred_uncond, conds), "recall_se": recall_se(pred_uncond, conds, m)},
        "real": fidelity([pred_real[i] for i in tagged], [real_caps[i] for i in tagged]),
        "reconstructed": fidelity([pred_rec[i] for i in tagged], [real_caps[i] for i in tagged]),
        "kid_tagger": {"cfg": _kid(feat_real, feat_cond), "unconditional": _kid(feat_real, feat_uncond)},
        "per_prompt": per_prompt,
    }
    out["sampler_recall"] = sampler_recall(cfg, painter, tagger, conds, out["cfg"])
    real_recall = max(out["real"]["recall"], 1e-9)  # the tagger is deterministic: no noise in the denominator
    out["tag_recall_ratio"] = out["cfg"]["recall"] / real_recall
    out["tag_recall_ratio_se"] = None if out["cfg"]["recall_se"] is None else out["cfg"]["recall_se"] / real_recall
    return out
