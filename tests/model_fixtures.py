"""Tiny model configs shared by the model tests, and a seeded DiT whose zero init is broken."""

from __future__ import annotations

import json

import torch
from pydantic import BaseModel

from models.dit import DiT
from tagdit.config import DiTModelConfig, VAEModelConfig

TINY_DIT = DiTModelConfig(width=32, depth=2, heads=2, tag_heads=2, mlp_ratio=2.0, dropout=0.0, max_tags=4)
TINY_VAE = VAEModelConfig(widths=[8, 16, 16], blocks_per_level=1, groups=4)


def as_override(key: str, cfg: BaseModel) -> str:
    """A model config as one `--set key={...}` override (JSON is YAML), e.g. for `vae.model`."""
    return f"{key}={json.dumps(cfg.model_dump(exclude_unset=True))}"


def random_dit() -> DiT:
    """`TINY_DIT` (vocab 10, 8 x 8 latents), seeded, with N(0, 0.05²) added to every weight; eval mode."""
    torch.manual_seed(0)
    model = DiT(TINY_DIT, vocab_size=10, latent_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()
