"""Evaluation stage: sample grids (DDIM and DDPM, CFG, unconditional and negative-prompt rows) and
tag-fidelity metrics (the tagger reads the prompted tags back from generated pixels).

Outputs under `<run>/eval/<dit checkpoint>-<key>/`: `grid-<sampler>.png` (one per sampler, the unit
of resume) and `metrics.json`. The flow publishes them as a Prefect markdown artifact.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prefect import task

from tagdit.config import PipelineConfig, SamplerConfig
from tagdit.files import atomic_path, write_json_atomic
from tagdit.formats.image_shards import open_image, read_samples
from tagdit.metrics import psnr
from tagdit.painter import Painter, load_painter, to_pil
from tagdit.stage import Stage, StageRecord, stage_cache_key

log = logging.getLogger(__name__)


def _extra_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """The tagger's resolved commit and file hashes (resolved once per process: no Hub request here),
    and the Inception-v3 weights' sha256 when they are found (they decide whether kid_inception exists)."""
    from models.inception import find_inception_weights
    from tagdit.stage import file_fingerprint
    from tagdit.tagger import resolve_tagger

    inputs = resolve_tagger(cfg.tagger).key_inputs()
    if (weights := find_inception_weights(cfg.evaluate.inception_weights)) is not None:
        inputs["inception_v3"] = file_fingerprint(weights)
    return inputs


EVALUATE = Stage(
    name="evaluate",
    modules=("tasks.evaluate", "tagdit.painter", "tagdit.grid", "models.sampling", "models.diffusion", "models.dit",
             "models.vae", "models.kid", "models.inception", "tagdit.vocab", "tagdit.tagger:TagResult",
             "tagdit.tagger:mcut_threshold", "tagdit.tagger:select_tags",
             "tagdit.formats.image_shards", "tagdit.formats.latent_shards", "tagdit.formats.wd_image",
             "tagdit.formats.selected_tags", "tagdit.metrics"),
    sections=("evaluate", "tagger"),
    out_dir=lambda cfg, up: cfg.run_dir / "eval",
    extra_inputs=_extra_inputs,
)


def val_samples(dataset_dir: Path, limit: int = 512) -> list[tuple[Image.Image, dict]]:
    """(RGB image, json) of the validation split, in shard order."""
    return [(open_image(data), meta) for data, meta in read_samples(dataset_dir, "val", limit)]


def caption(meta: dict, vocab: Any, max_tags: int) -> list[str]:
    """An image's tags that the DiT knows, in score order."""
    return [t for t in meta["tags"] if vocab.lookup(t) == t][:max_tags]


def default_prompts(reals: list[tuple[Image.Image, dict]], vocab: Any, n: int, max_tags: int) -> list[list[str]]:
    """Frequent yet varied tag combinations drawn from the real validation captions.

    Greedy: each pick is the caption with the largest share of tags no earlier pick used, ties
    going to the most frequent tags (mean log-frequency); captions with the same tag set count once.
    """
    captions = [caption(m, vocab, max_tags) for _, m in reals]
    freq = Counter(t for c in captions for t in c)
    unique = list({frozenset(c): c for c in reversed(captions) if c}.values())  # first occurrence wins
    score = {tuple(c): sum(math.log(freq[t]) for t in c) / len(c) for c in unique}
    chosen: list[list[str]] = []
    used: set[str] = set()
    while unique and len(chosen) < n:
        best = max(unique, key=lambda c: (sum(t not in used for t in c) / len(c), score[tuple(c)], c))
        unique.remove(best)
        chosen.append(best)
        used.update(best)
    return chosen


def negative_example(cfg: PipelineConfig, prompts: list[list[str]], vocab: Any) -> tuple[list[str], list[str]]:
    """(prompt, negative): the config's, or the first prompt with its first tag as the negative removed."""
    if cfg.evaluate.negative_example:
        p, n = cfg.evaluate.negative_example
        return vocab.parse_prompt(p)[0], vocab.parse_prompt(n)[0]
    first = prompts[0]
    return first[1:], first[:1]


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


def render_sampler_grid(cfg: PipelineConfig, painter: Painter, rows: list[tuple[list[str], list[str], str]],
                        sampler: SamplerConfig, dst: Path) -> None:
    from tagdit.grid import render_grid

    seeds = cfg.evaluate.seeds
    imgs = painter.draw([r[0] for r in rows], [r[1] for r in rows], sampler, cfg.evaluate.cfg, seeds)
    tiles = [[imgs[j * len(rows) + i] for j in range(len(seeds))] for i in range(len(rows))]  # row i, seed j
    grid = render_grid(tiles, [r[2] for r in rows], [f"seed {s}" for s in cfg.evaluate.seeds])
    with atomic_path(dst) as tmp:
        grid.save(tmp, format="PNG")


