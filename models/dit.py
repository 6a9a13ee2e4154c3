"""Tag-conditioned latent Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers") as the original built it: adaLN-Zero blocks over latent patches, conditioned on
c = t_emb + cls_emb, where cls_emb is the [cls] output of a small Transformer over the image's tags.

Unlike the original, the MLP residual is gated by gate_mlp (the original reused gate_msa there).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.config import DiTModelConfig
from models.diffusion import make_alpha_bar

log = logging.getLogger(__name__)

PAD_ID = 0  # tag id 0 is padding (vocab.json: <pad>, <unk>, <cls>, ...)


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C) patches in row-major order, each flattened (p, q, c)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, p*p*C)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); the inverse of `patchify`."""
    B, N, D = x.shape
    C = D // (p * p)
    x = x.reshape(B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, w * p)  # (B, C, H, W)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift with per-sample (B, D) parameters."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # (B, N, D)


def sincos_pos_embed(width: int, h: int, w: int) -> Tensor:
    """2-D sine-cosine table (B-less, (h*w, width)) used to initialise the learned position embedding."""
    def one_axis(dim: int, pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        out = pos.reshape(-1, 1).double() * omega  # (N, dim/2)
        return torch.cat([out.sin(), out.cos()], dim=1)

    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([one_axis(width // 2, gy), one_axis(width // 2, gx)], dim=1).float()  # (N, W)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (integer) timestep, 256 frequencies -> MLP."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, W)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        B, Nq, D = q.shape
        H = self.heads
        q = q.view(B, Nq, H, D // H).transpose(1, 2)  # (B, H, Nq, Dh)
        k = k.view(B, k.shape[1], H, D // H).transpose(1, 2)  # (B, H, N, Dh)
        v = v.view(B, v.shape[1], H, D // H).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, Nq, Dh)
        return self.proj(o.transpose(1, 2).reshape(B, Nq, D))  # (B, Nq, D)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, N, D)
        return self._attend(q, k, v, mask)

    def forward_first_query(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention output for token 0 only (keys/values from every token): (B, 1, D)."""
        D = x.shape[-1]
        q = F.linear(x[:, :1], self.qkv.weight[:D], self.qkv.bias[:D])  # (B, 1, D)
        k, v = F.linear(x, self.qkv.weight[D:], self.qkv.bias[D:]).chunk(2, dim=-1)  # 2 x (B, N, D)
        return self._attend(q, k, v, mask)


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear (exact erf GELU, as the original's Keras `gelu`; faster on CPU than tanh)."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class TagBlock(nn.Module):
    """Pre-LN Transformer encoder block (FFN 4x, GELU) with a key padding mask."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.mlp = Mlp(width, 4 * width, dropout)

    def forward(self, x: Tensor, mask: Tensor, first_only: bool = False) -> Tensor:
        if first_only:  # only token 0 ([cls]) is read after the last block: skip the other queries
            x = x[:, :1] + self.attn.forward_first_query(self.norm1(x), mask)  # (B, 1, D)
        else:
            x = x + self.attn(self.norm1(x), mask)  # (B, L, D)
        return x + self.mlp(self.norm2(x))


class TagEncoder(nn.Module):
    """Tag ids (B, L), [cls] first, 0 = pad -> the [cls] output (B, W); no positions: tags are a set."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList([TagBlock(width, heads, dropout) for _ in range(layers)])

    def forward(self, tags: Tensor) -> Tensor:
        x = self.embed(tags)  # (B, L, W)
        mask = (tags != PAD_ID)[:, None, None, :]  # (B, 1, 1, L): attend to real tokens only
        for i, block in enumerate(self.blocks):
            x = block(x, mask, first_only=i == len(self.blocks) - 1)
        return x[:, 0]  # (B, W)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning; both residuals gated (gate_msa, gate_mlp)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        # gated residuals as one addcmul each: x + gate * f(x) in one pass over (B, N, D), not two
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> linear to patch pixels."""

    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


class DiT(nn.Module):
    """ε-prediction DiT: forward(x_t (B, C, H, W), t (B,), tags (B, L)) -> ε (B, C, H, W).

    `schedule`/`timesteps` name the noise schedule it is trained to invert (see `alpha_bar`); they
    travel with its checkpoints, so sampling never depends on the current config.
    """

    def __init__(self, cfg: DiTModelConfig, vocab_size: int, latent_size: int, in_channels: int = 4,
                 schedule: str = "cosine", timesteps: int = 1000):
        super().__init__()
        if latent_size % cfg.patch:
            raise ValueError(f"latent size {latent_size} is not divisible by patch {cfg.patch}")
        self.cfg, self.vocab_size, self.latent_size, self.in_channels = cfg, vocab_size, latent_size, in_channels
        self.schedule, self.timesteps = schedule, timesteps
        self.grid = latent_size // cfg.patch
        W = cfg.width
        self.x_embedder = nn.Linear(cfg.patch * cfg.patch * in_channels, W)  # = a p x p stride-p conv
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, W))  # learned
        self.t_embedder = TimestepEmbedder(W)
        self.tag_encoder = TagEncoder(vocab_size, W, cfg.tag_layers, cfg.tag_heads, cfg.dropout)
        self.blocks = nn.ModuleList([DiTBlock(W, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(W, cfg.patch, in_channels)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All initialisation in one place, as facebookresearch/DiT (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed(self.cfg.width, self.grid, self.grid).unsqueeze(0))
        nn.init.normal_(self.tag_encoder.embed.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):  # output starts at 0
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def config_dict(self) -> dict[str, Any]:
        """Everything `load_dit` needs to rebuild this model (stored in checkpoint metadata)."""
        return {
            "model": self.cfg.model_dump(),
            "vocab_size": self.vocab_size,
            "latent_size": self.latent_size,
            "in_channels": self.in_channels,
            "schedule": self.schedule,
            "timesteps": self.timesteps,
        }

    @property
    def alpha_bar(self) -> Tensor:
        """ᾱ (T,) float64 of the noise schedule this model was trained with (CPU)."""
        return make_alpha_bar(self.schedule, self.timesteps)

    def encode_tags(self, tags: Tensor) -> Tensor:
        """Tag ids (B, L) -> condition embedding (B, W); constant over a sampling run, so cacheable."""
        return self.tag_encoder(tags)

    def forward_with_cond(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """ε prediction given a precomputed tag embedding y = encode_tags(tags)."""
        p = self.cfg.patch
        x = self.x_embedder(patchify(x_t, p)) + self.pos_embed  # (B, N, W)
        c = self.t_embedder(t) + y  # (B, W)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)  # (B, N, p*p*C)
        return unpatchify(x, p, self.grid, self.grid)  # (B, C, H, W)

    def forward(self, x_t: Tensor, t: Tensor, tags: Tensor) -> Tensor:
        return self.forward_with_cond(x_t, t, self.encode_tags(tags))


def build_dit(config: dict[str, Any], schedule: str | None = None, timesteps: int | None = None) -> DiT:
    """A DiT from `DiT.config_dict()` output (e.g. a checkpoint's stored config).

    The stored noise schedule wins; `schedule`/`timesteps` are only the fallback for checkpoints
    written before it was stored (logged), and such a checkpoint without a fallback is an error.
    """
    if "schedule" not in config or "timesteps" not in config:
        if schedule is None or timesteps is None:
            raise ValueError("this DiT checkpoint does not record its noise schedule: pass schedule= and timesteps=")
        log.warning("DiT checkpoint predates stored noise schedules: assuming the config's %s schedule, T=%d",
                    schedule, timesteps)
        config = {"schedule": schedule, "timesteps": timesteps, **config}
    return DiT(
        DiTModelConfig.model_validate(config["model"]),
        vocab_size=int(config["vocab_size"]),
        latent_size=int(config["latent_size"]),
        in_channels=int(config.get("in_channels", 4)),
        schedule=str(config["schedule"]),
        timesteps=int(config["timesteps"]),
    )
