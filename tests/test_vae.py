import pytest
import torch

from models.perceptual import (
    FEATURE_LAYERS,
    VGGPerceptualLoss,
    VGGWeightsMissing,
    build_perceptual,
    find_vgg19_weights,
    vgg19_features,
)
from models.vae import AutoencoderKL, build_vae
from tagdit.config import VAE_PRESETS, VAEConfig, VAEModelConfig
from tagdit.training import count_parameters

TINY = VAEModelConfig(widths=[8, 16, 16], blocks_per_level=1, groups=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    model = build_vae(VAE_PRESETS["seed"])
    assert model.downsample_factor == 8
    assert sum(type(m).__name__ == "AttnBlock" for m in model.modules()) == 2  # encoder + decoder bottleneck
    assert 15e6 < count_parameters(model) < 30e6


def test_encode_rejects_sizes_not_divisible_by_f():
    with pytest.raises(ValueError, match="divisible"):
        build_vae(TINY).encode(torch.zeros(1, 3, 20, 20))


def test_kl_is_zero_for_standard_normal_and_positive_otherwise():
    zeros = torch.zeros(3, 4, 2, 2)
    assert torch.equal(AutoencoderKL.kl(zeros, zeros), torch.zeros(3))
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    kl = AutoencoderKL.kl(mean, logvar)
    assert kl.shape == (3,) and (kl > 0).all()
    # closed form for one element: KL(N(1, e) || N(0, 1)) = (1 + e - 1 - 1) / 2
    one = torch.ones(1, 1, 1, 1)
    assert AutoencoderKL.kl(one, one).item() == pytest.approx((torch.e - 1) / 2)


def test_a_few_dozen_steps_cut_the_loss_sharply_and_use_the_latent():
    from tasks.train_vae import vae_loss

    torch.manual_seed(0)
    model = build_vae(TINY)
    x = torch.zeros(4, 3, 32, 32)
    x[0, 0, 8:24, 8:24] = 1  # red square
    x[1, 2, :, 16:] = 0.8  # blue half
    x[2] = torch.linspace(-1, 1, 32)  # gradient
    x[3, 1, ::4] = -0.5  # stripes
    vae = VAEConfig(model=TINY, w_perc=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(80):
        loss, _ = vae_loss(model, x, step, vae=vae)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    with torch.no_grad():
        recon, _, _ = model(x, sample=False)
    ignore_latent = (x - x.median(0).values).abs().mean()  # best L1 of a decoder that ignores z
    assert (recon - x).abs().mean() < 0.6 * ignore_latent


def test_vgg_layout_matches_torchvision_indices():
    f = vgg19_features()
    assert FEATURE_LAYERS == (1, 6, 11, 20, 29) and len(f) == 30
    convs = {i: (m.in_channels, m.out_channels) for i, m in enumerate(f) if isinstance(m, torch.nn.Conv2d)}
    assert convs[0] == (3, 64) and convs[5] == (64, 128) and convs[10] == (128, 256)
    assert convs[19] == (256, 512) and convs[28] == (512, 512)
    assert all(isinstance(f[i], torch.nn.ReLU) for i in FEATURE_LAYERS)


def test_perceptual_loss_is_zero_for_identical_inputs_and_positive_otherwise():
    torch.manual_seed(0)
    loss = build_perceptual(pretrained=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x.clone()).item() == 0
    assert loss(x, x.flip(-1)).item() > 0
    y = x.clone().requires_grad_(True)
    loss(y, torch.zeros_like(x)).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())


def test_torchvision_style_state_dict_loads_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    ref = vgg19_features(36)  # the whole torchvision `features`
    state = {f"features.{k}": v for k, v in ref.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's file has more than we use
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)
    loss = build_perceptual(path)
    assert torch.equal(loss.features[28].weight, ref[28].weight)
    with pytest.raises(ValueError, match="lacks"):
        VGGPerceptualLoss({"features.0.weight": torch.zeros(64, 3, 3, 3)})


def test_missing_vgg_weights_error_names_the_options(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(VGGWeightsMissing) as e:
        find_vgg19_weights(None, allow_download=False)
    msg = str(e.value)
    assert "vae.vgg_weights" in msg and "vae.w_perc=0" in msg and str(tmp_path / "hub") in msg
    with pytest.raises(VGGWeightsMissing, match="does not exist"):
        find_vgg19_weights(tmp_path / "nope.pth")
