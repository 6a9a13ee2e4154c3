"""Optimiser, learning-rate schedule (linear warm-up, cosine decay) and the EMA of the weights."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tagdit.config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norm scales (params with ndim < 2)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=True)  # fused: CPU too (~4x faster step)


def lr_factor(step: int, warmup: int, total: int, kind: str = "linear") -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`.

    `kind="none"` is what the original's Keras `CosineDecay(warmup_steps=W)` without a
    `warmup_target` does: no warm-up, the peak from step 0, cosine decay to 0 at `total - W`, then 0.
    """
    if kind == "none":
        progress = min(1.0, step / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a per-step LambdaLR."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.warmup)
    )


class EMA:
    """Exponential moving average of a model's parameters and buffers (torch's AveragedModel)."""

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
