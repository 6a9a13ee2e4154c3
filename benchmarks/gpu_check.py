"""One GPU check: DiT and VAE training steps (bf16, eager vs torch.compile), the tagger on CUDA, a short train_dit stage.

Four parts, one line each, then RESULT lines:
  1. the original-264m DiT at 256 px (32x32x4 latents, patch 2) training step in bf16, eager and
     torch.compile'd: images/s, peak memory, MFU (analytic FLOPs as benchmarks/dit_train_step.py counts them);
  2. the original VAE's training step (models/vae.py original preset + models/vae_loss.py, VGG19 with random
     weights): bf16 vs fp32 images/s and peak memory;
  3. the tagger (the demo tagger, else its architecture untrained) through WDTagger with the default
     providers (CUDA first), fixed batch 1 and dynamic batch, vs the CPU provider;
  4. the original-256 preset's train_dit stage on synthetic 256 px latents: 50 steps (compilation), then
     resumed to --stage-steps, with validation, two sample grids (untrained original VAE) and checkpoints;
  5. what the hardware wants: the DiT step at 4 vs 64 images per GPU (the original's global batch 32
     over 8 GPUs is 4 each), VAE encoding in bf16 vs fp32, and one full checkpoint write.

    python benchmarks/gpu_check.py                 # one H100/H200: about 4 minutes, at most 8
    python benchmarks/gpu_check.py --smoke         # tiny sizes on CPU (< 2 minutes): the same code paths
    python benchmarks/gpu_check.py --set dit.train.batch_size=64   # extra overrides for part 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dit_train_step import PEAK_BF16, inputs, make_step, sync, train_flops  # noqa: E402

from tagdit.config import DIT_PRESETS, VAE_PRESETS, DiTModelConfig, TrainConfig, VAEModelConfig  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """What `--smoke` shrinks; the full sizes are the original's (256 px, f = 8, batch 32 / 16)."""

    dit: DiTModelConfig
    latent: int  # latent side: 32 = 256 px at f = 8
    dit_batch: int
    vae: VAEModelConfig
    vae_res: int
    vae_batch: int
    warmup: int  # untimed steps first (compilation, allocator, cuDNN autotuning)
    steps: int  # timed steps per round
    rounds: int
    compile_backend: str  # inductor on GPU; aot_eager in the smoke run (no C++ build: seconds, not a minute)
    tagger_images: int
    stage_steps: int
    per_gpu: tuple[int, int] = (4, 64)  # part 5: the DiT step's images per GPU, small vs full
    stage: list[str] = field(default_factory=list)  # part 4 overrides


FULL = Sizes(dit=DIT_PRESETS["original-264m"], latent=32, dit_batch=32, vae=VAE_PRESETS["original"], vae_res=256,
             vae_batch=16, warmup=3, steps=20, rounds=3, compile_backend="inductor", tagger_images=512, stage_steps=300,
             stage=["dit.train.compile=true", "dit.sample_every=150", "dit.val_samples=64"])
TINY_DIT = DiTModelConfig(patch=2, width=64, depth=2, heads=2, tag_heads=2, max_tags=4, mlp_ratio=4)
SMOKE = Sizes(dit=TINY_DIT, latent=8, dit_batch=8, vae=VAEModelConfig(widths=[8, 16], blocks_per_level=1,
              up_blocks=1, groups=4, heads=2), vae_res=16, vae_batch=2, warmup=1, steps=2, rounds=2, compile_backend="aot_eager",
              tagger_images=32, stage_steps=12, per_gpu=(2, 16),
              stage=["dit.model=demo", "dit.model.patch=2", "dit.model.width=64", "dit.model.depth=2",
                     "dit.model.heads=2", "dit.model.tag_heads=2", "dit.model.max_tags=4", "dit.train.batch_size=4",
                     "dit.train.precision=bf16", "dit.sample_every=6", "dit.sample_steps=4", "dit.val_samples=8",
                     "dit.train.shuffle_buffer=16"])


