"""KL-regularised autoencoder (the original's KL-VAE): f = 2**len(widths), diagonal Gaussian posterior.

Encoder: conv → per level [res-blocks, stride-2 conv] → res-blocks → res, attention, res → GroupNorm,
swish, conv to 2·z channels → 1x1 quant_conv (mean, logvar). Decoder: 1x1 post_quant_conv → conv →
res, attention, res → per level [res-blocks, nearest x2, conv] → res-blocks → GroupNorm, swish, conv,
tanh, so images live in [-1, 1]. At the original preset this is the original project's layer list
exactly (docs/design.md §5), 32.6M parameters. The latent scale factor is *not* here: it is measured
over the data by the encode stage and stored in the latents' `stats.json`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import VAEModelConfig

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # clamp as in LDM's DiagonalGaussianDistribution
# Without autograd on a CPU, encode/decode run in chunks whose full-resolution activation stays
# cache-sized: the demo VAE encodes 64 px images ~1.7x as fast per image in chunks of 16 as in
# batches of 128 (benchmarks/vae_encode.py). Every op is per image, so chunking changes no result.
CPU_ACTIVATION_BYTES = 8 << 20


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
    return nn.GroupNorm(groups, channels, eps=1e-5)  # Keras GroupNormalization(epsilon = 1e-5)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, swish, conv3x3) twice, 1x1 skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head spatial self-attention over all H·W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels are not divisible into {heads} heads")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, HW, C/heads) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution, padded right/bottom only (TF "same", as LDM): halves H and W."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, cfg: VAEModelConfig) -> nn.Sequential:
    """res → (attention) → res at the bottleneck."""
    attn = AttnBlock(channels, cfg.groups, cfg.heads) if cfg.attention else nn.Identity()
    return nn.Sequential(ResBlock(channels, channels, cfg.groups), attn, ResBlock(channels, channels, cfg.groups))


def _res_blocks(c_in: int, c_out: int, n: int, groups: int) -> list[nn.Module]:
    """n res-blocks from c_in to c_out channels (only the first changes the width)."""
    return [ResBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n)]


class Encoder(nn.Module):
    """Image (B, 3, H, W) → posterior parameters (B, 2z, H/f, W/f)."""

    def __init__(self, cfg: VAEModelConfig):
        super().__init__()
        g, n = cfg.groups, cfg.blocks_per_level
        self.conv_in = nn.Conv2d(3, cfg.widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = cfg.widths[0]
        for w in cfg.widths:
            layers += _res_blocks(ch, w, n, g)
            layers.append(Downsample(w))
            ch = w
        layers += _res_blocks(ch, ch, n, g)  # the bottleneck level keeps widths[-1]
        self.down = nn.Sequential(*layers)
        self.mid = _mid(ch, cfg)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1) if cfg.quant_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))  # (B, C_L, H/f, W/f)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))  # (B, 2z, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z, h, w) → image (B, 3, h·f, w·f) in [-1, 1]."""

    def __init__(self, cfg: VAEModelConfig):
        super().__init__()
        g = cfg.groups
        ch = cfg.widths[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1) if cfg.quant_conv else nn.Identity()
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = _mid(ch, cfg)
        layers: list[nn.Module] = []
        for w in [cfg.widths[-1], *reversed(cfg.widths[1:])]:  # levels from the bottleneck upwards
            layers += _res_blocks(ch, w, cfg.up_blocks, g)
            layers.append(Upsample(w))
            ch = w
        layers += _res_blocks(ch, cfg.widths[0], cfg.blocks_per_level, g)  # full resolution
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(cfg.widths[0], g)
        self.conv_out = nn.Conv2d(cfg.widths[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(self.post_quant_conv(z))))  # (B, C_0, H, W)
        return torch.tanh(self.conv_out(F.silu(self.norm_out(h))))  # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    """The KL-VAE: `encode` → (mean, logvar), `sample`, `decode`; `forward` does all three."""

    def __init__(self, cfg: VAEModelConfig):
        super().__init__()
        if not cfg.widths or cfg.blocks_per_level < 1 or cfg.z_channels < 1:
            raise ValueError(f"invalid VAE config: {cfg}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # channels_last convolutions: 1.2x (training) to 2.5x (decoding) faster on CPU, faster on GPU
        # too. An internal detail: inputs are converted and outputs come back contiguous.
        self.to(memory_format=torch.channels_last)

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.cfg.widths)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight: where the GAN's adaptive weight compares gradients."""
        return self.decoder.conv_out.weight

    def images_per_forward(self, pixels: int, device: torch.device) -> int | None:
        """Chunk size for inference at `pixels` = H·W of the images: on a CPU as many images as keep
        the first level's float32 activation within CPU_ACTIVATION_BYTES (at least 1); None = all."""
        if device.type != "cpu" or torch.is_grad_enabled():
            return None
        return max(1, CPU_ACTIVATION_BYTES // (self.cfg.widths[0] * pixels * 4))

    def _run(self, net: nn.Module, x: torch.Tensor, pixels: int) -> torch.Tensor:
        """net(x) in channels_last, in `images_per_forward` chunks; the output contiguous."""
        x = x.contiguous(memory_format=torch.channels_last)
        n = self.images_per_forward(pixels, x.device)
        if n is None or n >= x.shape[0]:
            return net(x).contiguous()
        return torch.cat([net(c).contiguous() for c in x.split(n)])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z|x) = N(mean, exp(logvar)), each (B, z, H/f, W/f)."""
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by f = {f}")
        mean, logvar = self._run(self.encoder, x, x.shape[-2] * x.shape[-1]).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z, h, w) → image (B, 3, h·f, w·f) in [-1, 1]."""
        return self._run(self.decoder, z, z.shape[-2] * z.shape[-1] * self.downsample_factor**2)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std·eps (reparameterisation, Kingma & Welling 2014)."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, var) ‖ N(0, 1)) of every latent element, same shape as mean: the loss averages it."""
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, z, h, w)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) → (reconstruction, mean, logvar); `sample=False` decodes the mean."""
        mean, logvar = self.encode(x)
        z = self.sample(mean, logvar) if sample else mean  # (B, z, H/f, W/f)
        return self.decode(z), mean, logvar


def build_vae(cfg: VAEModelConfig | dict) -> AutoencoderKL:
    """A fresh VAE from a config or its JSON dump (as stored in checkpoints)."""
    return AutoencoderKL(cfg if isinstance(cfg, VAEModelConfig) else VAEModelConfig.model_validate(cfg))
