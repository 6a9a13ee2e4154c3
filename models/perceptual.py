"""VGG19 perceptual loss (the original's): L1 between features at conv1_1 … conv5_1, weighted 1/32 … 1.

The network is built here with torchvision's layer indices (`features.N`), so torchvision's
ImageNet weights load without a torchvision dependency: from a local file, from the Hugging Face
Hub's re-host `timm/vgg19.tv_in1k` (torchvision's `vgg19-dcbb9e9d.pth` as safetensors, same
`features.N` keys), or from torch hub's cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import VGG_REPO, VGG_REVISION

log = logging.getLogger(__name__)

HUB_FILE = "model.safetensors"
TORCH_HUB_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's file, as torch hub caches it
# torchvision's VGG19 ("E") feature layout; "M" = 2x2 max-pool.
VGG19_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
# Indices in `features` of the ReLUs after conv1_1, conv2_1, conv3_1, conv4_1, conv5_1 (Keras'
# block*_conv1 outputs, which include the activation) and the original's weights for them.
FEATURE_LAYERS = (1, 6, 11, 20, 29)
FEATURE_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGWeightsMissing(FileNotFoundError):
    """No VGG19 ImageNet weights available."""


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


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch .pth/.pt file."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _from_hub(repo: str, revision: str) -> Path | None:
    """The Hub file from the HF cache or a download (HF_HUB_OFFLINE: cache only); None if neither."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, HUB_FILE, revision=revision))
    except Exception as e:  # noqa: BLE001 - offline, no cache, no network, unknown revision ...
        log.warning("VGG19 weights %s@%s/%s not available from the Hub: %s: %s",
                    repo, revision[:8], HUB_FILE, type(e).__name__, e)
        return None


def find_vgg19_weights(path: str | Path | None, repo: str, revision: str) -> dict[str, torch.Tensor]:
    """torchvision's VGG19 state dict: `path`, else the Hub (cache first), else torch hub's cache."""
    if path is not None:
        if not Path(path).is_file():
            raise VGGWeightsMissing(f"vae.vgg_weights={str(path)!r} does not exist")
        return load_state_file(path)
    hub_file = _from_hub(repo, revision)
    if hub_file is not None:
        return load_state_file(hub_file)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_HUB_FILE
    if cached.is_file():
        return load_state_file(cached)
    from huggingface_hub import constants

    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    raise VGGWeightsMissing(
        "VGG19 ImageNet weights for the perceptual loss were not found. Either\n"
        f"  * let the pipeline download {repo}/{HUB_FILE} at revision {revision} into the Hugging Face"
        f" cache {constants.HF_HUB_CACHE}{offline} (huggingface-cli download {repo} {HUB_FILE}"
        f" --revision {revision}),\n"
        f"  * or put torchvision's {TORCH_HUB_FILE} in the torch hub cache: {cached},\n"
        f"  * or point at a local copy of either file: --set vae.vgg_weights=/path/to/{HUB_FILE},\n"
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


def build_perceptual(weights: str | Path | None = None, repo: str = VGG_REPO, revision: str = VGG_REVISION,
                     pretrained: bool = True) -> VGGPerceptualLoss:
    """The loss with ImageNet weights from the file `weights`, else the Hub / torch hub (`pretrained=False`: random)."""
    if not pretrained:
        return VGGPerceptualLoss()
    return VGGPerceptualLoss(find_vgg19_weights(weights, repo, revision))
