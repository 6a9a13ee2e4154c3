"""The original's perceptual network: Keras' VGG19 `.h5` (Caffe weights) on Caffe-style input, in fp32."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.perceptual import (
    CAFFE_MEAN_BGR,
    FEATURE_WEIGHTS,
    KERAS_FILE,
    KERAS_URL,
    CaffeVGGPerceptualLoss,
    VGGPerceptualLoss,
    VGGWeightsMissing,
    build_keras_perceptual,
    build_perceptual,
    find_keras_vgg19_weights,
    vgg19_features,
)
from tagdit.config import VAEConfig, load_config
from tagdit.train.vae import build_perceptual_loss

pytestmark = pytest.mark.usefixtures("one_thread")

# Keras' VGG19 conv layers (notop), in order, with their (in, out) channels.
KERAS_CONVS = [(f"block{b}_conv{c}", cin if c == 1 else cout, cout)
               for b, (n, cin, cout) in enumerate([(2, 3, 64), (2, 64, 128), (4, 128, 256), (4, 256, 512),
                                                   (4, 512, 512)], start=1) for c in range(1, n + 1)]


def write_keras_h5(path: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A random-weight VGG19 notop `.h5` laid out as Keras' save_weights writes it: kernels (kh, kw, in, out)."""
    rng = np.random.default_rng(seed)
    weights = {}
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"input_1"] + [n.encode() for n, _, _ in KERAS_CONVS]
        f.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for name, cin, cout in KERAS_CONVS:
            kernel = (rng.standard_normal((3, 3, cin, cout)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
            bias = (rng.standard_normal(cout) * 0.1).astype(np.float32)
            g = f.create_group(name)
            g.attrs["weight_names"] = [f"{name}_W_1:0".encode(), f"{name}_b_1:0".encode()]
            g[f"{name}_W_1:0"], g[f"{name}_b_1:0"] = kernel, bias
            weights[name] = (kernel, bias)
    return weights


@pytest.fixture
def keras_h5(tmp_path):
    path = tmp_path / KERAS_FILE
    return path, write_keras_h5(path)


@pytest.fixture
def no_keras(tmp_path, monkeypatch):
    """An empty Keras cache and an offline, empty HF cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def correlate_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras' Conv2D(padding="same") on one (H, W, in) image, by loops over the 3x3 taps: (H, W, out)."""
    h, w, _ = x.shape
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((h, w, kernel.shape[3]), np.float64) + bias
    for dy in range(3):
        for dx in range(3):
            out += padded[dy : dy + h, dx : dx + w] @ kernel[dy, dx].astype(np.float64)  # (H, W, in) @ (in, out)
    return out


def test_a_keras_kernel_convolves_as_in_keras(keras_h5):
    path, weights = keras_h5
    loss = build_keras_perceptual(path)
    x = np.random.default_rng(1).standard_normal((7, 5, 64)).astype(np.float32)  # not square: kh/kw swaps show
    for index, name in ((2, "block1_conv2"), (5, "block2_conv1")):
        conv = loss.features[index]
        want = correlate_same(x[..., : conv.in_channels], *weights[name])
        got = conv(torch.from_numpy(x[..., : conv.in_channels]).permute(2, 0, 1)[None])[0].permute(1, 2, 0)
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4)


def test_input_is_bgr_0_255_minus_the_caffe_means():
    loss = CaffeVGGPerceptualLoss()
    x = torch.rand(2, 3, 4, 4) * 2 - 1  # RGB in [-1, 1]
    rgb255 = (x.numpy() + 1) * 127.5
    want = rgb255[:, ::-1] - np.array([103.939, 116.779, 123.68]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(loss.preprocess(x).numpy(), want, rtol=1e-5, atol=1e-4)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)  # pure red
    assert loss.preprocess(red).flatten().tolist() == pytest.approx([-103.939, -116.779, 255 - 123.68], abs=1e-4)
    assert CAFFE_MEAN_BGR == (103.939, 116.779, 123.68)


def reference_loss(weights: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The original's loss computed by hand: caffe preprocessing, convs from the raw Keras arrays."""
    mean = torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    total = torch.zeros(())
    feats = []
    for img in (x, y):
        h, out = (img[:, [2, 1, 0]] + 1) * 127.5 - mean, []
        for name, _, _ in KERAS_CONVS[:13]:  # up to block5_conv1
            if name.endswith("conv1") and name != "block1_conv1":
                h = F.max_pool2d(h, 2)
            kernel, bias = weights[name]
            h = F.relu(F.conv2d(h, torch.from_numpy(kernel).permute(3, 2, 0, 1), torch.from_numpy(bias), padding=1))
            if name.endswith("conv1"):
                out.append(h)
        feats.append(out)
    for w, a, b in zip(FEATURE_WEIGHTS, *feats, strict=True):
        total = total + w * (a - b).abs().mean()
    return total


def test_the_loss_matches_a_hand_computed_caffe_vgg19(keras_h5):
    path, weights = keras_h5
    loss = build_keras_perceptual(path)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    want = reference_loss(weights, x, y)
    assert want.item() > 0
    torch.testing.assert_close(loss(x, y), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [VGGPerceptualLoss, CaffeVGGPerceptualLoss])
def test_both_networks_run_in_fp32_under_bf16_autocast(cls):
    torch.manual_seed(0)
    loss = cls()
    x, y = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    plain = loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(x.bfloat16(), y.bfloat16())
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, loss(x.bfloat16().float(), y.bfloat16().float()))
    assert plain.dtype == torch.float32


def test_keras_weights_come_from_the_setting_the_hub_or_keras_cache(keras_h5, no_keras, monkeypatch):
    path, _ = keras_h5
    assert find_keras_vgg19_weights(path, "someone/vgg") == path  # the local file wins
    calls = []

    def fake_download(repo, filename, revision=None, **kw):
        calls.append((repo, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert find_keras_vgg19_weights(None, "someone/vgg") == path and calls == [("someone/vgg", KERAS_FILE)]
    cached = no_keras / "keras" / "models" / KERAS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    assert find_keras_vgg19_weights(None, None) == cached


def test_missing_keras_weights_name_the_settings_and_the_download(no_keras):
    with pytest.raises(VGGWeightsMissing) as e:
        find_keras_vgg19_weights(None, "someone/vgg")  # offline, empty caches
    msg = str(e.value)
    for part in ("vae.perceptual_network=keras", "vae.keras_vgg_weights=", "vae.keras_vgg_repo=", KERAS_URL,
                 str(no_keras / "keras" / "models" / KERAS_FILE), "vae.perceptual_network=torchvision"):
        assert part in msg, part
    with pytest.raises(VGGWeightsMissing, match="vae.keras_vgg_weights='.*nope.h5' does not exist"):
        find_keras_vgg19_weights(no_keras / "nope.h5", None)


def test_auto_uses_keras_when_found_else_warns_and_uses_torchvision(keras_h5, no_keras, caplog):
    path, _ = keras_h5
    tv = no_keras / "vgg.safetensors"
    save_file({f"features.{k}": v for k, v in vgg19_features().state_dict().items()}, tv)
    assert isinstance(build_perceptual_loss(VAEConfig(perceptual_network="auto", keras_vgg_weights=path)),
                      CaffeVGGPerceptualLoss)
    with caplog.at_level(logging.WARNING, logger="tagdit.train.vae"):
        loss = build_perceptual_loss(VAEConfig(perceptual_network="auto", vgg_weights=tv))
    assert type(loss) is VGGPerceptualLoss and "Falling back to torchvision's VGG19" in caplog.text
    with pytest.raises(VGGWeightsMissing):
        build_perceptual_loss(VAEConfig(perceptual_network="keras", vgg_weights=tv))
    assert type(build_perceptual_loss(VAEConfig(vgg_weights=tv))) is VGGPerceptualLoss  # the default
    assert type(build_perceptual(tv)) is VGGPerceptualLoss


def test_what_auto_resolves_to_is_part_of_the_train_vae_key(keras_h5, no_keras):
    from tagdit.train.vae import perceptual_identity

    path, _ = keras_h5
    found = perceptual_identity(VAEConfig(perceptual_network="auto", keras_vgg_weights=path))
    missing = perceptual_identity(VAEConfig(perceptual_network="auto"))
    assert found["perceptual"].startswith("keras:") and missing["perceptual"].startswith("torchvision")
    assert perceptual_identity(VAEConfig()) == {}  # torchvision's, named by the config alone


def test_the_original_preset_asks_for_keras_network_with_fallback():
    cfg = load_config("original-256", [])
    assert cfg.vae.perceptual_network == "auto" and cfg.vae.w_perc == 1.0
