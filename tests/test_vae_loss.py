from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models.discriminator import PatchDiscriminator
from models.vae_loss import VAELoss
from tagdit.config import VAEConfig, load_config
from tagdit.train.vae import build_vae_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class ConstantPerceptual(nn.Module):
    """Stands in for VGG: returns a known value."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tensor(0.25)


def batch(h: int, latent: int):
    """x = 0, recon = 0.5 everywhere; posterior mean 1, logvar 0 (KL = 0.5 per element)."""
    x = torch.zeros(2, 3, h, h)
    return x, x + 0.5, torch.ones(2, 4, latent, latent), torch.zeros(2, 4, latent, latent)


@pytest.mark.parametrize("h,latent", [(16, 2), (256, 32)])
def test_every_term_is_a_mean_so_its_value_does_not_grow_with_image_size(h, latent):
    loss, logs = VAELoss(w_l1=10.0, w_perc=1.0, w_kl=1e-5, perceptual=ConstantPerceptual())(*batch(h, latent), step=0)
    assert logs["l1"].item() == pytest.approx(0.5)
    assert logs["kl"].item() == pytest.approx(0.5)  # summed over a 32x32x4 latent it would be 2048
    assert logs["perceptual"].item() == pytest.approx(0.25)
    assert loss.item() == pytest.approx(10 * 0.5 + 1 * 0.25 + 1e-5 * 0.5)


def test_kl_is_the_standard_kl_averaged_over_elements():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    x = torch.zeros(3, 3, 20, 20)
    _, logs = VAELoss(w_perc=0.0)(x, x, mean, logvar, step=0)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()  # KL(N(μ, σ²) || N(0, 1)), μ² not halved
    assert logs["kl"].item() == pytest.approx(expected.item())


def test_weights_are_validated_and_zero_perceptual_needs_no_vgg():
    with pytest.raises(ValueError, match="perceptual"):
        VAELoss(w_perc=1.0)
    assert VAELoss(w_perc=0.0, perceptual=ConstantPerceptual()).perceptual is None


def test_build_from_config_adds_the_patchgan_only_with_disc_start():
    off = build_vae_loss(VAEConfig(w_perc=0.0))
    assert off.perceptual is None and off.discriminator is None and not off.disc_active(10**9)
    on = build_vae_loss(VAEConfig(w_perc=0.0, disc_start=100, disc_channels=8, disc_layers=2, w_disc=0.25))
    assert isinstance(on.discriminator, PatchDiscriminator) and on.w_disc == 0.25
    assert not on.disc_active(99) and on.disc_active(100)


def test_seed_config_is_the_seeds_loss_without_discriminator_or_clipping():
    vae = load_config(CONFIGS / "original-256.yaml").vae
    assert (vae.w_l1, vae.w_perc, vae.w_kl, vae.disc_start) == (10.0, 1.0, 1e-5, None)
    assert vae.train.grad_clip is None  # the original's clipnorm = NULL
    demo = load_config(CONFIGS / "demo.yaml").vae
    assert demo.disc_start is None and (demo.w_l1, demo.w_kl) == (10.0, 1e-5)
