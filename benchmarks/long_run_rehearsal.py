"""A long run in small: a DiT trained with frequent checkpoints and retention, SIGKILLed and resumed twice.

The interrupted run must end where an uninterrupted one ends: the same weights, EMA and optimiser
state in its last checkpoint (exact on one machine with one thread count), and TensorBoard's
loss and learning-rate curves continuing without a jump. Both runs go through the training
entry point torchrun's ranks use (`python -m tasks.train_dit`), one process each, on CPU
(tagdit/train/rehearsal.py does the killing and the comparing).

    python benchmarks/long_run_rehearsal.py [--steps 2000] [--every 100] [--keep 3]

RESULT: wall seconds of the interrupted run (with its restarts) vs the uninterrupted one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from latent_loader import unit_stats, write_shards  # benchmarks/ is the script folder

from tagdit.config import load_config
from tagdit.formats.latent_shards import latent_shard_name
from tagdit.train.rehearsal import compare, scalars, train_to_end

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=3, help="train.keep_checkpoints")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, latents = write_config(root, a.steps, a.every, a.keep), write_latents(root)
        vocab = root / "vocab.json"
        straight_s, _ = train_to_end(config, latents, vocab, root / "straight", [])
        kills = [a.steps * 3 // 10 // a.every * a.every or a.every, a.steps * 7 // 10 // a.every * a.every]
        resumed_s, lost = train_to_end(config, latents, vocab, root / "killed", kills)
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
