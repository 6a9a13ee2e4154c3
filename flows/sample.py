"""sample: prompt (+ negative prompt) -> a row of generated images from the trained DiT.

    python -m flows.sample --prompt "blue hair, smile" --negative "hat" --cfg 4 --steps 50 --eta 0 \
        --seed 0 --n 4 --out out.png [--config configs/demo.yaml --set k=v] [--checkpoint DIR]

The checkpoint defaults to the run's latest EMA weights (`<run>/dit/latest`). Tags the vocabulary
does not know are reported and encoded as <unk> (as in training), never silently dropped.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from prefect import flow

from tagdit.cli import config_parser, parse_config
from tagdit.config import PipelineConfig, load_config

log = logging.getLogger(__name__)


def prompt_ids(vocab: Any, text: str, max_tags: int) -> tuple[list[int], list[str]]:
    """Token ids of a prompt and the tags it holds that the vocabulary does not know."""
    known, unknown = vocab.parse_prompt(text)
    if len(known) + len(unknown) > max_tags:
        log.warning("prompt %r has %d tags; the model reads the first %d", text, len(known) + len(unknown), max_tags)
    return vocab.encode(known + unknown, max_tags), unknown


def sample_images(
    cfg: PipelineConfig,
    prompt: str,
    negative: str = "",
    *,
    scale: float = 4.0,
    steps: int = 50,
    eta: float = 0.0,
    sampler: str = "ddim",
    seed: int = 0,
    n: int = 4,
    out: str | Path = "out.png",
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Generate `n` images for one prompt, write them as one captioned row to `out`."""
    import torch

    from models.sampling import sample_latents
    from tagdit.grid import render_grid
    from tagdit.painter import painter_for_run
    from tagdit.train.devices import autocast

    painter = painter_for_run(cfg, checkpoint)
    ckpt = painter.checkpoint
    cond, unknown = prompt_ids(painter.vocab, prompt, painter.max_tags)
    neg, neg_unknown = prompt_ids(painter.vocab, negative, painter.max_tags)
    for text, bad in ((prompt, unknown), (negative, neg_unknown)):
        if bad:
            log.warning("tags not in the vocabulary (encoded as <unk>) in %r: %s", text, ", ".join(bad))
    generator = torch.Generator(device=painter.device).manual_seed(seed)
    with autocast(painter.device):
        z = sample_latents(painter.dit, torch.tensor([cond]), torch.tensor([neg]), alpha_bar=painter.dit.alpha_bar,
                           shape=(n, *painter.stats.latent_shape), steps=steps, eta=eta, scale=scale,
                           generator=generator, sampler=sampler, progress=True)
        images = painter.decode(z)
    caption = prompt + (f" | negative: {negative}" if negative else "") + f" | cfg {scale}, {sampler} {steps} steps, eta {eta}, seed {seed}"
    grid = render_grid([images], [caption], [f"#{i}" for i in range(n)])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    log.info("wrote %s (%d images, checkpoint %s)", out, n, ckpt)
    return {"out": str(out), "checkpoint": str(ckpt), "unknown_tags": unknown + neg_unknown}


@flow(name="sample")
def sample_flow(prompt: str, negative: str = "", cfg_scale: float = 4.0, steps: int = 50, eta: float = 0.0,
                sampler: str = "ddim", seed: int = 0, n: int = 4, out: str = "out.png", checkpoint: str | None = None,
                config: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Deployment entry: the same as the command line."""
    return sample_images(load_config(config, overrides), prompt, negative, scale=cfg_scale, steps=steps, eta=eta,
                         sampler=sampler, seed=seed, n=n, out=out, checkpoint=checkpoint)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p: argparse.ArgumentParser = config_parser("Sample images for a tag prompt from the trained DiT.")
    p.add_argument("--prompt", required=True, help='comma-separated tags, e.g. "blue hair, smile"')
    p.add_argument("--negative", default="", help="negative prompt (replaces the null condition in CFG)")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale s")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0, help="ddim only: 0 = DDIM, 1 = DDPM-like")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "dpmpp_2m"], help="dpmpp_2m: DPM-Solver++(2M), ~20 steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4, help="number of images")
    p.add_argument("--out", default="out.png")
    p.add_argument("--checkpoint", default=None, help="checkpoint or run dir (default: <run>/dit latest EMA)")
    a = p.parse_args(argv)
    cfg = parse_config(a)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return sample_images(cfg, a.prompt, a.negative, scale=a.cfg, steps=a.steps, eta=a.eta, sampler=a.sampler,
                         seed=a.seed, n=a.n, out=a.out, checkpoint=a.checkpoint)


if __name__ == "__main__":
    main()
