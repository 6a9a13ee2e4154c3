"""A trained DiT or VAE rebuilt from its checkpoint folder (the config stored beside the weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.dit import DiT, build_dit
from models.vae import AutoencoderKL, build_vae
from tagdit.formats.checkpoints import load_model_weights


def load_dit(ckpt_dir_or_run_dir: str | Path, ema: bool = True, map_location: str | torch.device = "cpu", *,
             schedule: str | None = None, timesteps: int | None = None) -> DiT:
    """Rebuild a DiT from a checkpoint dir (`ckpt-NNNNNNN/`) or a run dir (its `latest`), in eval mode.

    Sample with its `alpha_bar` (the schedule it was trained with); `schedule`/`timesteps` are the
    fallback for old checkpoints that do not record one (see `build_dit`).
    """
    state, config, _ = load_model_weights(Path(ckpt_dir_or_run_dir), ema=ema)
    model = build_dit(config, schedule, timesteps)
    model.load_state_dict(state)
    return model.to(map_location).eval()


def load_vae(ckpt_dir_or_run_dir: str | Path, ema: bool = True) -> tuple[AutoencoderKL, Path]:
    """Rebuild a trained VAE from a checkpoint (or a run dir's `latest`) in eval mode, on CPU."""
    state, config, ckpt_dir = load_model_weights(Path(ckpt_dir_or_run_dir), ema=ema)
    model = build_vae(config)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False), ckpt_dir
