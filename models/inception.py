"""Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture") as a feature extractor:
the 2048-d average-pooled activations before the classifier, the features FID and KID are defined on.

Modules carry the attribute names of torchvision's `inception_v3` (`Conv2d_1a_3x3.conv`, `Mixed_5b.
branch1x1.bn`, `fc`, ...), so both weight files below load with strict key matching and without a
torchvision dependency; the auxiliary classifier (`AuxLogits.*`, a training-time head) is not built and
its keys are dropped on load. Weights are looked up locally only (an explicit path, else torch hub's
cache): nothing is ever downloaded.

- `FID_WEIGHTS`, pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`: Google's 2015-12-05 TensorFlow
  graph that FID/KID papers use, on its own network: TensorFlow's average pooling (padding not counted)
  and max pooling in Mixed_7c's pool branch (a quirk of that graph), 1008 classes.
- `TORCHVISION_WEIGHTS`, torchvision's `inception_v3_google-0cc3c7bd.pth`: a later TF-slim port, on
  torchvision's network (padding counted in the average pools).

Both expect pixels in [-1, 1] (torchvision's `transform_input=True` maps ImageNet-normalised input back
to that range; pytorch-fid scales [0, 1] by 2x - 1). `preprocess` resizes bilinearly without antialiasing,
as pytorch-fid (`F.interpolate`) and Keras' `layer_resizing` (the original's KID_measure.R) both do.
The network is fully convolutional down to the global pool, so any input from 75 px up works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

RESOLUTION = 299  # the input size the weights were trained at
FEATURE_DIM = 2048


@dataclass(frozen=True)
class InceptionWeights:
    """A weights file this module loads, and the network it belongs to."""

    name: str  # what metrics.json records
    file: str  # its name in torch hub's cache (where pytorch-fid and torchvision put it)
    num_classes: int  # rows of fc.weight: how a file given by path is recognised
    tf_pooling: bool  # average pools leave the padding out of the mean (TensorFlow's 'SAME' pooling)
    max_pool_7c: bool  # Mixed_7c's pool branch max-pools (the 2015 FID graph does)


FID_WEIGHTS = InceptionWeights("pt_inception-2015-12-05", "pt_inception-2015-12-05-6726825d.pth", 1008, True, True)
TORCHVISION_WEIGHTS = InceptionWeights("torchvision inception_v3_google-0cc3c7bd", "inception_v3_google-0cc3c7bd.pth",
                                       1000, False, False)
KNOWN_WEIGHTS = (FID_WEIGHTS, TORCHVISION_WEIGHTS)  # looked up in this order


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


def _avg3_tf(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool, padding left out of the mean (TensorFlow's 'SAME' average pool)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max3(x: Tensor) -> Tensor:
    """3x3 stride-1 max pool that keeps the size (the FID graph's Mixed_7c pool branch)."""
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):
    """35x35 block (paper fig. 5): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, c_in: int, pool_features: int, pool: Callable[[Tensor], Tensor] = _avg3):
        super().__init__()
        self.pool = pool
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
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(self.pool(x))], 1)  # (B, 224 + pool, H, W)


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

    def __init__(self, c_in: int, channels_7x7: int, pool: Callable[[Tensor], Tensor] = _avg3):
        super().__init__()
        self.pool = pool
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
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(self.pool(x))], 1)  # (B, 768, 17, 17)


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

    def __init__(self, c_in: int, pool: Callable[[Tensor], Tensor] = _avg3):
        super().__init__()
        self.pool = pool
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
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))], 1)  # (B, 2048, 8, 8)


class InceptionV3(nn.Module):
    """torchvision's `inception_v3` without the auxiliary head; `forward` gives the pool features.
    `tf_pooling` and `max_pool_7c` build the FID graph's variant (see InceptionWeights)."""

    def __init__(self, num_classes: int = 1000, tf_pooling: bool = False, max_pool_7c: bool = False):
        super().__init__()
        avg = _avg3_tf if tf_pooling else _avg3
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32, pool=avg)
        self.Mixed_5c = InceptionA(256, pool_features=64, pool=avg)
        self.Mixed_5d = InceptionA(288, pool_features=64, pool=avg)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, pool=avg)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, pool=avg)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, pool=avg)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, pool=avg)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool=avg)
        self.Mixed_7c = InceptionE(2048, pool=_max3 if max_pool_7c else avg)
        self.fc = nn.Linear(FEATURE_DIM, num_classes)  # the ImageNet classifier: kept so the file loads strictly

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1], H = W >= 75 -> (B, 2048) average-pooled features (shapes for 299 px;
        75 px gives 7 x 7 at Mixed_5*, 3 x 3 at Mixed_6*, 1 x 1 at Mixed_7*)."""
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


def preprocess(x: Tensor, size: int = RESOLUTION) -> Tensor:
    """Images (B, 3, H, W), uint8 or float in [-1, 1] -> (B, 3, size, size) float in [-1, 1]; resized
    bilinearly without antialiasing (pytorch-fid's `F.interpolate`, Keras' `layer_resizing`)."""
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.float()


def find_inception_weights(path: str | Path | None) -> Path | None:
    """An Inception-v3 file: `path` (must exist), else torch hub's cache (FID weights first), else None."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"evaluate.inception_weights={str(path)!r} does not exist")
        return Path(path)
    return next((p for w in KNOWN_WEIGHTS if (p := hub_cache_path(w)).is_file()), None)


def hub_cache_path(weights: InceptionWeights = FID_WEIGHTS) -> Path:
    """Where torch hub (pytorch-fid, torchvision's `inception_v3(weights=...)`) keeps `weights`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.file


def load_inception(path: str | Path, device: Any = "cpu") -> tuple[InceptionV3, InceptionWeights]:
    """The extractor for the file at `path`, recognised by its classifier's size (1008 rows: FID
    weights, else torchvision's), AuxLogits.* dropped and all else strict, in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    rows = state["fc.weight"].shape[0] if "fc.weight" in state else TORCHVISION_WEIGHTS.num_classes
    weights = FID_WEIGHTS if rows == FID_WEIGHTS.num_classes else TORCHVISION_WEIGHTS
    model = InceptionV3(weights.num_classes, tf_pooling=weights.tf_pooling, max_pool_7c=weights.max_pool_7c)
    model.load_state_dict(state, strict=True)  # an old file without num_batches_tracked loads: BN fills them
    return model.requires_grad_(False).eval().to(device), weights


@torch.no_grad()
def inception_features(model: InceptionV3, images: Iterable[Any], size: int = RESOLUTION,
                       batch: int = 32) -> np.ndarray:
    """Pool features (N, 2048) float64 of RGB PIL images (any size) seen at `size` px, in bounded batches."""
    device = next(model.parameters()).device
    feats, pending = [], []

    def flush() -> None:
        x = torch.cat([preprocess(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None], size)
                       for im in pending])  # (b, 3, size, size): resized one by one, sizes may differ
        feats.append(model(x.to(device)).double().cpu())
        pending.clear()

    for im in images:
        pending.append(im)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    return torch.cat(feats).numpy() if feats else np.zeros((0, FEATURE_DIM))
