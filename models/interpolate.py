"""Interpolation between two samples: spherical interpolation of their starting noise and linear
blending of their prompts' tag embeddings, sampled as one batch of frames."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from models.sampling import encode_prompts, sample_from_embeddings


def slerp(a: Tensor, b: Tensor, t: float, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation between a and b (same shape, each taken as one vector), t in [0, 1].

    Gaussian noise in many dimensions lives near a sphere of radius √D; a straight line between two
    draws cuts inside it (at t = 0.5 its norm drops by ~√2), which the model has never seen. When
    a and b are near-parallel (|cos| > dot_threshold) the arc is a line and lerp is used instead.
    """
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-30)
    if cos.abs() > dot_threshold:
        out = (1 - t) * a64 + t * b64
    else:
        omega = torch.arccos(cos.clamp(-1, 1))
        out = (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / torch.sin(omega)
    return out.view(a.shape).to(a.dtype)


def seed_noise(seed: int, shape: Sequence[int]) -> Tensor:
    """x_T for one seed, float32 on CPU: the noise `sample_latents` draws for that seed at batch 1."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def slerp_noise(seed_a: int, seed_b: int, frames: int, shape: Sequence[int]) -> Tensor:
    """`frames` noise tensors (frames, *shape) on the arc from seed_a's noise to seed_b's, ends included."""
    a, b = seed_noise(seed_a, shape), seed_noise(seed_b, shape)
    return torch.stack([slerp(a, b, float(t)) for t in frame_weights(frames)])


def frame_weights(frames: int) -> Tensor:
    """Interpolation weights 0 … 1 for `frames` frames (frames,), float64."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    return torch.linspace(0, 1, frames, dtype=torch.float64) if frames > 1 else torch.zeros(1, dtype=torch.float64)


def blend_embeddings(y_a: Tensor, y_b: Tensor, weights: Tensor | Sequence[float]) -> Tensor:
    """(1 - w) · y_a + w · y_b for each weight w: tag embeddings (1, W) or (W,) -> (K, W)."""
    w = torch.as_tensor(weights, dtype=torch.float64, device=y_a.device).view(-1, 1)  # (K, 1)
    y = (1 - w) * y_a.reshape(1, -1).double() + w * y_b.reshape(1, -1).double()  # (K, W)
    return y.to(y_a.dtype)


@torch.no_grad()
def interpolation_latents(
    model: torch.nn.Module,
    tags_a: Tensor,
    tags_b: Tensor,
    neg_tags: Tensor,
    *,
    seeds: tuple[int, int],
    frames: int,
    latent_shape: Sequence[int],
    alpha_bar: Tensor,
    steps: int = 50,
    sampler: str = "ddim",
    scale: float = 4.0,
    progress: bool = False,
) -> Tensor:
    """Frames (frames, C, H, W) from prompt a with seeds[0] to prompt b with seeds[1]: noise slerped,
    tag embeddings blended with the same weights; deterministic samplers only (eta = 0)."""
    y_a, y_neg = encode_prompts(model, tags_a.view(1, -1), neg_tags.view(1, -1))  # (1, W) each
    y_b, _ = encode_prompts(model, tags_b.view(1, -1), neg_tags.view(1, -1))
    w = frame_weights(frames)
    y = blend_embeddings(y_a, y_b, w)  # (frames, W)
    x_T = slerp_noise(seeds[0], seeds[1], frames, latent_shape)  # (frames, C, H, W)
    return sample_from_embeddings(model, x_T, y, y_neg, alpha_bar=alpha_bar, steps=steps, sampler=sampler,
                                  scale=scale, progress=progress)
