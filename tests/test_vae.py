import pytest
import torch

import models.vae as vae_mod
from models.vae import AttnBlock, AutoencoderKL, ResBlock, build_vae
from models.vae_loss import VAELoss
from tagdit.config import VAE_PRESETS, VAEModelConfig
from tagdit.formats.checkpoints import count_parameters
from tagdit.formats.trained_models import load_vae
from tests.model_fixtures import TINY_VAE
from tests.numerics import assert_close_to_scale

TINY = VAEModelConfig(widths=[8, 16, 16], blocks_per_level=1, up_blocks=1, groups=4, heads=2)
ORIGINAL_PARAMETERS = 32_591_703  # the original's KL-VAE, counted from its layer list below

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def _rb(c_in: int, c_out: int) -> int:
    """GroupNorm·swish·conv3 twice, 1x1 skip where widths differ."""
    skip = _conv(c_in, c_out, 1) if c_in != c_out else 0
    return 2 * c_in + _conv(c_in, c_out, 3) + 2 * c_out + _conv(c_out, c_out, 3) + skip


def _attn(c: int) -> int:
    """GroupNorm + Keras MultiHeadAttention: q, k, v and output projections with biases (any head count)."""
    return 2 * c + 4 * (c * c + c)


def seed_parameter_count(z: int = 4) -> int:
    """The original project's AutoEncoder/architecture.R, layer by layer (widths 80/160/320)."""
    encoder = (_conv(3, 80, 3) + 2 * _rb(80, 80) + _conv(80, 80, 3)
               + _rb(80, 160) + _rb(160, 160) + _conv(160, 160, 3)
               + _rb(160, 320) + _rb(320, 320) + _conv(320, 320, 3)
               + 2 * _rb(320, 320)
               + _rb(320, 320) + _attn(320) + _rb(320, 320)
               + 2 * 320 + _conv(320, 2 * z, 3) + _conv(2 * z, 2 * z, 1))
    decoder = (_conv(z, z, 1) + _conv(z, 320, 3)
               + _rb(320, 320) + _attn(320) + _rb(320, 320)
               + 2 * _rb(320, 320) + _rb(320, 320) + _conv(320, 320, 3)
               + 2 * _rb(320, 320) + _rb(320, 320) + _conv(320, 320, 3)
               + _rb(320, 160) + _rb(160, 160) + _rb(160, 160) + _conv(160, 160, 3)
               + _rb(160, 80) + _rb(80, 80)
               + 2 * 80 + _conv(80, 3, 3))
    return encoder + decoder


@pytest.mark.parametrize("h,w", [(16, 16), (32, 32), (48, 48), (16, 40)])
def test_latents_are_image_size_over_8_with_z_channels(h, w):
    model = build_vae(TINY)
    x = torch.rand(2, 3, h, w) * 2 - 1
    mean, logvar = model.encode(x)
    assert model.downsample_factor == 8
    assert mean.shape == logvar.shape == (2, TINY.z_channels, h // 8, w // 8)
    recon = model.decode(model.sample(mean, logvar))
    assert recon.shape == x.shape and recon.abs().max() <= 1  # tanh output


def test_seed_preset_has_three_downsamplings_and_attention():
    model = build_vae(VAE_PRESETS["original"])
    assert model.downsample_factor == 8
    attn = [m for m in model.modules() if isinstance(m, AttnBlock)]
    assert len(attn) == 2 and all(a.heads == 8 for a in attn)  # encoder + decoder bottleneck
    assert sum(isinstance(m, ResBlock) for m in model.encoder.modules()) == 3 * 2 + 2 + 2
    assert sum(isinstance(m, ResBlock) for m in model.decoder.modules()) == 2 + 3 * 3 + 2


def test_seed_preset_parameter_count_matches_the_original_layer_list():
    expected = seed_parameter_count()
    assert expected == ORIGINAL_PARAMETERS
    assert abs(count_parameters(build_vae(VAE_PRESETS["original"])) - expected) <= 0.01 * expected


def test_demo_preset_builds_at_f4_with_the_same_layout():
    model = build_vae(VAE_PRESETS["demo"])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    recon, mean, _ = model(x)
    assert model.downsample_factor == 4 and mean.shape == (2, 4, 16, 16) and recon.shape == x.shape
    assert count_parameters(model) < 1e6


def test_checkpoint_config_round_trip_rebuilds_the_same_model(tmp_path):
    from tagdit.formats.checkpoints import save_weights

    torch.manual_seed(0)
    model = build_vae(TINY).eval()
    ckpt = tmp_path / "ckpt-0000001"
    ckpt.mkdir()
    save_weights(ckpt / "ema.safetensors", model.state_dict(), TINY.model_dump(mode="json"))
    (ckpt / "meta.json").write_text('{"step": 1}')
    loaded, where = load_vae(ckpt)
    assert where == ckpt and loaded.cfg == TINY
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded(x, sample=False)[0], model(x, sample=False)[0])


