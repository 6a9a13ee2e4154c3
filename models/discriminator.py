"""PatchGAN discriminator and hinge losses (latent-diffusion's autoencoder GAN, off in the original).

`PatchDiscriminator` is taming-transformers' NLayerDiscriminator (Isola et al. 2017, pix2pix): stride-2
4x4 convs, LeakyReLU 0.2, one logit per ~70x70 patch at 3 layers. GroupNorm replaces BatchNorm so
real and fake batches, per-rank batches under DDP and batch size 1 all normalise the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTIVE_MAX = 1e4  # clamp of the adaptive weight, as in taming-transformers


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] → patch logits (B, 1, H', W')."""

    def __init__(self, channels: int = 64, n_layers: int = 3, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for n in range(1, n_layers + 1):
            c_out = channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last widening conv keeps the resolution
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), _norm(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, H', W')


def _init_weights(m: nn.Module) -> None:
    """DCGAN init, as taming-transformers: conv N(0, 0.02), norm scale N(1, 0.02)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: (mean relu(1 − D(x)) + mean relu(1 + D(x̂))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's hinge loss: −mean D(x̂)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """‖∇_w L_rec‖ / (‖∇_w L_g‖ + 1e-4) at the decoder's last weight w, clamped to [0, 1e4], detached.

    Esser et al. 2021 (VQGAN), eq. 7: balances the GAN term against reconstruction at any scale.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()
