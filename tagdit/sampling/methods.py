"""The sampler names people choose from, and the SamplerConfig each stands for.

One vocabulary in the command line, the run forms and the sampling page: `ddim` (generalised
DDIM, eta 0 by default), `ddpm` (DDIM with eta 1, the original's DDPM sampler) and `dpmpp_2m`
(DPM-Solver++(2M), deterministic).
"""

from __future__ import annotations

from typing import Literal

from tagdit.config import SamplerConfig

SamplerName = Literal["ddim", "ddpm", "dpmpp_2m"]


def sampler_method(kind: SamplerName, steps: int, eta: float | None = None, name: str = "") -> SamplerConfig:
    """The SamplerConfig a sampler name stands for; `eta` (ddim only) defaults to 0."""
    if kind != "ddim" and eta not in (None, 0.0):
        raise ValueError(f"eta={eta} applies to the ddim sampler only; {kind} fixes its own")
    eta = 1.0 if kind == "ddpm" else (eta or 0.0)
    return SamplerConfig(name=name or f"{kind}{steps}", sampler="dpmpp_2m" if kind == "dpmpp_2m" else "ddim",
                         steps=steps, eta=eta)


def sampler_name(method: SamplerConfig) -> SamplerName:
    """The name people use for a SamplerConfig (DDIM with eta 1 is `ddpm`)."""
    return "ddpm" if method.sampler == "ddim" and method.eta == 1.0 else method.sampler
