"""Evaluation stage: sample grids (DDIM and DDPM, CFG, unconditional and negative-prompt rows) and
tag-fidelity metrics (the tagger reads the prompted tags back from generated pixels).

Outputs under `<run>/eval/<dit checkpoint>-<key>/`: `grid-<sampler>.png` (one per sampler, the unit
of resume) and `metrics.json`. The flow publishes them as a Prefect markdown artifact.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prefect import task

from tagdit.config import PipelineConfig, SamplerConfig
from tagdit.files import atomic_path, write_json_atomic
from tagdit.stage import Stage, StageRecord, stage_cache_key

log = logging.getLogger(__name__)


def _tagger_inputs(cfg: PipelineConfig) -> dict[str, str]:
    from tagdit.tagger import tagger_fingerprint

    return tagger_fingerprint(cfg.tagger)


EVALUATE = Stage(
    name="evaluate",
    modules=("tasks.evaluate", "tagdit.grid", "models.sampling", "models.dit", "models.vae", "tagdit.tagger"),
    sections=("evaluate", "tagger", "dit.schedule", "dit.timesteps", "dit.model.max_tags"),
    out_dir=lambda cfg, up: cfg.run_dir / "eval",
    extra_inputs=_tagger_inputs,
)


@dataclass
class Generator:
    """Everything needed to turn tag lists into images."""

    dit: Any
    vae: Any
    vocab: Any
    alpha_bar: Any
    scale_factor: float
    latent_shape: tuple[int, int, int]
    max_tags: int
    device: Any

    def ids(self, tags: list[str]):
        import torch

        return torch.tensor([self.vocab.encode(tags, self.max_tags)], dtype=torch.long)

    def sample(self, conds: list[list[str]], negs: list[list[str]], sampler: SamplerConfig,
               cfg_scale: float, seeds: int | list[int]) -> list[Image.Image]:
        """One image per (cond, neg) row and seed, seed-major (all rows of the first seed, then the
        next), in one batch; each seed's noise is what sampling its rows alone would draw."""
        import torch

        from models.sampling import sample_latents
        from tagdit.training import autocast

        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        tags = torch.cat([self.ids(c) for c in conds]).repeat(len(seeds), 1)  # (S·B, L)
        neg = torch.cat([self.ids(n) for n in negs]).repeat(len(seeds), 1)
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        with autocast(self.device):
            z = sample_latents(self.dit, tags, neg, alpha_bar=self.alpha_bar, shape=(len(tags), *self.latent_shape),
                               steps=sampler.steps, eta=sampler.eta, scale=cfg_scale, generator=gens)
            x = self.vae.decode(z.float() / self.scale_factor)  # (S·B, 3, H, W) in [-1, 1]
        return to_pil(x)


def to_pil(x) -> list[Image.Image]:
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def load_generator(cfg: PipelineConfig, shards: StageRecord, latents: StageRecord, dit: StageRecord,
                   vae: StageRecord) -> Generator:
    from models.diffusion import make_alpha_bar
    from models.dit import load_dit
    from models.vae import load_vae
    from tagdit.training import select_device
    from tagdit.vocab import Vocab

    device = select_device(cfg.evaluate.device)
    stats = json.loads((Path(latents.out_dir) / "stats.json").read_text())
    vae_model, _ = load_vae(Path(vae.info["checkpoint"]))
    return Generator(
        dit=load_dit(Path(dit.out_dir), map_location=device),
        vae=vae_model.to(device),
        vocab=Vocab.load(cfg.dataset_dir / "vocab.json"),
        alpha_bar=make_alpha_bar(cfg.dit.schedule, cfg.dit.timesteps),
        scale_factor=float(stats["scale_factor"]),
        latent_shape=tuple(stats["latent_shape"]),
        max_tags=cfg.dit.model.max_tags,
        device=device,
    )


def val_samples(dataset_dir: Path, limit: int = 512) -> list[tuple[Image.Image, dict]]:
    """(image, json) of the validation split, in shard order."""
    from webdataset.tariterators import tarfile_samples

    urls = sorted(str(p) for p in (dataset_dir / "images").glob("val-*.tar"))
    out = []
    for s in tarfile_samples({"url": u} for u in urls):
        data = s.get("png") or s.get("jpg")
        out.append((Image.open(io.BytesIO(data)).convert("RGB"), json.loads(s["json"])))
        if len(out) >= limit:
            break
    return out


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


