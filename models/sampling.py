"""One sampler, generalised DDIM, plus classifier-free guidance, over a denoiser function.

As in k-diffusion, the sampler sees only a function: `eps_fn(x_t (B, C, H, W), t (B,) long) -> ε`.
Guidance and conditioning live in the wrapper that builds that function (`CFGDenoiser`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, C, H, W), t (B,) long) -> ε (B, C, H, W)
CondEpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, cond (B, ...)) -> ε
Generators = torch.Generator | Sequence[torch.Generator] | None


def ddim_timesteps(steps: int, timesteps: int = 1000) -> Tensor:
    """The seed's schedule of visited steps: round(linspace(T-1, 0, steps)), e.g. 999 … 0 (long)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in [1, {timesteps}], got {steps}")
    return torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long()


def _randn_like(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like x, from `generator` (on its own device, so a seed means the
    same numbers). A sequence of k generators splits the batch into k equal chunks, each drawn from
    its own generator: k seeds sampled in one batch get exactly the noise of k separate runs."""
    gens = list(generator) if isinstance(generator, Sequence) else [generator]
    if x.shape[0] % len(gens):
        raise ValueError(f"batch {x.shape[0]} does not split into {len(gens)} equal per-generator chunks")
    shape = (x.shape[0] // len(gens), *x.shape[1:])
    chunks = [torch.randn(shape, generator=g, device=g.device if g is not None else x.device, dtype=torch.float32)
              for g in gens]
    return torch.cat([c.to(x) for c in chunks])


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn,
    x: Tensor,
    alpha_bar: Tensor,
    steps: int = 50,
    eta: float = 0.0,
    generator: Generators = None,
    progress: bool = False,
) -> Tensor:
    """Generalised DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

    From x = x_T, for consecutive visited steps t > s (s after the last step: ᾱ_s = 1), eq. 12:
        x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t                                   (no clipping)
        x_s = √ᾱ_s x̂_0 + √(1 - ᾱ_s - σ²) ε + σ z,  z ~ N(0, I)
    with eq. 16: σ = eta · √((1-ᾱ_s)/(1-ᾱ_t)) · √(1 - ᾱ_t/ᾱ_s).
    eta = 0 is the deterministic DDIM; eta = 1 is DDPM's ancestral sampler (σ² = β̃, the posterior
    variance) on the visited steps. Noise is drawn from `generator`, so a seed reproduces the samples
    (a list of generators: one per equal chunk of the batch, see `_randn_like`).
    """
    ab = alpha_bar.double().cpu()
    ts = ddim_timesteps(steps, len(ab))
    x = x.float()
    for i in tqdm(range(len(ts)), desc="sampling", disable=not progress, leave=False):
        t = int(ts[i])
        a_t = float(ab[t])
        a_s = float(ab[int(ts[i + 1])]) if i + 1 < len(ts) else 1.0
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).float()
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # (B, C, H, W)
        sigma = eta * ((1 - a_s) / (1 - a_t)) ** 0.5 * max(1 - a_t / a_s, 0.0) ** 0.5
        x = a_s**0.5 * x0 + max(1 - a_s - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
    return x


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): ε = ε_neg + s · (ε_cond - ε_neg).

    ε_neg is the prediction for the negative prompt, or for the null condition when there is none.
    Both branches run in ONE forward over the doubled batch [neg; cond]. `cond`/`neg` are whatever
    `model(x_t, t, cond)` takes (tag ids, or precomputed tag embeddings), batch 1 or B.
    """

    def __init__(self, model: CondEpsFn, cond: Tensor, neg: Tensor, scale: float):
        self.model, self.scale = model, float(scale)
        self.cond, self.neg = cond, neg

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        cond = self.cond.expand(B, *self.cond.shape[1:])
        if self.scale == 1.0:  # s = 1 is the conditional model alone
            return self.model(x, t, cond)
        neg = self.neg.expand(B, *self.neg.shape[1:])
        eps = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg, cond]))  # (2B, C, H, W)
        eps_neg, eps_cond = eps.chunk(2)
        return eps_neg + self.scale * (eps_cond - eps_neg)


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    tags: Tensor,
    neg_tags: Tensor,
    *,
    alpha_bar: Tensor,
    shape: tuple[int, ...],
    steps: int = 50,
    eta: float = 0.0,
    scale: float = 4.0,
    generator: Generators = None,
    progress: bool = False,
) -> Tensor:
    """x_T ~ N(0, I) of `shape` -> guided DDIM samples (scaled latents), for a DiT with `encode_tags`.

    The tag embeddings are computed once (they do not depend on x_t or t) and reused every step.
    """
    device = next(model.parameters()).device
    y = model.encode_tags(torch.cat([neg_tags, tags]).to(device))  # (2 or 2B, W)
    y_neg, y_cond = y.split([len(neg_tags), len(tags)])
    denoiser = CFGDenoiser(model.forward_with_cond, y_cond, y_neg, scale)
    x_T = _randn_like(torch.empty(shape, device=device), generator)
    return sample_ddim(denoiser, x_T, alpha_bar, steps=steps, eta=eta, generator=generator, progress=progress)
