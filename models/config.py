"""Model architecture configs and their named presets (pydantic only: importing them loads no torch).

`models/vae.py` and `models/dit.py` build from these; the pipeline config (`tagdit.config`) nests them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

VGG_REPO = "timm/vgg19.tv_in1k"  # the Hub's re-host of torchvision's vgg19-dcbb9e9d.pth
VGG_REVISION = "128d4708565b3a414bcbb9bbad440b2fe37b9f18"  # pinned: the weights never change


class VAEModelConfig(BaseModel):
    """KL-VAE architecture (the original: 80/160/320, f = 8, z = 4, ~32.6M parameters)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    widths: list[int] = [80, 160, 320]  # channels of the level before each downsampling: f = 2**len(widths)
    blocks_per_level: int = Field(2, ge=1)  # encoder res-blocks per level; also the decoder's last level
    up_blocks: int = Field(3, ge=1)  # decoder res-blocks before each upsampling (the original: one more)
    z_channels: int = Field(4, ge=1)
    groups: int = Field(16, ge=1)  # GroupNorm groups
    attention: bool = True  # one self-attention block at each bottleneck
    heads: int = Field(8, ge=1)  # attention heads (head width = widths[-1] / heads)
    quant_conv: bool = True  # LDM's 1x1 quant_conv / post_quant_conv around the latent


VAE_PRESETS: dict[str, VAEModelConfig] = {
    # The demo's 64 px world at f = 4 (16x16x4 latents), no attention so that it trains on 32 px
    # crops: ~24 dB in ~3 CPU-minutes where widths 16/32 with attention on whole images reach ~20 dB.
    # f = 2 reaches ~30 dB in the same time, but the DiT cannot learn its latents in the demo's
    # minutes (docs/design.md §5).
    "demo": VAEModelConfig(widths=[32, 32], blocks_per_level=1, up_blocks=1, groups=8, heads=4, attention=False),
    "original": VAEModelConfig(),
}


class DiTModelConfig(BaseModel):
    """Tag-conditioned DiT architecture (the original: patch 2, 1024 wide, 16 deep, 16 heads)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    patch: int = 2
    width: int = 1024
    depth: int = 16
    heads: int = 16
    mlp_ratio: float = 2.0  # the original's value (DiT used 4.0)
    dropout: float = 0.1
    tag_layers: int = 2  # Transformer blocks of the tag encoder
    tag_heads: int = 16
    max_tags: int = 16  # tag sequence length after [cls] is max_tags + 1
    grad_checkpointing: bool = False


DIT_PRESETS: dict[str, DiTModelConfig] = {
    # Sized for the demo's 16x16x4 latents: patch 4 -> 16 tokens; mlp 2 as in the original; the demo
    # world has at most 9 tags per image, so 10 tag slots (the tag encoder costs per slot).
    "demo": DiTModelConfig(patch=4, width=256, depth=6, heads=4, tag_heads=4, mlp_ratio=2.0, dropout=0.0, max_tags=10),
    "original-264m": DiTModelConfig(),
}
