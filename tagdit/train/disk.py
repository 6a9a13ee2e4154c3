"""Will a training run's checkpoints fit? Their projected bytes against the run folder's free space.

A checkpoint holds the weights, their EMA and AdamW's two moments, all float32: about 16 bytes per
parameter (4.2 GB for the original's 264M-parameter DiT). Kept checkpoints are pruned only after
the next one is complete, so `keep + 1` are on disk at the peak, plus the checkpoints a finished
stage's or an evaluation's record names (never pruned); with retention off every future checkpoint
stays. The projection runs before training starts, so a run that cannot fit is refused
in seconds instead of failing days later with `OSError 28`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)

WARN_MARGIN = 0.10  # warn when the free space left after the projection is under 10% of it


class DiskSpaceError(ValueError):
    """The run's checkpoints cannot fit on its file system (a setting to change, never retried)."""


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def state_bytes(*modules: nn.Module, ema: bool = True) -> int:
    """Bytes one checkpoint holds for these modules: weights (+ EMA copy) + AdamW's two moments.

    Works on modules built on the meta device (no memory is allocated to count).
    """
    total = 0
    for i, m in enumerate(modules):
        weights = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        moments = 2 * sum(p.numel() * 4 for p in m.parameters() if p.requires_grad)
        total += weights * (2 if ema and i == 0 else 1) + moments  # only the trained model has an EMA
    return total


def future_checkpoints(step: int, steps: int, every: int) -> int:
    """How many checkpoints a run at `step` still writes: every `every` steps and at the end."""
    if step >= steps:
        return 0
    return steps // every - step // every + (steps % every != 0)


def peak_new(existing: int, future: int, keep: int | None, pinned: int = 0) -> int:
    """Checkpoints added to the disk at the peak: pruning to `keep` happens after each new one is complete.

    `pinned` of the `existing` are named by a record and never pruned: once training passes them they
    sit beside the `keep` newest, so the peak is `pinned + keep + 1` (an upper bound for a short run).
    """
    if future == 0:
        return 0
    if keep is None:
        return future
    return min(existing + future, max(existing, pinned + keep) + 1) - existing


def check_disk_space(out_dir: Path, ckpt_bytes: int, *, step: int, steps: int, every: int, keep: int | None,
                     section: str, what: str, pinned: int = 0) -> int:
    """Refuse (DiskSpaceError) a run whose checkpoints cannot fit `out_dir`'s file system; warn under 10% margin.

    `ckpt_bytes`: one checkpoint's size; `section`: the config section (`dit`) named in the message;
    `pinned`: checkpoints on disk that a record names (never pruned). Returns the projected bytes.
    """
    existing = [c for c in out_dir.glob("ckpt-[0-9]*") if c.is_dir()]
    n_new = peak_new(len(existing), future_checkpoints(step, steps, every), keep, pinned)
    need = n_new * ckpt_bytes
    free = shutil.disk_usage(out_dir).free
    pins = f" + {pinned} a record names" if pinned else ""
    kept = (f"{section}.train.keep_checkpoints={keep}: {keep} kept{pins} + the one being written"
            if keep is not None else f"{section}.train.keep_checkpoints is unset: every checkpoint is kept")
    facts = (f"{what} needs {gb(need)} more for its checkpoints ({n_new} x {gb(ckpt_bytes)}; {kept}; one every "
             f"{section}.train.checkpoint_every={every} of {steps} steps, {len(existing)} on disk now) and "
             f"{out_dir} has {gb(free)} free")
    if need > free:
        raise DiskSpaceError(f"{facts}. Free some space, lower {section}.train.keep_checkpoints (>= 1), raise "
                             f"{section}.train.checkpoint_every, or put run.root on a larger disk.")
    if need and free - need < WARN_MARGIN * need:
        log.warning("%s: less than %.0f%% to spare; TensorBoard logs and sample grids need some too",
                    facts, 100 * WARN_MARGIN)
    else:
        log.info("%s", facts)
    return need
