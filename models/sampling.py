"""Samplers over a denoiser function (DDIM, DPM-Solver++(2M)), classifier-free guidance, and the
entry points that run them on a DiT: text-to-image, from precomputed embeddings, and img2img.

As in k-diffusion, a sampler sees only a function: `eps_fn(x_t (B, C, H, W), t (B,) long) -> ε`.
Guidance and conditioning live in the wrapper that builds that function (`CFGDenoiser`). Every
sampler has one signature, `(eps_fn, x, alpha_bar, steps, eta, generator, progress, t_start, callback)`,
and `SAMPLERS` names them for configs. `callback(i, n)` hears of each step (a `StepCallback`); an
exception it raises stops the sampling there (the sampling page's cancel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from models.diffusion import q_sample

EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, C, H, W), t (B,) long) -> ε (B, C, H, W)
CondEpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, cond (B, ...)) -> ε
Generators = torch.Generator | Sequence[torch.Generator] | None
StepCallback = Callable[[int, int], None]  # (i, n): called with 0 before the first of n steps, i after step i


def _start(t_start: int | None, timesteps: int) -> int:
    """The step the sampler's input sits at: t_start, or T-1 (pure noise) when None."""
    t = timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= t < timesteps:
        raise ValueError(f"t_start must be in [0, {timesteps - 1}], got {t}")
    return t


def ddim_timesteps(steps: int, timesteps: int = 1000, t_start: int | None = None) -> Tensor:
    """The original's schedule of visited steps: linspace(t_start, 0, steps) truncated to integers,
    e.g. 999, 978, 958, …, 0 for 50 steps (long). Computed exactly: ⌊t_start·(n-1-i) / (n-1)⌋.

    t_start (default T-1) is where the input sits, e.g. a noised image for img2img."""
    t0 = _start(t_start, timesteps)
    if not 1 <= steps <= t0 + 1:
        raise ValueError(f"steps must be in [1, {t0 + 1}], got {steps}")
    if steps == 1:
        return torch.tensor([t0])
    i = torch.arange(steps)
    return (t0 * (steps - 1 - i)) // (steps - 1)


def dpm_timesteps(steps: int, timesteps: int = 1000, t_start: int | None = None) -> Tensor:
    """diffusers' "linspace" spacing: round(linspace(0, t_start, steps + 1)) descending without the
    final 0, e.g. 999, 949, …, 50 for 20 steps; the sampler's last step goes from there to ᾱ = 1."""
    t0 = _start(t_start, timesteps)
    if not 1 <= steps <= max(t0, 1):
        raise ValueError(f"steps must be in [1, {max(t0, 1)}], got {steps}")
    return (torch.arange(steps + 1, dtype=torch.float64) * t0 / steps).round().long().flip(0)[:-1]


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


def _report(callback: StepCallback | None, i: int, n: int) -> None:
    """Tell the caller that i of n steps are done (it may raise to stop the sampling)."""
    if callback is not None:
        callback(i, n)