def prompt_rows(cfg: PipelineConfig, painter: Painter, reals: list) -> tuple[list[list[str]], list[tuple]]:
    """(metric prompts, grid rows): each prompt, an unconditional row and a negative-prompt row."""
    if cfg.evaluate.prompts:
        prompts = []
        for p in cfg.evaluate.prompts:
            known, unknown = painter.vocab.parse_prompt(p)
            if unknown:
                log.warning("evaluate prompt %r: tags not in the vocabulary, ignored: %s", p, unknown)
            prompts.append(known)
    else:
        prompts = default_prompts(reals, painter.vocab, cfg.evaluate.n_prompts, painter.max_tags)
    if not prompts:
        raise ValueError("no evaluation prompts: the validation split has no tags in the vocabulary")
    neg_prompt, neg = negative_example(cfg, prompts, painter.vocab)
    rows = [(p, [], ", ".join(p)) for p in prompts]
    rows.append(([], [], "(unconditional)"))
    rows.append((neg_prompt, neg, f"{', '.join(neg_prompt)}  |  negative: {', '.join(neg)}"))
    return prompts, rows


def render_grids(cfg: PipelineConfig, painter: Painter, rows: list[tuple], out: Path, force: bool) -> dict[str, str]:
    """One grid per sampler (the unit of resume: a grid already rendered is kept)."""
    grids = {}
    for sampler in cfg.evaluate.samplers:
        dst = out / f"grid-{sampler.name}.png"
        if force or not dst.exists():
            log.info("evaluate: rendering %s (%s, %d steps, eta %g)", dst.name, sampler.sampler, sampler.steps,
                     sampler.eta)
            render_sampler_grid(cfg, painter, rows, sampler, dst)
        grids[sampler.name] = str(dst)
    return grids


