"""DiT training step (forward + backward + AdamW) images/s: ours vs diffusers' DiTTransformer2DModel.

Same width/depth/heads/patch/tokens/MLP ratio, same batch, dtype and optimiser, same run. The peer is
class-conditioned (its design); ours also runs its tag encoder on every step. Rounds alternate
between the two models, each lasts at least `--min-round` seconds, and the median round counts,
so background load hits both alike. Sizes (`--size`, default both demo and original256):

- demo: the demo preset, 16x16x4 latents, patch 4 -> 16 tokens (RESULT dit_train_step);
- original256: the original's token count (32x32 latents, patch 2 -> 256 tokens) at a CPU-sized width,
  384 wide, 6 deep, 6 heads, MLP 2 (RESULT dit_train_step_256);
- original-264m: the original's model itself, for GPUs (RESULT dit_train_step_260m).

    python benchmarks/dit_train_step.py                                   # demo + original256, CPU, fp32
    python benchmarks/dit_train_step.py --size demo --compile             # both models torch.compile'd
    python benchmarks/dit_train_step.py --size original-264m --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch

from models.diffusion import eps_loss, make_alpha_bar, q_sample
from models.dit import DiT
from tagdit.config import DIT_PRESETS, DiTModelConfig, TrainConfig
from tagdit.formats.checkpoints import count_parameters
from tagdit.train.optim import make_optimizer


@dataclass(frozen=True)
class Size:
    """One benchmarked model size: architecture, latent side, batch (CPU / GPU) and RESULT name."""

    model: DiTModelConfig
    latent: int
    batch_cpu: int
    batch_gpu: int
    result: str


SIZES = {
    "demo": Size(DIT_PRESETS["demo"], 16, 64, 64, "dit_train_step"),  # 64 px at f = 4
    # the original's 256 tokens (256 px at f = 8, patch 2) at a width a CPU trains in seconds per step
    "original256": Size(DiTModelConfig(patch=2, width=384, depth=6, heads=6, tag_heads=6, mlp_ratio=2.0, dropout=0.0,
                                   max_tags=16), 32, 8, 32, "dit_train_step_256"),
    "original-264m": Size(DIT_PRESETS["original-264m"], 32, 4, 32, "dit_train_step_260m"),
}
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


def prepare(size: Size, a: argparse.Namespace, device: torch.device) -> tuple[dict, int]:
    """Both models at `size`, warmed up (and compiled), as {name: run record}; and the batch."""
    cfg = size.model.model_copy(update={"grad_checkpointing": a.grad_checkpointing})
    batch = a.batch or (size.batch_cpu if device.type == "cpu" else size.batch_gpu)
    torch.manual_seed(0)
    ours = DiT(cfg, vocab_size=1000, latent_size=size.latent).to(device).train()
    peer = diffusers_peer(cfg, size.latent).to(device).train()
    if a.grad_checkpointing:
        peer.enable_gradient_checkpointing()
    x_t, t, eps, tags, labels = inputs(batch, size.latent, cfg.max_tags, device)
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
        sync(device)
        start = time.perf_counter()
        step()  # the first step compiles
        sync(device)
        first = time.perf_counter() - start
        for _ in range(2):
            step()
        runs[name] = {"step": step, "flops": flops, "params": count_parameters(model), "rates": [], "peak": 0,
                      "first": first}
    return runs, batch


def timed_round(run: dict, batch: int, device: torch.device, min_s: float) -> None:
    """Steps until `min_s` seconds have passed; appends images/s to run["rates"]."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, start = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - start < min_s:
        run["step"]()
        sync(device)
        steps += 1
    run["rates"].append(batch * steps / (time.perf_counter() - start))
    if device.type == "cuda":
        run["peak"] = max(run["peak"], torch.cuda.max_memory_allocated(device))


def report(name: str, run: dict, batch: int, device: torch.device) -> None:
    """One line per model: size, FLOPs, median rate with every round, first (compiling) step."""
    achieved = run["flops"] * run["rate"] / batch  # model FLOP/s
    rates = run["rates"]
    line = (f"{name}: {run['params'] / 1e6:.1f}M params, {run['flops'] / batch / 1e9:.3f} GFLOP per image, "
            f"{run['rate']:.1f} images/s (spread {min(rates):.1f}-{max(rates):.1f}, rounds "
            f"{[round(r, 1) for r in rates]}), {achieved / 1e12:.3f} TFLOP/s, first step {run['first']:.1f} s")
    if device.type == "cuda":
        name_gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name_gpu), None)
        if peak:
            line += f", MFU {100 * achieved / peak:.1f}% of {name_gpu} bf16 peak"
        line += f", peak memory {run['peak'] / 2**30:.2f} GiB (both models resident)"
    print(line)


def bench_size(size_name: str, a: argparse.Namespace, device: torch.device) -> None:
    """Warm both models up, alternate timed rounds, print both lines and the RESULT line."""
    size = SIZES[size_name]
    runs, batch = prepare(size, a, device)
    for _ in range(a.rounds):
        for run in runs.values():
            timed_round(run, batch, device, a.min_round)
    for name, run in runs.items():
        run["rate"] = statistics.median(run["rates"])
        report(name, run, batch, device)
    ours, peer = runs["ours"], runs["diffusers"]
    per_flop = (ours["rate"] * ours["flops"]) / (peer["rate"] * peer["flops"])
    print(f"config: size {size_name}, {(size.latent // size.model.patch) ** 2} tokens, width {size.model.width}, "
          f"depth {size.model.depth}, batch {batch}, {a.dtype}, {device}, {torch.get_num_threads()} threads, "
          f"compile {a.compile}, load average {os.getloadavg()[0]:.2f}; per FLOP ours/peer {per_flop:.2f}")
    print(f"RESULT {size.result} ours={ours['rate']:.1f} images/s baseline={peer['rate']:.1f} "
          f"ratio={ours['rate'] / peer['rate']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="both", choices=["both", *SIZES], help="both = demo + original256")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=None, help="default: per size (demo 64; original256 8 CPU / 32 GPU)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-round", type=float, default=1.0, help="seconds per round, at least")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (first step: compile time)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for size_name in (["demo", "original256"] if a.size == "both" else [a.size]):
        bench_size(size_name, a, device)


if __name__ == "__main__":
    main()