def _full(t: int, x: Tensor) -> Tensor:
    """Timestep t for every sample of x, (B,) long."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn,
    x: Tensor,
    alpha_bar: Tensor,
    steps: int = 50,
    eta: float = 0.0,
    generator: Generators = None,
    progress: bool = False,
    t_start: int | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Generalised DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

    From x = x_{t_start} (default x_T), over `ddim_timesteps`, for consecutive visited steps t > s
    (s after the last step: ᾱ_s = 1), eq. 12:
        x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t                                   (no clipping)
        x_s = √ᾱ_s x̂_0 + √(1 - ᾱ_s - σ²) ε + σ z,  z ~ N(0, I)
    with eq. 16: σ = eta · √((1-ᾱ_s)/(1-ᾱ_t)) · √(1 - ᾱ_t/ᾱ_s).
    eta = 0 is the deterministic DDIM; eta = 1 is DDPM's ancestral sampler (σ² = β̃, the posterior
    variance) on the visited steps. Noise is drawn from `generator`, so a seed reproduces the samples
    (a list of generators: one per equal chunk of the batch, see `_randn_like`).
    """
    ab = alpha_bar.double().cpu()
    ts = ddim_timesteps(steps, len(ab), t_start)
    x = x.float()
    _report(callback, 0, len(ts))
    for i in tqdm(range(len(ts)), desc="sampling", disable=not progress, leave=False):
        t = int(ts[i])
        a_t = float(ab[t])
        a_s = float(ab[int(ts[i + 1])]) if i + 1 < len(ts) else 1.0
        eps = eps_fn(x, _full(t, x)).float()
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # (B, C, H, W)
        sigma = eta * ((1 - a_s) / (1 - a_t)) ** 0.5 * max(1 - a_t / a_s, 0.0) ** 0.5
        x = a_s**0.5 * x0 + max(1 - a_s - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
        _report(callback, i + 1, len(ts))
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    eps_fn: EpsFn,
    x: Tensor,
    alpha_bar: Tensor,
    steps: int = 20,
    eta: float = 0.0,
    generator: Generators = None,
    progress: bool = False,
    t_start: int | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, second order, in
    data-prediction form, on the discrete ᾱ with α_t = √ᾱ_t, σ_t = √(1-ᾱ_t), λ_t = log(α_t/σ_t).

    Over `dpm_timesteps` t_0 > t_1 > …, with x̂_0,i = (x_{t_i} - σ ε)/α and h_i = λ_{t_i} - λ_{t_{i-1}}:
        D_i = (1 + 1/(2r_i)) x̂_0,i-1 - 1/(2r_i) x̂_0,i-2,   r_i = h_{i-1}/h_i
        x_{t_i} = (σ_{t_i}/σ_{t_{i-1}}) x_{t_{i-1}} - α_{t_i} (e^{-h_i} - 1) D_i
    The first step is first order (D = x̂_0, i.e. DDIM), and so is the last one, to ᾱ = 1 (σ = 0,
    λ = ∞): it returns x̂_0, as diffusers' DPMSolverMultistepScheduler does with final sigma 0.
    Deterministic: `eta` must be 0 and `generator` is unused (both kept for the common signature).
    """
    if eta != 0:
        raise ValueError(f"DPM-Solver++(2M) is deterministic: eta must be 0, got {eta}")
    ab = alpha_bar.double().cpu()
    ts = dpm_timesteps(steps, len(ab), t_start)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = (alpha / sigma).log()  # (T,) λ_t, decreasing in t
    x = x.float()
    x0_prev, h_prev = None, None
    _report(callback, 0, len(ts))
    for i in tqdm(range(len(ts)), desc="sampling", disable=not progress, leave=False):
        t = int(ts[i])
        eps = eps_fn(x, _full(t, x)).float()
        x0 = (x - float(sigma[t]) * eps) / float(alpha[t])  # (B, C, H, W)
        _report(callback, i + 1, len(ts))
        if i + 1 == len(ts):
            return x0
        s = int(ts[i + 1])
        h = float(lam[s] - lam[t])
        d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
        x = float(sigma[s] / sigma[t]) * x - float(alpha[s]) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


Sampler = Callable[..., Tensor]  # the signature of `sample_ddim`
SAMPLERS: dict[str, Sampler] = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


def get_sampler(name: str) -> Sampler:
    """A sampler function by its config name ("ddim", "dpmpp_2m")."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[name]


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
def encode_prompts(model: torch.nn.Module, tags: Tensor, neg_tags: Tensor) -> tuple[Tensor, Tensor]:
    """Tag ids (B, L) and negative ids (1 or B, L) -> their embeddings (y_cond (B, W), y_neg), in one pass."""
    device = next(model.parameters()).device
    y = model.encode_tags(torch.cat([neg_tags, tags]).to(device))  # (1+B or 2B, W)
    y_neg, y_cond = y.split([len(neg_tags), len(tags)])
    return y_cond, y_neg


@torch.no_grad()
def sample_from_embeddings(
    model: torch.nn.Module,
    x: Tensor,
    y_cond: Tensor,
    y_neg: Tensor,
    *,
    alpha_bar: Tensor,
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    scale: float = 4.0,
    generator: Generators = None,
    progress: bool = False,
    t_start: int | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """x = x_{t_start} (B, C, H, W) (default: x_T) -> guided samples (scaled latents), given tag
    embeddings y_cond (B or 1, W) and y_neg (B or 1, W), e.g. blended ones for an interpolation."""
    device = next(model.parameters()).device
    denoiser = CFGDenoiser(model.forward_with_cond, y_cond.to(device), y_neg.to(device), scale)
    return get_sampler(sampler)(denoiser, x.to(device), alpha_bar, steps=steps, eta=eta, generator=generator,
                                progress=progress, t_start=t_start, callback=callback)


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    tags: Tensor,
    neg_tags: Tensor,
    *,
    alpha_bar: Tensor,
    shape: tuple[int, ...],
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    scale: float = 4.0,
    generator: Generators = None,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """x_T ~ N(0, I) of `shape` -> guided samples (scaled latents), for a DiT with `encode_tags`.

    The tag embeddings are computed once (they do not depend on x_t or t) and reused every step.
    """
    y_cond, y_neg = encode_prompts(model, tags, neg_tags)
    x_T = _randn_like(torch.empty(shape, device=y_cond.device), generator)
    return sample_from_embeddings(model, x_T, y_cond, y_neg, alpha_bar=alpha_bar, steps=steps, sampler=sampler,
                                  eta=eta, scale=scale, generator=generator, progress=progress, callback=callback)


@torch.no_grad()
def img2img_latents(
    model: torch.nn.Module,
    z0: Tensor,
    tags: Tensor,
    neg_tags: Tensor,
    *,
    strength: float,
    alpha_bar: Tensor,
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    scale: float = 4.0,
    generator: Generators = None,
    progress: bool = False,
    shorten: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Encoded latents z0 (B, C, H, W, already scaled) -> guided samples that keep their layout
    (SDEdit, Meng et al. 2022): noise z0 to t0 = ⌊S·T - 1⌋ (the original's start) with q_sample, then
    sample from there.

    As the original, the sampler runs all `steps` over [t0, 0] (at most one per timestep);
    `shorten=True` runs ⌈S·steps⌉ of them instead (diffusers' convention: cost grows with S).
    S = 0 returns z0 unchanged; S = 1 starts from pure noise and is exactly `sample_latents` for the
    same seed (the original noises z0 to t = T-1, whose signal ᾱ_{T-1} is negligible).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return z0.clone()
    T = len(alpha_bar)
    t_start = max(int(strength * T - 1), 0)
    y_cond, y_neg = encode_prompts(model, tags, neg_tags)
    z0 = z0.to(y_cond.device).float()
    eps = _randn_like(z0, generator)  # (B, C, H, W)
    x = eps if strength == 1.0 else q_sample(z0, _full(t_start, z0), eps, alpha_bar)
    most = t_start + 1 if sampler == "ddim" else max(t_start, 1)  # distinct timesteps in [t0, 0]
    n = min(math.ceil(strength * steps) if shorten else steps, most)
    return sample_from_embeddings(model, x, y_cond, y_neg, alpha_bar=alpha_bar, steps=n, sampler=sampler, eta=eta,
                                  scale=scale, generator=generator, progress=progress, t_start=t_start,
                                  callback=callback)
