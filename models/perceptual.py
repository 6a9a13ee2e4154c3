"""VGG19 perceptual loss (the original's): L1 between features at conv1_1 … conv5_1, weighted 1/32 … 1.

Two networks, the same layers (torchvision's indices, `features.N`):
  * torchvision's ImageNet VGG19 on ImageNet mean/std RGB input (`VGGPerceptualLoss`): from a local
    file, the Hugging Face Hub's re-host `timm/vgg19.tv_in1k` (`vgg19-dcbb9e9d.pth` as safetensors),
    or torch hub's cache;
  * the original's: Keras' VGG19, i.e. Oxford's Caffe weights, on Caffe-style input (BGR, 0–255 minus
    the channel means, no std; `CaffeVGGPerceptualLoss`), read from Keras' notop `.h5` with h5py:
    a local file, a Hub repo that hosts it, or Keras' own cache (`~/.keras/models`).
Both run in float32 outside autocast, as the original forced (loss.R).
"""

from __future__ import annotations

import logging
import os
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
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # Keras' preprocess_input(mode="caffe"), in BGR order
KERAS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_URL = f"https://storage.googleapis.com/tensorflow/keras-applications/vgg19/{KERAS_FILE}"


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


def _from_hub(repo: str, revision: str | None, filename: str = HUB_FILE) -> Path | None:
    """The Hub file from the HF cache or a download (HF_HUB_OFFLINE: cache only); None if neither."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as e:  # noqa: BLE001 - offline, no cache, no network, unknown revision ...
        log.warning("VGG19 weights %s@%s/%s not available from the Hub: %s: %s",
                    repo, (revision or "main")[:8], filename, type(e).__name__, e)
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
    """Σ_i w_i · mean|φ_i(x) − φ_i(y)| over VGG19 features of ImageNet-normalised [-1, 1] images, in fp32."""

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

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] RGB -> the network's input: ImageNet mean/std RGB."""
        return ((x + 1) / 2 - self.mean) / self.std  # (B, 3, H, W)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.preprocess(x)
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in FEATURE_LAYERS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar loss between batches x and y, both (B, 3, H, W) in [-1, 1]; float32 even under autocast."""
        with torch.autocast(x.device.type, enabled=False):
            feats = self._features(torch.cat([x, y]).float())  # one pass over both batches
            fx, fy = zip(*(f.chunk(2) for f in feats), strict=True)
            return sum(w * F.l1_loss(a, b) for w, a, b in zip(FEATURE_WEIGHTS, fx, fy, strict=True))


class CaffeVGGPerceptualLoss(VGGPerceptualLoss):
    """The original's network: Keras' VGG19 (Oxford's Caffe weights) on `preprocess_input` (caffe) input."""

    def __init__(self, state_dict: dict[str, torch.Tensor] | None = None):
        super().__init__(state_dict)
        self.register_buffer("mean", torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] RGB -> 0..255 BGR minus the BGR channel means (no std), as Keras' caffe mode."""
        return (x.flip(1) + 1) * 127.5 - self.mean  # (B, 3, H, W): channel 0 is blue


def keras_layer_names(last: int = FEATURE_LAYERS[-1]) -> dict[int, str]:
    """`features` index of each conv up to `last` -> its Keras name (`block1_conv1` …)."""
    names, block, conv = {}, 1, 0
    for i, m in enumerate(vgg19_features(last)):
        if isinstance(m, nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(m, nn.Conv2d):
            conv += 1
            names[i] = f"block{block}_conv{conv}"
    return names


def load_keras_vgg19(path: str | Path) -> dict[str, torch.Tensor]:
    """torchvision-keyed state dict from Keras' VGG19 `.h5` (kernels (kh, kw, in, out) -> (out, in, kh, kw))."""
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading Keras' VGG19 .h5 needs h5py: pip install 'tagdit[keras]' (or h5py)") from e
    state = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f  # a whole saved model, or save_weights'
        for i, name in keras_layer_names().items():
            if name not in root:
                raise ValueError(f"{path} has no layer {name}: not Keras' VGG19 weights")
            group = root[name]
            kernel_name, bias_name = (n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"])
            kernel = torch.from_numpy(group[kernel_name][()]).float()  # (kh, kw, in, out)
            state[f"features.{i}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()  # (out, in, kh, kw)
            state[f"features.{i}.bias"] = torch.from_numpy(group[bias_name][()]).float()
    return state


def keras_cache_file() -> Path:
    """Where Keras' `get_file` keeps the notop weights (KERAS_HOME, else ~/.keras)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / KERAS_FILE


def find_keras_vgg19_weights(path: str | Path | None, repo: str | None) -> Path:
    """Keras' notop VGG19 `.h5`: `path`, else the Hub repo `repo` (cache first), else Keras' cache."""
    if path is not None:
        if not Path(path).is_file():
            raise VGGWeightsMissing(f"vae.keras_vgg_weights={str(path)!r} does not exist")
        return Path(path)
    if repo is not None and (hub_file := _from_hub(repo, None, KERAS_FILE)) is not None:
        return hub_file
    if keras_cache_file().is_file():
        return keras_cache_file()
    raise VGGWeightsMissing(
        "Keras' VGG19 weights for the original's perceptual network (vae.perceptual_network=keras) were not found."
        f" Download {KERAS_URL} and either\n"
        f"  * put it in Keras' cache: {keras_cache_file()},\n"
        f"  * or point at it: --set vae.keras_vgg_weights=/path/to/{KERAS_FILE},\n"
        f"  * or name a Hugging Face repo that hosts {KERAS_FILE}: --set vae.keras_vgg_repo=OWNER/NAME,\n"
        "  * or use torchvision's network instead: --set vae.perceptual_network=torchvision"
    )


def build_perceptual(weights: str | Path | None = None, repo: str = VGG_REPO, revision: str = VGG_REVISION,
                     pretrained: bool = True) -> VGGPerceptualLoss:
    """The loss with ImageNet weights from the file `weights`, else the Hub / torch hub (`pretrained=False`: random)."""
    if not pretrained:
        return VGGPerceptualLoss()
    return VGGPerceptualLoss(find_vgg19_weights(weights, repo, revision))


def build_keras_perceptual(weights: str | Path | None = None, repo: str | None = None) -> CaffeVGGPerceptualLoss:
    """The original's loss: Keras' VGG19 from the `.h5` file `weights`, else the Hub repo `repo`, else Keras' cache."""
    return CaffeVGGPerceptualLoss(load_keras_vgg19(find_keras_vgg19_weights(weights, repo)))