def log_to_tensorboard(cfg: PipelineConfig, grids: dict[str, str], metrics: dict[str, Any], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(cfg.run_dir / "eval" / "tb")) as writer:
        for name, path in grids.items():
            writer.add_image(f"grid/{name}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        writer.add_scalar("eval/tag_recall_ratio", metrics["tag_recall_ratio"], step)
        for name, r in metrics.get("sampler_recall", {}).items():
            writer.add_scalar(f"eval/recall_cfg_{name}", r["recall"], step)
        for kind in ("kid_tagger", "kid_inception"):
            for name, value in metrics.get(kind, {}).items():
                if value is not None:
                    writer.add_scalar(f"eval/{kind}_{name}", value, step)


def evaluate(cfg: PipelineConfig, shards: StageRecord, vae: StageRecord, latents: StageRecord,
             dit: StageRecord, force: bool = False) -> StageRecord:
    """Render every sampler's grid for the DiT checkpoint `dit` names and compute metrics.json."""
    import torch

    from tagdit.tagger import WDTagger, resolve_tagger

    upstream = {"shards": shards, "vae": vae, "latents": latents, "dit": dit}
    if not force and (rec := EVALUATE.valid_record(cfg, upstream)):
        return rec
    torch.manual_seed(0)
    painter = load_painter(cfg, dit.info["checkpoint"], vae.info["checkpoint"], latents.out_dir)
    ckpt = painter.checkpoint
    out = EVALUATE.out_dir(cfg, upstream) / f"{ckpt.name}-{EVALUATE.key(cfg, upstream)[-8:]}"
    out.mkdir(parents=True, exist_ok=True)
    reals = val_samples(cfg.dataset_dir)
    prompts, rows = prompt_rows(cfg, painter, reals)
    grids = render_grids(cfg, painter, rows, out, force)
    recs, vae_psnr = reconstruct(painter, reals)
    metrics = tag_fidelity(cfg, painter, WDTagger.from_config(cfg.tagger), prompts, reals, recs)
    dit_meta = json.loads((ckpt / "meta.json").read_text())
    metrics.update({
        "vae_psnr_db": vae_psnr,
        "dit_val_loss": dit_meta.get("metrics", {}).get("val_loss"),
        "dit_checkpoint": ckpt.name,
        "dit_step": dit_meta["step"],
        "prompts": [", ".join(r[0]) for r in rows[:len(prompts)]],
        "negative_example": {"prompt": ", ".join(rows[-1][0]), "negative": ", ".join(rows[-1][1])},
        "grids": grids,
        **resolve_tagger(cfg.tagger).record_info(),
    })
    write_json_atomic(out / "metrics.json", metrics)
    log_to_tensorboard(cfg, grids, metrics, dit_meta["step"])
    info = {"dir": str(out), "metrics": str(out / "metrics.json"), "grids": grids, "dit_checkpoint": ckpt.name,
            "tag_recall_ratio": metrics["tag_recall_ratio"], "vae_psnr_db": metrics["vae_psnr_db"],
            "kid_tagger": metrics["kid_tagger"], "kid_inception": metrics.get("kid_inception"),
            "recall": {k: metrics[k]["recall"] for k in ("cfg", "unconditional", "real", "reconstructed")},
            "sampler_recall": {name: r["recall"] for name, r in metrics["sampler_recall"].items()}}
    return EVALUATE.write_stamp(cfg, upstream, [*(Path(g) for g in grids.values()), out / "metrics.json"], info)


@task(name="evaluate", cache_key_fn=stage_cache_key(EVALUATE), persist_result=True, tags=["eval"])
def evaluate_task(cfg: PipelineConfig, shards: StageRecord, vae: StageRecord, latents: StageRecord,
                  dit: StageRecord, force: bool = False) -> StageRecord:
    """Sample grids + tag-fidelity metrics for the DiT checkpoint `dit` names (its own slot: tag `eval`)."""
    return evaluate(cfg, shards, vae, latents, dit, force=force)


def artifact_markdown(record: StageRecord) -> str:
    """A small embedded grid, the metrics table and links to the full-size files."""
    from tagdit.grid import png_data_uri

    m = json.loads(Path(record.info["metrics"]).read_text())
    first = next(iter(m["grids"].values()))
    lines = [
        f"# tagdit evaluation — {m['dit_checkpoint']}",
        f"![grid]({png_data_uri(Image.open(first))})",
        "",
        "| images | tag recall | tag precision |",
        "|---|---|---|",
    ]
    for k, label in (("cfg", f"CFG {m['cfg_scale']} samples ({m['sampler']})"), ("unconditional", "unconditional samples (floor)"),
                     ("real", "real validation images (ceiling)"),
                     ("reconstructed", "their VAE reconstructions (the VAE's ceiling)")):
        lines.append(f"| {label} | {m[k]['recall']:.3f} | {m[k]['precision']:.3f} |")
    for name, r in list(m.get("sampler_recall", {}).items())[1:]:
        lines.append(f"| CFG {m['cfg_scale']} samples ({name}: {r['sampler']}, {r['steps']} steps) "
                     f"| {r['recall']:.3f} | {r['precision']:.3f} |")
    kids = " · ".join(f"{kind} (CFG): {m[kind].get('cfg')}" for kind in ("kid_tagger", "kid_inception") if kind in m)
    lines += ["", f"**tag_recall_ratio** (CFG / real): {m['tag_recall_ratio']:.3f} · VAE PSNR: "
              f"{m['vae_psnr_db']:.2f} dB · DiT val loss: {m['dit_val_loss']} · {kids}",
              "", "Full-size files (on the machine that ran the evaluation):"]
    lines += [f"- {name}: `{Path(p).resolve()}`" for name, p in m["grids"].items()]
    lines.append(f"- metrics: `{Path(record.info['metrics']).resolve()}`")
    return "\n".join(lines)


def metrics_table(record: StageRecord) -> list[dict[str, Any]]:
    """The headline metrics as table rows (a Prefect table artifact with a stable key per run)."""
    m = json.loads(Path(record.info["metrics"]).read_text())
    rows = [{"metric": "dit_checkpoint", "value": m["dit_checkpoint"]},
            {"metric": "tag_recall_ratio", "value": round(m["tag_recall_ratio"], 4)}]
    rows += [{"metric": f"recall_{k}", "value": round(m[k]["recall"], 4)}
             for k in ("cfg", "unconditional", "real", "reconstructed")]
    rows += [{"metric": f"recall_cfg_{name}", "value": round(r["recall"], 4)}
             for name, r in m.get("sampler_recall", {}).items()]
    rows += [{"metric": f"{kind}_{k}", "value": None if v is None else round(v, 5)}
             for kind in ("kid_tagger", "kid_inception") for k, v in m.get(kind, {}).items()]
    rows += [{"metric": "vae_psnr_db", "value": round(m["vae_psnr_db"], 3)},
             {"metric": "dit_val_loss", "value": m["dit_val_loss"]}]
    return rows
