"""Resuming a run across ranks: the checkpoint is read once, by rank 0, and broadcast to the others;
each rank gets its stream position (every rank's, so the stream can re-split an epoch for another
number of ranks) and its RNG state (its own, or on another number of ranks a fresh one seeded with
seed, step and rank: no rank copies another's).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tagdit.formats.checkpoints import (
    load_weights,
    read_checkpoint_meta,
    rng_state,
    seed_everything,
    set_rng_state,
)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for rank `rank`'s random draws at optimiser step `step` of a run seeded with `seed`."""
    text = f"{seed}-{step}-{rank}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & 0x7FFFFFFFFFFFFFFF


def rank_states(stream: Any, world: int) -> list[dict[str, Any]]:
    """Every rank's stream position and RNG state, in rank order (a collective under DDP)."""
    mine = {"stream": stream.state_dict(), "rng": rng_state()}
    if world == 1:
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)
    return states


def restore_rank(stream: Any, state: dict[str, Any], seed: int, rank: int, world: int) -> None:
    """This rank's stream position (from every rank's) and RNG: its own on the same number of ranks, else fresh."""
    ranks = state.get("ranks") or [{"stream": state["stream"], "rng": state["rng"]}]  # before per-rank states
    stream.load_state_dict([r["stream"] for r in ranks])
    if len(ranks) == world:
        set_rng_state(ranks[rank]["rng"])
    else:
        seed_everything(step_seed(seed, int(state["step"]), rank))


def read_checkpoint(ckpt: Path) -> dict[str, Any]:
    """A checkpoint folder's contents: raw and EMA weights, `state.pt`, the metrics of `meta.json`."""
    return {"model": load_weights(ckpt / "model.safetensors")[0], "ema": load_weights(ckpt / "ema.safetensors")[0],
            "state": torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True),
            "metrics": dict(read_checkpoint_meta(ckpt).metrics), "path": str(ckpt)}


def load_checkpoint(ckpt: Path | None, rank: int, world: int, device: torch.device) -> dict[str, Any] | None:
    """`read_checkpoint(ckpt)` read by rank 0 alone (its `ckpt` decides) and broadcast; None for no checkpoint."""
    if world == 1:
        return read_checkpoint(ckpt) if ckpt is not None else None
    return broadcast(read_checkpoint(ckpt) if rank == 0 and ckpt is not None else None, rank, device)


@dataclass(frozen=True)
class _Tensor:
    """Where a tensor was in a broadcast object: its place in the tensor list, shape and dtype."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _split(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """`obj` with each tensor replaced by a `_Tensor` and appended to `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Tensor(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: _split(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_split(v, tensors) for v in obj)
    return obj


def _join(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Tensor):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_join(v, tensors) for v in obj)
    return obj


def _slots(obj: Any) -> list[_Tensor]:
    if isinstance(obj, _Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
    return [s for v in values for s in _slots(v)]


def broadcast(obj: Any, rank: int, device: torch.device) -> Any:
    """Rank 0's `obj` on every rank: its structure pickled, its tensors sent by the backend (on `device`
    under NCCL), each arriving on the CPU as `torch.load(map_location="cpu")` would give it."""
    tensors: list[torch.Tensor] = []
    skeleton = [_split(obj, tensors) if rank == 0 else None]
    dist.broadcast_object_list(skeleton, src=0)
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    received = []
    for slot in sorted(_slots(skeleton[0]), key=lambda s: s.index):
        t = tensors[slot.index].to(on).contiguous() if rank == 0 else torch.empty(slot.shape, dtype=slot.dtype, device=on)
        dist.broadcast(t, src=0)
        received.append(t.cpu() if rank != 0 else tensors[slot.index])
    return _join(skeleton[0], received)
