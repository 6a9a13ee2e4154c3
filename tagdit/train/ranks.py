"""The per-rank set-up every trainer begins with: join the torchrun group, pick the device, seed the
initial weights (`start_rank`), and stream this rank's share of the samples (`epoch_stream`)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tagdit.config import TrainConfig
from tagdit.devices import select_device
from tagdit.train.nodes import init_distributed
from tagdit.train.stream import EpochStream
from tagdit.train.tar_samples import tar_sample_count

COUNT_THREADS = 16  # shards counted at once


@dataclass(frozen=True)
class Rank:
    """This process's place in training: its rank, the number of ranks, its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_rank(tc: TrainConfig, section: str) -> Rank:
    """Join the torchrun group (if any), check the batch splits into micro-batches, pick the device, seed the init."""
    rank, world, _ = init_distributed()
    if tc.batch_size % (world * tc.grad_accum):
        raise ValueError(f"{section}.train.batch_size {tc.batch_size} does not split into {world} processes x "
                         f"{tc.grad_accum} micro-batches (grad_accum): make it a multiple of {world * tc.grad_accum}")
    device = select_device(tc.device)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    return Rank(rank, world, device)


def shard_counts(urls: list[str], r: Rank, count: Callable[[str], int] = tar_sample_count) -> list[int]:
    """The shards' sample counts, `count(url)` each, read by rank 0 alone (several at once: a shard in a
    store is a network read) and broadcast."""
    counts: list[list[int] | None] = [None]
    if r.is_main:
        with ThreadPoolExecutor(COUNT_THREADS) as pool:
            counts = [list(pool.map(count, urls))]
    if r.world > 1:
        dist.broadcast_object_list(counts, src=0)
    return counts[0]  # type: ignore[return-value]


def epoch_stream(urls: list[str], decode: Callable[[dict[str, Any]], Any], tc: TrainConfig, r: Rank,
                 count: Callable[[str], int] = tar_sample_count) -> EpochStream:
    """This rank's share of each epoch's sample order as resumable micro-batches of batch_size / (world · grad_accum).

    `count(url)`: a shard's number of samples (default: from its tar headers).
    """
    return EpochStream(urls, decode, batch_size=tc.batch_size // (r.world * tc.grad_accum), seed=tc.seed,
                       shuffle_buffer=tc.shuffle_buffer, rank=r.rank, world_size=r.world, workers=tc.loader_workers,
                       counts=shard_counts(urls, r, count))
