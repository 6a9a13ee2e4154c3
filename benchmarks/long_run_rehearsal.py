"""A long run in small: a DiT trained with frequent checkpoints and retention, SIGKILLed and resumed twice.

The interrupted run must end where an uninterrupted one ends: the same weights, EMA and optimiser
state in its last checkpoint (exact on one machine with one thread count), and TensorBoard's
loss and learning-rate curves continuing without a jump. Both runs go through the training
entry point torchrun's ranks use (`python -m tasks.train_dit`), one process each, on CPU.

    python benchmarks/long_run_rehearsal.py [--steps 2000] [--every 100] [--keep 3]

RESULT: wall seconds of the interrupted run (with its restarts) vs the uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from latent_loader import unit_stats, write_shards  # benchmarks/ is the script folder

from tagdit.config import load_config
from tagdit.formats.checkpoints import Checkpoints, load_weights, read_checkpoint_meta
from tagdit.formats.latent_shards import latent_shard_name

TINY = ["dit.model=demo", "dit.model.patch=2", "dit.model.width=64", "dit.model.depth=3", "dit.model.heads=2",
        "dit.model.tag_heads=2", "dit.model.max_tags=8", "dit.model.dropout=0", "dit.train.device=cpu",
        "dit.train.batch_size=16", "dit.train.warmup_steps=50", "dit.train.lr=1e-3", "dit.train.loader_workers=1",
        "dit.val_samples=8"]


def write_config(root: Path, steps: int, every: int, keep: int) -> Path:
    cfg = load_config(None, [*TINY, f"dit.train.steps={steps}", f"dit.train.checkpoint_every={every}",
                             f"dit.train.keep_checkpoints={keep}", f"dit.train.log_every={max(1, every // 4)}",
                             f"dit.train.val_every={every}"])
    path = root / "config.json"
    path.write_text(cfg.model_dump_json())
    return path


def write_latents(root: Path) -> Path:
    latents = root / "latents"
    vocab = write_shards(latents, 512, per_shard=128, shape=(4, 8, 8))
    # a validation shard: the first train shard's samples
    (latents / latent_shard_name("val", 0)).write_bytes((latents / latent_shard_name("train", 0)).read_bytes())
    unit_stats((4, 8, 8), 512).save(latents)
    vocab.save(root / "vocab.json")
    return latents


def start(root: Path, config: Path, latents: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tasks.train_dit", "--config-json", str(config), "--latents", str(latents),
           "--vocab", str(root / "vocab.json"), "--out", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "ab"),
                            start_new_session=True)


def latest_step(out: Path) -> int:
    ckpt = Checkpoints(out).latest()
    return read_checkpoint_meta(ckpt).step if ckpt else 0


def train_to_end(root: Path, config: Path, latents: Path, out: Path, kill_after: list[int]) -> tuple[float, int]:
    """Train; SIGKILL once the latest checkpoint reaches each step in `kill_after`, then resume. (wall s, steps lost)."""
    out.mkdir(parents=True, exist_ok=True)
    t0, lost = time.perf_counter(), 0
    for target in [*kill_after, None]:
        proc = start(root, config, latents, out)
        if target is None:
            if proc.wait() != 0:
                raise RuntimeError(f"training failed: {out.with_suffix('.log').read_text()[-3000:]}")
            break
        while latest_step(out) < target:
            if proc.poll() is not None:
                raise RuntimeError(f"training ended before step {target}: {out.with_suffix('.log').read_text()[-3000:]}")
            time.sleep(0.05)
        time.sleep(0.2)  # mid-interval: the steps since the checkpoint are lost
        if proc.poll() is not None:
            raise RuntimeError(f"training finished before the kill after step {target}: give it more --steps")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        lost += max(0, last_logged_step(out) - latest_step(out))
    return time.perf_counter() - t0, lost


def scalars(out: Path) -> dict[str, dict[int, float]]:
    """train/loss and train/lr by step; a step logged twice (before a kill and after the resume) keeps its last value."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer({"run": str(out / "tb")}).Reload()
    acc = mux.GetAccumulator("run")
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in ("train/loss", "train/lr")}


def last_logged_step(out: Path) -> int:
    try:
        return max(scalars(out)["train/loss"], default=0)
    except Exception:
        return 0


def compare(a: Path, b: Path, keep: int) -> list[str]:
    """What differs between two runs' last checkpoints and curves (empty: identical)."""
    ca, cb = Checkpoints(a).require_latest(), Checkpoints(b).require_latest()
    diffs = [] if ca.name == cb.name else [f"last checkpoint {ca.name} vs {cb.name}"]
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_weights(ca / name)[0], load_weights(cb / name)[0]
        diffs += [f"{name}:{k}" for k in wa if not torch.equal(wa[k], wb[k])]
    sa, sb = (torch.load(c / "state.pt", weights_only=True) for c in (ca, cb))
    moments = lambda s: [t for st in s["optimizer"]["state"].values() for t in st.values()]  # noqa: E731
    if sa["step"] != sb["step"] or not all(torch.equal(x, y) for x, y in zip(moments(sa), moments(sb), strict=True)):
        diffs.append("optimizer state")
    if sa["ema_n_averaged"] != sb["ema_n_averaged"] or sa["scheduler"] != sb["scheduler"]:
        diffs.append("EMA count or schedule")
    curves_a, curves_b = scalars(a), scalars(b)
    for tag in curves_a:
        if curves_a[tag] != curves_b[tag]:
            steps = sorted(s for s in curves_a[tag] if curves_a[tag][s] != curves_b[tag].get(s))
            diffs.append(f"{tag} differs at steps {steps[:5]}")
    kept = sorted(p.name for p in b.glob("ckpt-*"))
    return diffs + ([f"retention kept {kept}"] if len(kept) > keep else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=3, help="train.keep_checkpoints")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, latents = write_config(root, a.steps, a.every, a.keep), write_latents(root)
        straight_s, _ = train_to_end(root, config, latents, root / "straight", [])
        kills = [a.steps * 3 // 10 // a.every * a.every or a.every, a.steps * 7 // 10 // a.every * a.every]
        resumed_s, lost = train_to_end(root, config, latents, root / "killed", kills)
        diffs = compare(root / "straight", root / "killed", a.keep)
        curves = scalars(root / "killed")["train/loss"]
    print(f"{a.steps} steps, checkpoint every {a.every}, keep {a.keep}; SIGKILLed after checkpoints {kills} "
          f"({lost} logged steps redone); loss {curves[min(curves)]:.4f} -> {curves[max(curves)]:.4f}")
    print("identical to the uninterrupted run" if not diffs else "DIFFERENT: " + "; ".join(diffs[:10]))
    print(f"RESULT long_run_rehearsal ours={resumed_s:.1f} s baseline={straight_s:.1f} s "
          f"ratio={straight_s / resumed_s:.3f} identical={'yes' if not diffs else 'no'} kills={len(kills)}")
    sys.exit(0 if not diffs else 1)


if __name__ == "__main__":
    main()