def test_encode_rejects_sizes_not_divisible_by_f():
    with pytest.raises(ValueError, match="divisible"):
        build_vae(TINY).encode(torch.zeros(1, 3, 20, 20))


def test_kl_is_per_element_zero_for_standard_normal_and_positive_otherwise():
    zeros = torch.zeros(3, 4, 2, 2)
    assert torch.equal(AutoencoderKL.kl(zeros, zeros), zeros)
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    kl = AutoencoderKL.kl(mean, logvar)
    assert kl.shape == (3, 4, 2, 2) and (kl > 0).all()
    # closed form for one element: KL(N(1, e) || N(0, 1)) = (1 + e - 1 - 1) / 2
    one = torch.ones(1, 1, 1, 1)
    assert AutoencoderKL.kl(one, one).item() == pytest.approx((torch.e - 1) / 2)


def test_a_few_dozen_steps_cut_the_loss_sharply_and_use_the_latent():
    torch.manual_seed(0)
    model = build_vae(TINY)
    x = torch.zeros(4, 3, 32, 32)
    x[0, 0, 8:24, 8:24] = 1  # red square
    x[1, 2, :, 16:] = 0.8  # blue half
    x[2] = torch.linspace(-1, 1, 32)  # gradient
    x[3, 1, ::4] = -0.5  # stripes
    criterion = VAELoss(w_l1=10.0, w_perc=0.0, w_kl=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(80):
        loss, _ = criterion(x, *model(x), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    with torch.no_grad():
        recon, _, _ = model(x, sample=False)
    ignore_latent = (x - x.median(0).values).abs().mean()  # best L1 of a decoder that ignores z
    assert (recon - x).abs().mean() < 0.6 * ignore_latent


def test_cpu_inference_runs_in_cache_sized_chunks():
    model = build_vae(TINY_VAE)  # 8 channels at full resolution: 8·H·W·4 bytes per image
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert model.images_per_forward(64 * 64, cpu) == vae_mod.CPU_ACTIVATION_BYTES // (8 * 64 * 64 * 4)
        assert model.images_per_forward(4096 * 4096, cpu) == 1  # never less than one image
        assert model.images_per_forward(64 * 64, torch.device("cuda")) is None  # a GPU takes the batch
    assert model.images_per_forward(64 * 64, cpu) is None  # training: one forward


def test_chunked_inference_equals_one_forward(monkeypatch):
    torch.manual_seed(0)
    model = build_vae(TINY_VAE).eval()
    x = torch.randn(7, 3, 32, 32)
    whole = [t.detach() for t in model.encode(x)]  # autograd on: one forward
    z = whole[0]
    image = model.decode(z).detach()
    monkeypatch.setattr(vae_mod, "CPU_ACTIVATION_BYTES", 3 * 8 * 32 * 32 * 4)  # 3 images per forward
    with torch.no_grad():
        assert model.images_per_forward(32 * 32, x.device) == 3
        chunked = model.encode(x)  # 3 + 3 + 1
        chunked_image = model.decode(z)
    assert chunked_image.is_contiguous()
    for a, b in zip([*chunked, chunked_image], [*whole, image], strict=True):
        assert_close_to_scale(a, b)  # batches of 3 vs 7: other kernels