def reconstruct(gen: Generator, reals: list[tuple[Image.Image, dict]], batch: int = 64) -> tuple[list[Image.Image], float]:
    """VAE round trip (posterior mean) of the real images: (reconstructions, mean PSNR in dB on [0, 1])."""
    import torch

    recs, scores = [], []
    for i in range(0, len(reals), batch):
        x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im, _ in reals[i:i + batch]])
        x = (x / 127.5 - 1).to(gen.device)  # (B, 3, H, W)
        with torch.no_grad():
            rec = gen.vae.decode(gen.vae.encode(x)[0]).float().clamp(-1, 1)
        mse = (((rec - x) / 2) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        scores.append(10 * torch.log10(1 / mse))
        recs += to_pil(rec)
    return recs, float(torch.cat(scores).mean()) if scores else float("nan")


def tag_fidelity(cfg: PipelineConfig, gen: Generator, tagger: Any, prompts: list[list[str]],
                 reals: list[tuple[Image.Image, dict]], recs: list[Image.Image]) -> dict[str, Any]:
    """Recall/precision of prompted tags for CFG samples, unconditional samples (the floor), real
    images (the ceiling) and their VAE reconstructions (the ceiling any latent model can reach)."""
    sampler, m = cfg.evaluate.samplers[0], cfg.evaluate.metric_samples
    conds = [p for p in prompts for _ in range(m)]
    cond_imgs, uncond_imgs = [], []
    for start in range(0, len(conds), 32):  # bounded batches; each holds k CFG rows + k null rows
        chunk = conds[start:start + 32]
        k = len(chunk)
        imgs = gen.sample(chunk + [[]] * k, [[]] * (2 * k), sampler, cfg.evaluate.cfg, seeds=1000 + start)
        cond_imgs += imgs[:k]
        uncond_imgs += imgs[k:]
    pred_cond = [r.tags for r in tagger.tag_images(cond_imgs)]
    pred_uncond = [r.tags for r in tagger.tag_images(uncond_imgs)]
    pred_real = [r.tags for r in tagger.tag_images(im for im, _ in reals)]
    pred_rec = [r.tags for r in tagger.tag_images(recs)]
    real_caps = [caption(meta, gen.vocab, gen.max_tags) for _, meta in reals]
    per_prompt = []
    for i, p in enumerate(prompts):
        sl = slice(i * m, (i + 1) * m)
        per_prompt.append({"prompt": ", ".join(p), "cfg": fidelity(pred_cond[sl], conds[sl]),
                           "unconditional": fidelity(pred_uncond[sl], conds[sl])})
    out = {
        "sampler": sampler.name,
        "cfg_scale": cfg.evaluate.cfg,
        "samples_per_prompt": m,
        "cfg": fidelity(pred_cond, conds),
        "unconditional": fidelity(pred_uncond, conds),
        "real": fidelity(pred_real, real_caps),
        "reconstructed": fidelity(pred_rec, real_caps),
        "per_prompt": per_prompt,
    }
    out["tag_recall_ratio"] = out["cfg"]["recall"] / max(out["real"]["recall"], 1e-9)
    return out


def render_sampler_grid(cfg: PipelineConfig, gen: Generator, rows: list[tuple[list[str], list[str], str]],
                        sampler: SamplerConfig, dst: Path) -> None:
    from tagdit.grid import render_grid

    seeds = cfg.evaluate.seeds
    imgs = gen.sample([r[0] for r in rows], [r[1] for r in rows], sampler, cfg.evaluate.cfg, seeds)
    tiles = [[imgs[j * len(rows) + i] for j in range(len(seeds))] for i in range(len(rows))]  # row i, seed j
    grid = render_grid(tiles, [r[2] for r in rows], [f"seed {s}" for s in cfg.evaluate.seeds])
    with atomic_path(dst) as tmp:
        grid.save(tmp, format="PNG")


def evaluate(cfg: PipelineConfig, shards: StageRecord, vae: StageRecord, latents: StageRecord,
             dit: StageRecord, force: bool = False) -> StageRecord:
    """Render every sampler's grid (skipping grids already rendered) and compute metrics.json."""
    import torch

    from tagdit.tagger import WDTagger
    from tagdit.training import resolve_checkpoint

    upstream = {"shards": shards, "vae": vae, "latents": latents, "dit": dit}
    if not force and (rec := EVALUATE.valid_record(cfg, upstream)):
        return rec
    torch.manual_seed(0)
    key = EVALUATE.key(cfg, upstream)
    dit_ckpt = resolve_checkpoint(dit.out_dir)
    ckpt = dit_ckpt.name
    out = EVALUATE.out_dir(cfg, upstream) / f"{ckpt}-{key[-8:]}"
    out.mkdir(parents=True, exist_ok=True)
    gen = load_generator(cfg, shards, latents, dit, vae)
    reals = val_samples(cfg.dataset_dir)
    if cfg.evaluate.prompts:
        prompts = []
        for p in cfg.evaluate.prompts:
            known, unknown = gen.vocab.parse_prompt(p)
            if unknown:
                log.warning("evaluate prompt %r: tags not in the vocabulary, ignored: %s", p, unknown)
            prompts.append(known)
    else:
        prompts = default_prompts(reals, gen.vocab, cfg.evaluate.n_prompts, gen.max_tags)
    if not prompts:
        raise ValueError("no evaluation prompts: the validation split has no tags in the vocabulary")
    neg_prompt, neg = negative_example(cfg, prompts, gen.vocab)
    rows = [(p, [], ", ".join(p)) for p in prompts]
    rows.append(([], [], "(unconditional)"))
    rows.append((neg_prompt, neg, f"{', '.join(neg_prompt)}  |  negative: {', '.join(neg)}"))
    grids = {}
    for sampler in cfg.evaluate.samplers:
        dst = out / f"grid-{sampler.name}.png"
        if force or not dst.exists():
            log.info("evaluate: rendering %s (%d steps, eta %g)", dst.name, sampler.steps, sampler.eta)
            render_sampler_grid(cfg, gen, rows, sampler, dst)
        grids[sampler.name] = str(dst)
    tagger = WDTagger.from_config(cfg.tagger)
    recs, vae_psnr = reconstruct(gen, reals)
    metrics = tag_fidelity(cfg, gen, tagger, prompts, reals, recs)
    dit_meta = json.loads((dit_ckpt / "meta.json").read_text())
    metrics.update({
        "vae_psnr_db": vae_psnr,
        "dit_val_loss": dit_meta.get("metrics", {}).get("val_loss"),
        "dit_checkpoint": ckpt,
        "prompts": [", ".join(p) for p in prompts],
        "negative_example": {"prompt": ", ".join(neg_prompt), "negative": ", ".join(neg)},
        "grids": grids,
    })
    write_json_atomic(out / "metrics.json", metrics)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(cfg.run_dir / "eval" / "tb")) as writer:
        for name, path in grids.items():
            writer.add_image(f"grid/{name}", np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")
        writer.add_scalar("eval/tag_recall_ratio", metrics["tag_recall_ratio"])
    info = {"dir": str(out), "metrics": str(out / "metrics.json"), "grids": grids,
            "tag_recall_ratio": metrics["tag_recall_ratio"], "vae_psnr_db": metrics["vae_psnr_db"],
            "recall": {k: metrics[k]["recall"] for k in ("cfg", "unconditional", "real", "reconstructed")}}
    return EVALUATE.write_stamp(cfg, upstream, [*(Path(g) for g in grids.values()), out / "metrics.json"], info)


@task(name="evaluate", cache_key_fn=stage_cache_key(EVALUATE), persist_result=True, tags=["gpu"])
def evaluate_task(cfg: PipelineConfig, shards: StageRecord, vae: StageRecord, latents: StageRecord,
                  dit: StageRecord, force: bool = False) -> StageRecord:
    """Sample grids + tag-fidelity metrics for the run's latest DiT checkpoint."""
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
    lines += ["", f"**tag_recall_ratio** (CFG / real): {m['tag_recall_ratio']:.3f} · VAE PSNR: "
              f"{m['vae_psnr_db']:.2f} dB · DiT val loss: {m['dit_val_loss']}", "", "Full-size files:"]
    lines += [f"- [{name}](file://{Path(p).resolve()})" for name, p in m["grids"].items()]
    lines.append(f"- [metrics.json](file://{Path(record.info['metrics']).resolve()})")
    return "\n".join(lines)
