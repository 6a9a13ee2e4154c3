import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from models.perceptual import (
    FEATURE_LAYERS,
    HUB_FILE,
    TORCH_HUB_FILE,
    VGGPerceptualLoss,
    VGGWeightsMissing,
    build_perceptual,
    find_vgg19_weights,
    vgg19_features,
)
from models.vae import build_vae
from tagdit.config import VAEConfig, VAEModelConfig
from tagdit.train.vae import build_vae_loss

REPO, REV = VAEConfig().vgg_repo, VAEConfig().vgg_revision

pytestmark = pytest.mark.usefixtures("one_thread")


def torchvision_style_state(seed: int) -> dict[str, torch.Tensor]:
    """Random VGG19 weights under torchvision's keys, plus a classifier key we do not use."""
    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in vgg19_features(36).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    return state


@pytest.fixture
def no_sources(tmp_path, monkeypatch):
    """An empty HF cache (offline) and an empty torch hub cache."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    return tmp_path


def test_vgg_layout_matches_torchvision_indices():
    f = vgg19_features()
    assert FEATURE_LAYERS == (1, 6, 11, 20, 29) and len(f) == 30
    convs = {i: (m.in_channels, m.out_channels) for i, m in enumerate(f) if isinstance(m, torch.nn.Conv2d)}
    assert convs[0] == (3, 64) and convs[5] == (64, 128) and convs[10] == (128, 256)
    assert convs[19] == (256, 512) and convs[28] == (512, 512)
    assert all(isinstance(f[i], torch.nn.ReLU) for i in FEATURE_LAYERS)


@pytest.mark.numerics
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


@pytest.mark.parametrize("name", ["vgg19-dcbb9e9d.pth", "model.safetensors"])
def test_a_local_file_wins_and_loads_torchvision_keys(tmp_path, no_sources, name):
    state = torchvision_style_state(1)
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(state, path)
    else:
        torch.save(state, path)
    loss = build_perceptual(path)
    assert torch.equal(loss.features[28].weight, state["features.28.weight"])
    with pytest.raises(ValueError, match="lacks"):
        VGGPerceptualLoss({"features.0.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(VGGWeightsMissing, match="does not exist"):
        find_vgg19_weights(tmp_path / "nope.pth", REPO, REV)


def test_hub_is_asked_for_the_pinned_file_before_torch_hub(tmp_path, no_sources, monkeypatch):
    hub_file = tmp_path / HUB_FILE
    save_file(torchvision_style_state(2), hub_file)
    torch_hub = tmp_path / "torchhub" / "checkpoints" / TORCH_HUB_FILE
    torch_hub.parent.mkdir(parents=True)
    torch.save(torchvision_style_state(3), torch_hub)
    calls = []

    def fake_download(repo, filename, revision=None, **kw):
        calls.append((repo, filename, revision))
        return str(hub_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    state = find_vgg19_weights(None, "someone/vgg", "abc")
    assert calls == [("someone/vgg", HUB_FILE, "abc")]
    assert torch.equal(state["features.0.weight"], torchvision_style_state(2)["features.0.weight"])


def test_offline_hf_cache_is_used_without_network(no_sources):
    snapshot = no_sources / "hf" / f"models--{REPO.replace('/', '--')}" / "snapshots" / REV
    snapshot.mkdir(parents=True)
    save_file(torchvision_style_state(4), snapshot / HUB_FILE)  # the real hf_hub_download finds it
    state = find_vgg19_weights(None, REPO, REV)
    assert torch.equal(state["features.2.weight"], torchvision_style_state(4)["features.2.weight"])


def test_offline_without_hf_cache_falls_back_to_torch_hub(no_sources):
    torch_hub = no_sources / "torchhub" / "checkpoints" / TORCH_HUB_FILE
    torch_hub.parent.mkdir(parents=True)
    torch.save(torchvision_style_state(5), torch_hub)
    state = find_vgg19_weights(None, REPO, REV)
    assert torch.equal(state["features.5.weight"], torchvision_style_state(5)["features.5.weight"])


def test_missing_weights_error_names_repo_file_caches_and_options(no_sources):
    with pytest.raises(VGGWeightsMissing) as e:
        find_vgg19_weights(None, REPO, REV)
    msg = str(e.value)
    for part in (REPO, HUB_FILE, REV, str(no_sources / "hf"), str(no_sources / "torchhub"), TORCH_HUB_FILE,
                 "--set vae.vgg_weights=", "vae.w_perc=0", "HF_HUB_OFFLINE"):
        assert part in msg, part


@pytest.mark.numerics
def test_tiny_vae_trains_with_a_perceptual_term_from_a_weights_file(tmp_path):
    path = tmp_path / "vgg.safetensors"
    save_file({k: v for k, v in torchvision_style_state(6).items() if k.startswith("features.")}, path)
    tiny = VAEModelConfig(widths=[8, 16], blocks_per_level=1, up_blocks=1, groups=4, heads=2)
    criterion = build_vae_loss(VAEConfig(model=tiny, w_perc=1.0, vgg_weights=path))
    assert criterion.perceptual is not None
    torch.manual_seed(0)
    model = build_vae(tiny)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, percs = [], []
    for step in range(12):
        loss, logs = criterion(x, *model(x), step, last_layer=model.last_layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        percs.append(logs["perceptual"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert percs[0] > 0 and sum(losses[-3:]) < sum(losses[:3])
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True) if a.numel() > 1)
