"""Discrete-time Gaussian diffusion (Ho et al. 2020, "DDPM"): noise schedules as pure functions of
T, the forward process q(x_t | x_0) and the ε-prediction loss L_simple.

A schedule is the vector ᾱ_t (alpha_bar, float64, index t = 0 … T-1); samplers need nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def cosine_alpha_bar(timesteps: int = 1000, start: float = 0.999, end: float = 0.001) -> Tensor:
    """The original's cosine schedule: ᾱ_t = cos²(φ_t), φ linear in t from acos(√start) to acos(√end).

    Like Nichol & Dhariwal 2021 (improved DDPM) but clamped so ᾱ runs from ≈0.999 down to exactly
    0.001 at t = T-1 (1/√ᾱ stays finite when sampling): φ_t = φ_0 + (t+1)/T · (φ_end - φ_0).
    """
    phi_start, phi_end = math.acos(math.sqrt(start)), math.acos(math.sqrt(end))
    x = torch.arange(1, timesteps + 1, dtype=torch.float64)
    return torch.cos(phi_start + x / timesteps * (phi_end - phi_start)) ** 2  # (T,)


def linear_alpha_bar(timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """The original's linear schedule: β linear from beta_start to beta_end (scaled by 1000/T), ᾱ = ∏(1-β)."""
    scale = 1000 / timesteps
    betas = torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)  # (T,)


SCHEDULES: dict[str, Callable[[int], Tensor]] = {"cosine": cosine_alpha_bar, "linear": linear_alpha_bar}


def make_alpha_bar(schedule: str, timesteps: int) -> Tensor:
    """ᾱ (T,) float64 for a schedule name from the config."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[schedule](timesteps)


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] per sample (computed in float64), cast and shaped to broadcast over `like` (B, ...)."""
    v = values.to(device=t.device)[t].to(like.dtype)  # (B,)
    return v.view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: Tensor, t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """x_t = √ᾱ_t · x_0 + √(1 - ᾱ_t) · ε  (DDPM eq. 4)."""
    signal = _gather(alpha_bar.sqrt(), t, x0)  # (B, 1, 1, 1)
    noise = _gather((1 - alpha_bar).sqrt(), t, x0)
    return signal * x0 + noise * eps


def eps_loss(eps_pred: Tensor, eps: Tensor, weight: Tensor | None = None) -> Tensor:
    """L_simple = E‖ε - ε_θ(x_t, t)‖² (DDPM eq. 14), the mean over every element, in fp32;
    `weight` (B,) scales each sample's mean (e.g. `min_snr_weight`)."""
    sq = (eps_pred.float() - eps.float()) ** 2
    if weight is None:
        return torch.mean(sq)
    return torch.mean(sq.flatten(1).mean(1) * weight)


def min_snr_weight(t: Tensor, alpha_bar: Tensor, gamma: float) -> Tensor:
    """Min-SNR-γ weights for ε-prediction (Hang et al. 2023): min(SNR_t, γ) / SNR_t, (B,).

    SNR_t = ᾱ_t / (1 - ᾱ_t). Low-noise steps (SNR > γ), which are easy and dominate L_simple's
    gradients, are down-weighted; the paper reports ~3x faster convergence with γ = 5."""
    ab = alpha_bar[t].float()
    snr = ab / (1 - ab)
    return torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))  # no 0/0 where ᾱ_t = 0
