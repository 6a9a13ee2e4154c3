"""Image quality metrics shared by VAE validation and evaluation."""

from __future__ import annotations


def psnr(x, y):
    """Per-image PSNR in dB of images (B, 3, H, W) in [-1, 1] (peak = full range): (B,)."""
    import torch

    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)  # (B,) on the [0, 1] scale
    return -10 * torch.log10(mse.clamp_min(1e-10))
