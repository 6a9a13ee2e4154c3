"""The KL-VAE objective, the original's form: every term a mean over its elements.

    L = w_l1 · mean|x − x̂| + w_perc · perceptual(x̂, x) + w_kl · mean KL(q(z|x) ‖ N(0, 1))
        [+ λ_adaptive · w_disc · (−mean D(x̂))   from `disc_start`, when a discriminator is given]

The original's weights are 10, 1 and 1e-5 with no discriminator. Averaging the KL over latent elements
(not summing it) is what keeps 1e-5 a gentle regulariser: summed, it is h·w·z times stronger.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from models.discriminator import adaptive_weight, generator_loss, hinge_d_loss
from models.vae import AutoencoderKL

log = logging.getLogger(__name__)


class VAELoss(nn.Module):
    """Generator loss `forward(...)` and, with a discriminator, its hinge loss `discriminator_loss(...)`."""

    def __init__(self, w_l1: float = 10.0, w_perc: float = 1.0, w_kl: float = 1e-5,
                 perceptual: nn.Module | None = None, discriminator: nn.Module | None = None,
                 w_disc: float = 0.5, disc_start: int | None = None):
        super().__init__()
        if w_perc > 0 and perceptual is None:
            raise ValueError("w_perc > 0 needs a perceptual module (or set w_perc = 0)")
        if (discriminator is None) != (disc_start is None):
            raise ValueError("a discriminator and disc_start come together (both or neither)")
        self.w_l1, self.w_perc, self.w_kl, self.w_disc = w_l1, w_perc, w_kl, w_disc
        self.perceptual = perceptual if w_perc > 0 else None
        self.discriminator = discriminator
        self.disc_start = disc_start

    def disc_active(self, step: int) -> bool:
        """Whether the GAN terms are on at this optimizer step."""
        return self.discriminator is not None and step >= self.disc_start

    def forward(self, x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                step: int, last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, detached logs) for images x, recon (B, 3, H, W) and posterior (B, z, h, w).

        `last_layer` is the decoder's last weight (`AutoencoderKL.last_layer`), needed only for the
        GAN's adaptive weight; without it (or without grad) the GAN term is weighted 0.
        """
        x, recon = x.float(), recon.float()
        l1 = (recon - x).abs().mean()
        kl = AutoencoderKL.kl(mean.float(), logvar.float()).mean()  # over all B·z·h·w elements
        rec = self.w_l1 * l1
        logs = {"l1": l1.detach(), "kl": kl.detach()}
        if self.perceptual is not None:
            perc = self.perceptual(recon, x)
            rec = rec + self.w_perc * perc
            logs["perceptual"] = perc.detach()
        loss = rec + self.w_kl * kl
        if self.disc_active(step):
            g_loss = generator_loss(self._frozen_logits(recon))
            weight = torch.zeros((), device=x.device)
            if last_layer is not None and torch.is_grad_enabled():
                weight = self.w_disc * adaptive_weight(rec, g_loss, last_layer)
            loss = loss + weight * g_loss
            logs |= {"g_loss": g_loss.detach(), "disc_weight": weight}
        return loss, logs

    def _frozen_logits(self, recon: torch.Tensor) -> torch.Tensor:
        """D(x̂) with gradients to x̂ only: the generator step leaves the discriminator's grads alone."""
        params = list(self.discriminator.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.discriminator(recon).float()
        finally:
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor,
                           disc: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of the discriminator on real x and detached recon; `disc`: e.g. its DDP wrapper."""
        disc = disc if disc is not None else self.discriminator
        if disc is None:
            raise RuntimeError("discriminator_loss called on a VAELoss without a discriminator")
        logits_real = disc(x.detach()).float()
        logits_fake = disc(recon.detach()).float()
        d_loss = hinge_d_loss(logits_real, logits_fake)
        logs = {"d_loss": d_loss.detach(), "logits_real": logits_real.mean().detach(),
                "logits_fake": logits_fake.mean().detach()}
        return d_loss, logs
