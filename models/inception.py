"""Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture") as a feature extractor:
the 2048-d average-pooled activations before the classifier, the features FID and KID are defined on.

Modules carry the attribute names of torchvision's `inception_v3` (`Conv2d_1a_3x3.conv`, `Mixed_5b.
branch1x1.bn`, `fc`, ...), so torchvision's ImageNet file `inception_v3_google-0cc3c7bd.pth` loads with
strict key matching and without a torchvision dependency; the auxiliary classifier (`AuxLogits.*`, a
training-time head) is not built and its keys are dropped on load. Weights are looked up locally only
(an explicit path, else torch hub's cache): nothing is ever downloaded.

Input convention: these weights were ported from TensorFlow and expect pixels in [-1, 1]; torchvision's
`transform_input=True` (its default for these weights) maps ImageNet-normalised input back to exactly
that range. `preprocess` therefore takes uint8 or [-1, 1] images, resizes them to 299x299 (bilinear,
antialiased when shrinking) and feeds [-1, 1] directly, which equals torchvision's model with
`transform_input=True` given ImageNet-normalised 299 px images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

TORCH_HUB_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's file, as torch hub caches it
RESOLUTION = 299
FEATURE_DIM = 2048


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as TensorFlow's) -> ReLU: torchvision's `BasicConv2d`."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that keeps the size (zero padding counted, as torchvision)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):
    """35x35 block (paper fig. 5): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)  # (B, 224 + pool, H, W)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (paper fig. 10): stride-2 3x3 | 1x1-3x3-3x3/2 | max pool."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)  # (B, 480 + c_in, H', W')


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (paper fig. 6): 1x7 and 7x1 pairs."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg3(x))], 1)  # (B, 768, 17, 17)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)  # (B, 512 + c_in, 8, 8)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (paper fig. 7): 1x3 and 3x1 side by side."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(_avg3(x))], 1)  # (B, 2048, 8, 8)


class InceptionV3(nn.Module):
    """torchvision's `inception_v3` without the auxiliary head; `forward` gives the pool features."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.fc = nn.Linear(FEATURE_DIM, num_classes)  # the ImageNet classifier: kept so the file loads strictly

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, 299, 299) in [-1, 1] -> (B, 2048) average-pooled features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # -> (B, 288, 35, 35) -> (B, 768, 17, 17) -> (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)

    def logits(self, x: Tensor) -> Tensor:
        """(B, 3, 299, 299) in [-1, 1] -> (B, 1000) ImageNet logits (a check that the weights are right)."""
        return self.fc(self.forward(x))


def preprocess(x: Tensor) -> Tensor:
    """Images (B, 3, H, W), uint8 or float in [-1, 1] -> (B, 3, 299, 299) float in [-1, 1]."""
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x.float(), size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False,
                          antialias=True)  # antialias only matters when shrinking
    return x.float()


def find_inception_weights(path: str | Path | None) -> Path | None:
    """torchvision's Inception-v3 file: `path` (must exist), else torch hub's cache, else None."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"evaluate.inception_weights={str(path)!r} does not exist")
        return Path(path)
    cached = hub_cache_path()
    return cached if cached.is_file() else None


def hub_cache_path() -> Path:
    """Where torch hub (and torchvision's `inception_v3(weights=...)`) keeps the file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCH_HUB_FILE


def load_inception(path: str | Path, device: Any = "cpu") -> InceptionV3:
    """The extractor with torchvision's weights from `path` (AuxLogits.* dropped, all else strict), eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    model = InceptionV3()
    model.load_state_dict(state, strict=True)  # an old file without num_batches_tracked loads: BN fills them
    return model.requires_grad_(False).eval().to(device)


@torch.no_grad()
def inception_features(model: InceptionV3, images: list[Any], batch: int = 32) -> np.ndarray:
    """Pool features (N, 2048) float64 of RGB PIL images (any size), in bounded batches."""
    device = next(model.parameters()).device
    feats = []
    for i in range(0, len(images), batch):
        x = torch.cat([preprocess(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None])
                       for im in images[i:i + batch]])  # (b, 3, 299, 299): resized one by one, sizes may differ
        feats.append(model(x.to(device)).double().cpu())
    return torch.cat(feats).numpy() if feats else np.zeros((0, FEATURE_DIM))
