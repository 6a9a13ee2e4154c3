"""Sampling with classifier-free guidance, images/s: ours vs diffusers' DiT, in two rows: DDIM 50
steps (vs DDIMScheduler) and DPM-Solver++(2M) 20 steps (vs DPMSolverMultistepScheduler).

Both sides batch the two CFG branches into one forward per step, no x0 clipping, same sizes,
batch, dtype and run; rounds alternate over all four runs and the median counts. Ours computes the
tag embeddings once per sampling run (they do not depend on x_t or t); the peer embeds its class
labels per step.

    python benchmarks/dit_sampling.py                                     # demo preset, CPU, fp32
    python benchmarks/dit_sampling.py --preset original-264m --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.diffusion import make_alpha_bar
from models.dit import DiT
from models.sampling import sample_latents
from tagdit.config import DIT_PRESETS

LATENT = {"demo": 16, "original-264m": 32}  # demo: 64 px at f = 4, seed: 256 px at f = 8
NULL_CLASS = 1000  # diffusers' DiT keeps one extra label embedding for the unconditional branch


def diffusers_peer(cfg, latent: int):
    from diffusers import DiTTransformer2DModel
    from diffusers.models.attention import FeedForward

    peer = DiTTransformer2DModel(num_attention_heads=cfg.heads, attention_head_dim=cfg.width // cfg.heads,
                                 in_channels=4, num_layers=cfg.depth, sample_size=latent, patch_size=cfg.patch,
                                 num_embeds_ada_norm=1000)
    if cfg.mlp_ratio != 4.0:
        for block in peer.transformer_blocks:
            block.ff = FeedForward(cfg.width, activation_fn="gelu-approximate", inner_dim=int(cfg.width * cfg.mlp_ratio))
    return peer


def peer_scheduler(sampler: str, steps: int):
    """diffusers' scheduler for our sampler: DDIM (eta 0, no clipping) or DPM-Solver++(2M) (its defaults)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddim":
        sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    else:
        sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def peer_sample(peer, labels, shape, sched, scale: float, generator, device):
    """diffusers' DiTPipeline loop: batched CFG, one `sched.step` per step."""
    x = torch.randn(shape, generator=generator, device=generator.device).to(device)
    y = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    for t in sched.timesteps:
        eps = peer(torch.cat([x, x]), t.expand(2 * len(x)).to(device), y).sample  # (2B, C, H, W)
        e_cond, e_null = eps.chunk(2)
        x = sched.step(e_null + scale * (e_cond - e_null), t, x).prev_sample
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", choices=sorted(DIT_PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--n", type=int, default=None, help="images per run (default: 16 demo / 32 seed)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--dpm-steps", type=int, default=20, help="DPM-Solver++(2M) steps")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = DIT_PRESETS[a.preset].model_copy(update={"dropout": 0.0})
    latent, n = LATENT[a.preset], a.n or (16 if a.preset == "demo" else 32)
    torch.manual_seed(0)
    ours = DiT(cfg, vocab_size=1000, latent_size=latent).to(device).eval()
    peer = diffusers_peer(cfg, latent).to(device).eval()
    g = torch.Generator().manual_seed(0)
    tags = torch.randint(3, 1000, (n, cfg.max_tags + 1), generator=g)
    tags[:, 0], tags[:, 8:] = 2, 0
    null = torch.tensor([[2] + [0] * cfg.max_tags])
    labels = torch.randint(0, 1000, (n,), generator=g).to(device)
    alpha_bar = make_alpha_bar("cosine", 1000)
    shape = (n, 4, latent, latent)

    def run_ours(sampler: str, steps: int):
        return lambda: sample_latents(ours, tags, null, alpha_bar=alpha_bar, shape=shape, steps=steps, sampler=sampler,
                                      scale=4.0, generator=torch.Generator().manual_seed(0))

    def run_peer(sampler: str, steps: int):
        return lambda: peer_sample(peer, labels, shape, peer_scheduler(sampler, steps), 4.0,
                                   torch.Generator().manual_seed(0), device)

    fns = {"ours ddim": run_ours("ddim", a.steps), "diffusers ddim": run_peer("ddim", a.steps),
           "ours dpmpp_2m": run_ours("dpmpp_2m", a.dpm_steps), "diffusers dpmpp_2m": run_peer("dpmpp_2m", a.dpm_steps)}
    rates: dict[str, list[float]] = {name: [] for name in fns}
    peaks = dict.fromkeys(rates, 0)
    for r in range(a.rounds + 1):  # round 0 warms up
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
                out = fn()
            assert torch.isfinite(out).all()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
            if r > 0:
                rates[name].append(n / (time.perf_counter() - start))
    for name, rs in rates.items():
        mem = f", peak memory {peaks[name] / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"{name}: {statistics.median(rs):.2f} images/s (rounds {[round(x, 2) for x in rs]}){mem}")
    print(f"config: preset {a.preset}, {(latent // cfg.patch) ** 2} tokens, {n} images, {a.steps} DDIM steps, "
          f"{a.dpm_steps} DPM-Solver++(2M) steps, CFG 4, {a.dtype}, {device}")
    for sampler, key in (("ddim", "dit_sampling"), ("dpmpp_2m", "dit_sampling_dpmpp")):
        ours_r, base_r = statistics.median(rates[f"ours {sampler}"]), statistics.median(rates[f"diffusers {sampler}"])
        print(f"RESULT {key} ours={ours_r:.2f} images/s baseline={base_r:.2f} ratio={ours_r / base_r:.2f}")


if __name__ == "__main__":
    main()