def timed(step, batch: int, s: Sizes, device: torch.device) -> tuple[float, float]:
    """(median images/s over the rounds, peak GiB) of a step, after the warm-up steps (compilation)."""
    for _ in range(s.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for _ in range(s.rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(s.steps):
            step()
        sync(device)
        rates.append(batch * s.steps / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(rates), peak


def peak_flops(device: torch.device) -> tuple[float, str]:
    """Dense bf16 peak of a known GPU; elsewhere the measured rate of a large matmul (so MFU reads as
    a share of what this device's matmul reaches)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if spec:
            return spec, f"{name} bf16 spec"
    n = 4096 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    (a @ b).sum().item()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0), f"measured {dtype} matmul"


def dit_part(s: Sizes, device: torch.device) -> dict[str, float]:
    """Part 1: the DiT step in bf16, eager then compiled."""
    from models.dit import DiT
    from tagdit.train.optim import make_optimizer

    torch.manual_seed(0)
    model = DiT(s.dit, vocab_size=1000, latent_size=s.latent).to(device).train()
    x_t, t, eps, tags, _ = inputs(s.dit_batch, s.latent, s.dit.max_tags, device)
    fwd = lambda m: m(x_t, t, tags)  # noqa: E731
    flops = train_flops(model, fwd, device)  # per step
    opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0), device)
    peak, peak_label = peak_flops(device)
    out = {}
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            model.compile(backend=s.compile_backend)
        t0 = time.perf_counter()
        rate, mem = timed(make_step(model, fwd, eps, opt, device, "bf16"), s.dit_batch, s, device)
        mfu = flops * rate / s.dit_batch / peak
        out[mode], out[f"{mode}_mfu"] = rate, mfu
        print(f"[1] DiT {mode} ({s.compile_backend if mode == 'compiled' else 'no compile'}): {rate:.1f} images/s, "
              f"MFU {100 * mfu:.1f}% of {peak / 1e12:.1f} TFLOP/s ({peak_label}), peak {mem:.2f} GiB, "
              f"{flops / s.dit_batch / 1e9:.2f} GFLOP/image, {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def vae_part(s: Sizes, device: torch.device) -> dict[str, float]:
    """Part 2: the VAE step (L1 + VGG19 perceptual with random weights + KL), bf16 and fp32."""
    from models.perceptual import VGGPerceptualLoss
    from models.vae import build_vae
    from models.vae_loss import VAELoss
    from tagdit.devices import autocast
    from tagdit.train.optim import make_optimizer
    from tagdit.train.vae import vae_loss

    torch.manual_seed(0)
    model = build_vae(s.vae).to(device).train()
    criterion = VAELoss(10.0, 1.0, 1e-5, perceptual=VGGPerceptualLoss(None)).to(device)
    opt = make_optimizer(model, TrainConfig(lr=1e-4), device)
    x = (torch.rand(s.vae_batch, 3, s.vae_res, s.vae_res, device=device) * 2 - 1).contiguous(
        memory_format=torch.channels_last)
    out = {}
    for dtype in ("bf16", "fp32"):
        t0 = time.perf_counter()

        def step(dtype=dtype):
            with autocast(device, dtype):  # the trainer's: bf16, or plain fp32
                loss, _ = vae_loss(model, x, 0, criterion=criterion, last_layer=model.last_layer)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        rate, mem = timed(step, s.vae_batch, s, device)
        out[dtype] = rate
        print(f"[2] VAE {dtype}: {rate:.1f} images/s at {s.vae_res} px, batch {s.vae_batch}, peak {mem:.2f} GiB, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return out


def fixed_batch_copy(src: Path, dst: Path) -> Path:
    """The tagger folder again with the model's batch dimension fixed to 1 (like some WD exports)."""
    import shutil

    import onnx

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "selected_tags.csv", dst / "selected_tags.csv")
    model = onnx.load(str(src / "model.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def tagger_part(s: Sizes, tmp: Path) -> dict[str, float]:
    """Part 3: images/s through WDTagger.probabilities, default providers (CUDA first) vs CPU."""
    from PIL import Image
    from tag_pipeline import model_dir

    from tagdit.data.onnx_session import default_providers
    from tagdit.data.tagger import WDTagger

    folder, what = model_dir(tmp)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(s.tagger_images)]
    out = {}
    variants = [("dynamic", folder, None), ("fixed1", fixed_batch_copy(folder, tmp / "fixed1"), None),
                ("cpu", folder, ["CPUExecutionProvider"])]
    for name, path, providers in variants:
        tagger = WDTagger.from_dir(path, batch_size=32, providers=providers)
        list(tagger.probabilities(imgs[:4]))  # session warm-up
        t0 = time.perf_counter()
        n = sum(1 for _ in tagger.probabilities(imgs))
        out[name] = n / (time.perf_counter() - t0)
        print(f"[3] tagger {name} ({what}): {out[name]:.1f} images/s, batch {tagger.fixed_batch or tagger.batch_size}, "
              f"providers {tagger.session.get_providers()}, {tagger.preprocess_threads} preprocessing threads",
              flush=True)
    out["cuda"] = "CUDAExecutionProvider" in default_providers()
    return out


def sample_grid_steps(tb_dir: Path) -> list[int]:
    """The steps of the `samples/grid` images TensorBoard holds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    ea.Reload()
    return sorted(e.step for e in ea.Images("samples/grid")) if "samples/grid" in ea.Tags()["images"] else []


def stage_part(s: Sizes, device: torch.device, tmp: Path, extra: list[str]) -> dict[str, float]:
    """Part 4: the original-256 train_dit stage on synthetic latents: 50 steps, then resumed to stage_steps."""
    from models.vae import build_vae
    from tagdit.config import load_config
    from tagdit.demo.stand_in_latents import write_latent_fixture
    from tagdit.formats.checkpoints import save_weights
    from tagdit.formats.latent_shards import LatentStats
    from tagdit.orchestrate.stage import StageRecord
    from tasks.train_dit import train_dit_stage

    n_train = 32 * s.stage_steps // 8 if s is FULL else 64  # a few epochs' worth of distinct latents
    latents = write_latent_fixture(tmp / "ds", n_train=n_train, n_val=64, shape=(4, s.latent, s.latent), per_shard=256)
    vae_cfg = s.vae if s is FULL else VAEModelConfig(widths=[8, 8, 8], blocks_per_level=1, up_blocks=1, groups=4)
    vae = build_vae(vae_cfg)  # untrained: the grids exercise sampling + decoding, not quality
    save_weights(tmp / "vae" / "ema.safetensors", vae.state_dict(), vae.cfg.model_dump())
    (tmp / "vae" / "meta.json").write_text('{"step": 0}')
    stats = LatentStats.load(latents)
    stats.vae_checkpoint = str(tmp / "vae")
    stats.save(latents)
    base = [f"data.root={tmp}", "data.name=ds", f"run.root={tmp}/runs", f"dit.train.device={device.type}",
            "dit.train.warmup_steps=50", "dit.train.log_every=50", f"dit.train.val_every={s.stage_steps // 2}",
            f"dit.train.checkpoint_every={s.stage_steps}", *s.stage, *extra]
    fake = {"out_dir": str(latents), "key": "k", "info": {}}
    ups = (StageRecord(stage="encode", fingerprint="lat", **fake), StageRecord(stage="shard", fingerprint="sh", **fake))
    first = min(50, s.stage_steps // 2)
    cfg = load_config(ROOT / "configs" / "original-256.yaml", [*base, f"dit.train.steps={first}"])
    t0 = time.perf_counter()
    train_dit_stage(cfg, *ups)
    warm = time.perf_counter() - t0
    cfg = load_config(ROOT / "configs" / "original-256.yaml", [*base, f"dit.train.steps={s.stage_steps}"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    rec = train_dit_stage(cfg, *ups)  # resumes at `first`
    secs = time.perf_counter() - t0
    rate = (s.stage_steps - first) * cfg.dit.train.batch_size / secs
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    grids = sample_grid_steps(cfg.run_dir / "dit" / "tb")
    print(f"[4] train_dit stage: steps {first} in {warm:.0f} s (start-up, compilation when on), then {s.stage_steps - first} resumed "
          f"steps at {rate:.1f} images/s incl. validation, sample grids and checkpoints; loss {rec.info['loss']:.4f}, "
          f"val loss {rec.info['val_loss']:.4f}, peak {mem:.2f} GiB, sample grids at steps {grids}", flush=True)
    return {"rate": rate, "loss": rec.info["loss"]}


def hardware_part(s: Sizes, device: torch.device, tmp: Path) -> dict[str, float]:
    """Part 5: the DiT step at a small and a full per-GPU batch, encode bf16 vs fp32, a checkpoint write."""
    from models.dit import DiT
    from models.vae import build_vae
    from tagdit.devices import autocast
    from tagdit.formats.checkpoints import Checkpoints
    from tagdit.train.optim import make_optimizer

    out: dict[str, float] = {}
    torch.manual_seed(0)
    model = DiT(s.dit, vocab_size=1000, latent_size=s.latent).to(device).train()
    opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0), device)
    for batch in s.per_gpu:
        x_t, t, eps, tags, _ = inputs(batch, s.latent, s.dit.max_tags, device)
        rate, mem = timed(make_step(model, lambda m, x_t=x_t, t=t, tags=tags: m(x_t, t, tags), eps, opt, device, "bf16"), batch, s, device)
        out[f"dit{batch}"] = rate
        print(f"[5] DiT eager bf16 at {batch} images per GPU: {rate:.1f} images/s, peak {mem:.2f} GiB", flush=True)
    vae = build_vae(s.vae).to(device).eval()
    x = torch.rand(s.vae_batch * 4, 3, s.vae_res, s.vae_res, device=device) * 2 - 1
    for dtype in ("bf16", "fp32"):
        def encode(dtype=dtype):
            with torch.no_grad(), autocast(device, dtype):
                vae.encode(x)

        out[f"encode_{dtype}"], _ = timed(encode, len(x), s, device)
        print(f"[5] VAE encode {dtype}: {out[f'encode_{dtype}']:.1f} images/s at {s.vae_res} px, batch {len(x)}",
              flush=True)
    t0 = time.perf_counter()
    ckpt = Checkpoints(tmp / "ckpt").save(1, model=model, ema=model, config=s.dit.model_dump(mode="json"),
                                          state={"optimizer": opt.state_dict()}, meta={})
    out["ckpt_s"] = time.perf_counter() - t0
    gb = sum(f.stat().st_size for f in ckpt.iterdir()) / 1e9
    print(f"[5] checkpoint write: {gb:.2f} GB in {out['ckpt_s']:.1f} s ({gb / out['ckpt_s']:.2f} GB/s)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, < 2 minutes)")
    p.add_argument("--device", default=None, help="default: cuda when present (--smoke: cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="part 4 config override key=value")
    a = p.parse_args()
    if not a.smoke and a.device is None and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: running the --smoke sizes on CPU")
        a.smoke = True
    s = SMOKE if a.smoke else FULL
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.smoke else "cpu"))
    if a.smoke:
        torch.set_num_threads(1)  # tiny models gain nothing from more, and lose a lot on shared cores
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    print(f"gpu_check: {'smoke' if a.smoke else 'full'} sizes on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        dit = dit_part(s, device)
        vae = vae_part(s, device)
        tag = tagger_part(s, Path(tmp))
        stage = stage_part(s, device, Path(tmp), a.overrides)
        hw = hardware_part(s, device, Path(tmp))
    print(f"total {time.perf_counter() - start:.0f} s")
    best = max(dit["eager_mfu"], dit["compiled_mfu"])
    print(f"RESULT gpu_dit_mfu ours={best:.3f} baseline=0.5 ratio={best / 0.5:.2f}")
    print(f"RESULT gpu_dit_compile ours={dit['compiled']:.1f} images/s baseline={dit['eager']:.1f} images/s "
          f"ratio={dit['compiled'] / dit['eager']:.2f}")
    print(f"RESULT gpu_vae_bf16 ours={vae['bf16']:.1f} images/s baseline={vae['fp32']:.1f} images/s "
          f"ratio={vae['bf16'] / vae['fp32']:.2f}")
    print(f"RESULT gpu_tagger ours={tag['dynamic']:.1f} images/s baseline={tag['cpu']:.1f} images/s "
          f"ratio={tag['dynamic'] / tag['cpu']:.2f} (cuda provider {'on' if tag['cuda'] else 'absent'}, "
          f"fixed batch 1: {tag['fixed1']:.1f} images/s)")
    bare = dit["compiled"] if any("compile=true" in o for o in s.stage + a.overrides) else dit["eager"]
    print(f"RESULT gpu_train_dit ours={stage['rate']:.1f} images/s baseline={bare:.1f} images/s "
          f"ratio={stage['rate'] / bare:.2f} (stage vs bare step)")
    small, full = s.per_gpu
    print(f"RESULT gpu_per_gpu_batch ours={hw[f'dit{full}']:.1f} images/s baseline={hw[f'dit{small}']:.1f} images/s "
          f"ratio={hw[f'dit{full}'] / hw[f'dit{small}']:.2f} ({full} vs {small} images per GPU)")
    print(f"RESULT gpu_encode_bf16 ours={hw['encode_bf16']:.1f} images/s baseline={hw['encode_fp32']:.1f} images/s "
          f"ratio={hw['encode_bf16'] / hw['encode_fp32']:.2f} (checkpoint write {hw['ckpt_s']:.1f} s)")


if __name__ == "__main__":
    main()
