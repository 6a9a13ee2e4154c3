"""DiT training step (forward + backward + AdamW) images/s: ours vs diffusers' DiTTransformer2DModel.

Same width/depth/heads/patch/tokens/MLP ratio, same batch, dtype and optimiser, same run. The peer is
class-conditioned (its design); ours also runs its tag encoder on every step. Rounds alternate
between the two models and the median round counts, so background load hits both alike.

    python benchmarks/dit_train_step.py                                   # demo preset, CPU, fp32
    python benchmarks/dit_train_step.py --preset seed-260m --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.diffusion import eps_loss, make_alpha_bar, q_sample
from models.dit import DiT
from tagdit.config import DIT_PRESETS, TrainConfig
from tagdit.train.checkpoints import count_parameters
from tagdit.train.optim import make_optimizer

LATENT = {"demo": 16, "seed-260m": 32}  # demo: 64 px at f = 4, seed: 256 px at f = 8
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}  # dense TFLOP/s


def diffusers_peer(cfg, latent: int):
    """diffusers' DiT with our sizes (its FFN is 4x; set to our MLP ratio when that differs)."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.attention import FeedForward

    peer = DiTTransformer2DModel(num_attention_heads=cfg.heads, attention_head_dim=cfg.width // cfg.heads,
                                 in_channels=4, num_layers=cfg.depth, dropout=cfg.dropout, sample_size=latent,
                                 patch_size=cfg.patch, num_embeds_ada_norm=1000)
    if cfg.mlp_ratio != 4.0:
        for block in peer.transformer_blocks:
            block.ff = FeedForward(cfg.width, dropout=cfg.dropout, activation_fn="gelu-approximate",
                                   inner_dim=int(cfg.width * cfg.mlp_ratio))
    return peer


def inputs(batch: int, latent: int, max_tags: int, device, seed: int = 0):
    """Latents, timesteps, noise, tag ids ([cls] + 3..max_tags tags, padded) and class labels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    eps = torch.randn(z.shape, generator=g)
    n = torch.randint(3, max_tags + 1, (batch, 1), generator=g)
    tags = torch.randint(3, 1000, (batch, max_tags + 1), generator=g)
    tags = torch.where(torch.arange(max_tags + 1) <= n, tags, 0)
    tags[:, 0] = 2
    labels = torch.randint(0, 1000, (batch,), generator=g)
    x_t = q_sample(z, t, eps, make_alpha_bar("cosine", 1000))
    return [a.to(device) for a in (x_t, t, eps, tags, labels)]


def make_step(model, forward, eps, opt, device, dtype):
    """One training step: autocast forward, L_simple, backward, AdamW."""
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = eps_loss(forward(model), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_flops(model, forward, device) -> float:
    """Model FLOPs of one forward + backward (matmuls and attention, via FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        forward(model).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", choices=sorted(DIT_PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=None, help="default: 64 (demo) / 32 (seed)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="steps per round (default: 10 CPU / 20 GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = DIT_PRESETS[a.preset].model_copy(update={"grad_checkpointing": a.grad_checkpointing})
    latent, batch = LATENT[a.preset], a.batch or (64 if a.preset == "demo" else 32)
    steps = a.steps or (10 if device.type == "cpu" else 20)
    torch.manual_seed(0)
    ours = DiT(cfg, vocab_size=1000, latent_size=latent).to(device).train()
    peer = diffusers_peer(cfg, latent).to(device).train()
    if a.grad_checkpointing:
        peer.enable_gradient_checkpointing()
    x_t, t, eps, tags, labels = inputs(batch, latent, cfg.max_tags, device)
    train_cfg = TrainConfig(lr=1e-4, weight_decay=0.0)
    runs = {}
    for name, model, fwd in (
        ("ours", ours, lambda m: m(x_t, t, tags)),
        ("diffusers", peer, lambda m: m(x_t, t, labels).sample),
    ):
        flops = train_flops(model, fwd, device)
        if a.compile:
            model.compile()
        step = make_step(model, fwd, eps, make_optimizer(model, train_cfg, device), device, a.dtype)
        for _ in range(3):  # warm-up (and compilation)
            step()
        runs[name] = {"step": step, "flops": flops, "params": count_parameters(model), "rates": [], "peak": 0}
    for _ in range(a.rounds):
        for run in runs.values():
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(steps):
                run["step"]()
            sync(device)
            run["rates"].append(batch * steps / (time.perf_counter() - start))
            if device.type == "cuda":
                run["peak"] = max(run["peak"], torch.cuda.max_memory_allocated(device))
    for name, run in runs.items():
        run["rate"] = statistics.median(run["rates"])
        achieved = run["flops"] * run["rate"] / batch  # model FLOP/s
        line = (f"{name}: {run['params'] / 1e6:.1f}M params, {run['flops'] / batch / 1e9:.3f} GFLOP per image, "
                f"{run['rate']:.1f} images/s (rounds {[round(r, 1) for r in run['rates']]}), {achieved / 1e12:.3f} TFLOP/s")
        if device.type == "cuda":
            name_gpu = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16.items() if k in name_gpu), None)
            if peak:
                line += f", MFU {100 * achieved / peak:.1f}% of {name_gpu} bf16 peak"
            line += f", peak memory {run['peak'] / 2**30:.2f} GiB (both models resident)"
        print(line)
    ours_r, base_r = runs["ours"]["rate"], runs["diffusers"]["rate"]
    print(f"config: preset {a.preset}, {(latent // cfg.patch) ** 2} tokens, batch {batch}, {a.dtype}, {device}")
    print(f"RESULT dit_train_step ours={ours_r:.1f} images/s baseline={base_r:.1f} ratio={ours_r / base_r:.2f}")


if __name__ == "__main__":
    main()
