"""Rehearse a long run: train through the torchrun rank entry, SIGKILL it at checkpoints, resume, and
say what differs from an uninterrupted run (last checkpoint's weights, EMA, optimiser state and
schedule; TensorBoard's loss and learning-rate curves; retention).

Used by the rehearsal benchmark (benchmarks/long_run_rehearsal.py) and its small-size test. Each
training is one process on CPU, one thread, so "identical" is exact on one machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tagdit.formats.checkpoints import Checkpoints, load_weights, read_checkpoint_meta


def start(config: Path, latents: Path, vocab: Path, out: Path) -> subprocess.Popen:
    """`python -m tasks.train_dit` (one rank) in its own session, logging to `<out>.log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tasks.train_dit", "--config-json", str(config), "--latents", str(latents),
           "--vocab", str(vocab), "--out", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "ab"),
                            start_new_session=True)


def latest_step(out: Path) -> int:
    ckpt = Checkpoints(out).latest()
    return read_checkpoint_meta(ckpt).step if ckpt else 0


def train_to_end(config: Path, latents: Path, vocab: Path, out: Path, kill_after: list[int]) -> tuple[float, int]:
    """Train; SIGKILL once the latest checkpoint reaches each step in `kill_after`, then resume. (wall s, steps lost)."""
    out.mkdir(parents=True, exist_ok=True)
    t0, lost = time.perf_counter(), 0
    for target in [*kill_after, None]:
        proc = start(config, latents, vocab, out)
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
            raise RuntimeError(f"training finished before the kill after step {target}: give it more steps")
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
    except Exception:  # no event file yet
        return 0


def compare(a: Path, b: Path, keep: int) -> list[str]:
    """What differs between two runs' last checkpoints and curves (empty: identical)."""
    import torch

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
