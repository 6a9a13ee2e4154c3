"""VGG19 perceptual loss (the seed's): L1 between features at conv1_1 … conv5_1, weighted 1/32 … 1.

The network is built here with torchvision's layer indices (`features.N`), so torchvision's
published ImageNet state dict `vgg19-dcbb9e9d.pth` loads without a torchvision dependency.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"
# torchvision's VGG19 ("E") feature layout; "M" = 2x2 max-pool.
VGG19_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
# Indices in `features` of the ReLUs after conv1_1, conv2_1, conv3_1, conv4_1, conv5_1 (Keras'
# block*_conv1 outputs, which include the activation) and the seed's weights for them.
FEATURE_LAYERS = (1, 6, 11, 20, 29)
FEATURE_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGWeightsMissing(FileNotFoundError):
    """No VGG19 ImageNet weights available offline."""


def vgg19_features(last: int = FEATURE_LAYERS[-1]) -> nn.Sequential:
    """torchvision's `vgg19().features` truncated after index `last` (same indices, same keys)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            c_in = int(v)
        if len(layers) > last:
            break
    return nn.Sequential(*layers[: last + 1])


def find_vgg19_weights(path: str | Path | None = None, allow_download: bool = True) -> dict[str, torch.Tensor]:
    """torchvision's VGG19 state dict: a local file, else the torch hub cache, else a download."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise VGGWeightsMissing(f"vae.vgg_weights={str(p)!r} does not exist")
        return torch.load(p, map_location="cpu", weights_only=True)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    if allow_download:
        try:
            return torch.hub.load_state_dict_from_url(VGG19_URL, map_location="cpu", progress=False, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any network failure means "offline" here
            log.warning("VGG19 download failed: %s", e)
    raise VGGWeightsMissing(
        "VGG19 ImageNet weights for the perceptual loss are not available offline. Either\n"
        f"  * set vae.vgg_weights=/path/to/{VGG19_FILE} (torchvision's file, {VGG19_URL}),\n"
        f"  * or put that file in the torch hub cache: {cached},\n"
        "  * or turn the perceptual loss off: --set vae.w_perc=0"
    )


class VGGPerceptualLoss(nn.Module):
    """Σ_i w_i · mean|φ_i(x) − φ_i(y)| over VGG19 features of ImageNet-normalised [-1, 1] images."""

    def __init__(self, state_dict: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.features = vgg19_features()
        if state_dict is not None:
            own = {f"features.{k}" for k in self.features.state_dict()}
            missing = own - set(state_dict)
            if missing:
                raise ValueError(f"VGG19 state dict lacks {sorted(missing)[:4]}… (not torchvision's vgg19?)")
            self.load_state_dict({k: state_dict[k] for k in own})
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        return super().train(False)  # a fixed feature extractor: never in training mode

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1) / 2 - self.mean) / self.std  # (B, 3, H, W) ImageNet-normalised
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in FEATURE_LAYERS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar loss between batches x and y, both (B, 3, H, W) in [-1, 1]."""
        feats = self._features(torch.cat([x, y]))  # one pass over both batches
        fx, fy = zip(*(f.chunk(2) for f in feats), strict=True)
        return sum(w * F.l1_loss(a, b) for w, a, b in zip(FEATURE_WEIGHTS, fx, fy, strict=True))


def build_perceptual(weights: str | Path | None = None, pretrained: bool = True) -> VGGPerceptualLoss:
    """The perceptual loss with ImageNet weights (`pretrained=False`: random init, for tests)."""
    return VGGPerceptualLoss(find_vgg19_weights(weights) if pretrained else None)
