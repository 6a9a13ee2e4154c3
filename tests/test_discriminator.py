import pytest
import torch

from models.discriminator import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from models.vae import build_vae
from models.vae_loss import VAELoss
from tagdit.config import VAEModelConfig

TINY = VAEModelConfig(widths=[8, 16], blocks_per_level=1, up_blocks=1, groups=4, heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0  # confident and right
    assert generator_loss(fake).item() == pytest.approx(1 / 3)


def test_patch_discriminator_layout_matches_taming_nlayer():
    d = PatchDiscriminator(64, 3)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    assert d(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # 70x70 patches
    # bias-free middle convs with a 2-parameter-per-channel norm: the same count as taming's BatchNorm version
    convs = (3 * 64 * 16 + 64) + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + (512 * 16 + 1)
    expected = convs + 2 * (128 + 256 + 512)
    assert sum(p.numel() for p in d.parameters()) == expected


def test_adaptive_weight_is_finite_positive_and_balances_gradient_norms():
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    rec = (x @ w.T).abs().mean() * 10  # gradient norm ∝ 10
    g = (x @ w.T).mean()
    weight = adaptive_weight(rec, g, w)
    rec_grad, g_grad = torch.autograd.grad(rec, w, retain_graph=True)[0], torch.autograd.grad(g, w)[0]
    assert torch.isfinite(weight) and weight > 0 and not weight.requires_grad
    assert weight.item() == pytest.approx((rec_grad.norm() / (g_grad.norm() + 1e-4)).item(), rel=1e-5)
    flat = (w * 0).sum()  # zero generator gradient: clamped, not infinite
    assert adaptive_weight(rec, flat, w).item() <= 1e4


def test_generator_step_uses_the_gan_term_only_from_disc_start_and_leaves_d_grads_alone():
    torch.manual_seed(0)
    model, disc = build_vae(TINY), PatchDiscriminator(8, 2)
    criterion = VAELoss(w_perc=0.0, discriminator=disc, w_disc=0.5, disc_start=3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, mean, logvar = model(x)
    _, early = criterion(x, recon, mean, logvar, step=2, last_layer=model.last_layer)
    loss, logs = criterion(x, recon, mean, logvar, step=3, last_layer=model.last_layer)
    assert "g_loss" not in early and torch.isfinite(logs["disc_weight"]) and logs["disc_weight"] > 0
    loss.backward()
    assert all(p.grad is None for p in disc.parameters()) and all(p.requires_grad for p in disc.parameters())
    assert model.last_layer.grad is not None
    with pytest.raises(ValueError, match="both or neither"):
        VAELoss(w_perc=0.0, discriminator=disc)


def test_a_few_discriminator_steps_cut_its_hinge_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model, disc = build_vae(TINY), PatchDiscriminator(8, 2)
    criterion = VAELoss(w_perc=0.0, discriminator=disc, disc_start=0)
    g_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=2e-3, betas=(0.5, 0.9), weight_decay=0.0)
    x = torch.zeros(4, 3, 32, 32)
    x[:, 0, 8:24, 8:24] = 1  # a red square on black: an untrained VAE makes grey mush
    d_losses = []
    for step in range(15):
        recon, mean, logvar = model(x)
        loss, _ = criterion(x, recon, mean, logvar, step, last_layer=model.last_layer)
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
        d_loss, d_logs = criterion.discriminator_loss(x, recon)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        d_losses.append(d_loss.item())
    assert d_losses[0] == pytest.approx(1.0, abs=0.1)  # untrained: logits ≈ 0
    assert sum(d_losses[-3:]) < 0.7 * sum(d_losses[:3])
    assert d_logs["logits_real"] > d_logs["logits_fake"]
