"""An exactly resumable, deterministic stream of training batches from WebDataset tar shards.

Each epoch shuffles the shard order with (seed, epoch) and deals the shards round-robin to slots,
one slot per (rank, loader worker): slot k = rank · workers + worker reads shards k, k + K, k + 2K,
... of the epoch's order (K = world · workers), so a rank reads only its own shards. A slot streams
its shards through its own shuffle buffer (RNG seeded with (seed, epoch, slot)); a rank takes its
workers' samples in a fixed round-robin order (a worker whose share of the epoch is used up is
passed over) and starts the next epoch when all are. With fewer shards than slots every slot reads
all shards and keeps every K-th sample (logged, with how to reshard). Either way every sample is
seen once per epoch across all ranks and workers.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tagdit.data.prefetch import prefetch
from tagdit.train.loader_workers import END, WorkerProcess
from tagdit.train.tar_samples import tar_samples

log = logging.getLogger(__name__)

CHUNK = 16  # decoded examples per message from a loader worker


def sample_seed(seed: int, epoch: int, url: str, key: str) -> int:
    """A sample's augmentation seed: fixed by (seed, epoch, shard file name, key), whatever the split."""
    text = f"{seed}-{epoch}-{Path(url).name}-{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & 0x7FFFFFFF


def epoch_shards(urls: list[str], seed: int, epoch: int) -> list[str]:
    """All shards in epoch `epoch`'s order (the same on every rank)."""
    order = sorted(urls)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def slot_samples(urls: list[str], seed: int, epoch: int, slot: int, slots: int,
                 shuffle_buffer: int) -> Iterator[dict[str, Any]]:
    """Slot `slot` of `slots`: its raw samples of one epoch, shuffled, each with its `__seed__`."""
    order = epoch_shards(urls, seed, epoch)
    per_sample = len(order) < slots  # too few shards to deal out: every slot keeps every K-th sample
    rng = random.Random(f"{seed}-{epoch}-{slot}")
    buffer: list[dict[str, Any]] = []
    index = 0
    for url in order if per_sample else order[slot::slots]:
        for sample in tar_samples(url):
            index += 1
            if per_sample and (index - 1) % slots != slot:
                continue
            sample["__seed__"] = sample_seed(seed, epoch, url, sample["__key__"])
            buffer.append(sample)
            if len(buffer) >= shuffle_buffer:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def slot_messages(urls: list[str], decode: Callable[[dict[str, Any]], Any], seed: int, slot: int, slots: int,
                  shuffle_buffer: int, epoch: int, skip: int) -> Iterator[Any]:
    """One slot's decoded examples (None = dropped) in chunks, an END after each epoch, forever.

    Starts `skip` samples into `epoch`; skipped samples are read but not decoded.
    """
    while True:
        chunk = []
        for i, raw in enumerate(slot_samples(urls, seed, epoch, slot, slots, shuffle_buffer)):
            if i >= skip:
                chunk.append(decode(raw))
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        yield END
        epoch, skip = epoch + 1, 0


class EpochStream:
    """Deterministic, exactly resumable batches of one rank's share of WebDataset tar shards.

    `decode(raw)` turns a raw sample (`__key__`, `__seed__` and extension -> bytes) into a training
    example, or None to drop it; `__seed__` is a per-sample integer for augmentation randomness, the
    same whatever the rank/worker split (use it, not a global RNG). `workers` = 0 decodes in the
    prefetch thread; n > 0 decodes in n processes, each with its own slot of shards (0 and 1 give the
    same batches). The state is (epoch, samples each worker consumed, the next worker); resuming
    skips samples without decoding them.
    """

    def __init__(
        self,
        urls: list[str],
        decode: Callable[[dict[str, Any]], Any],
        batch_size: int,
        seed: int,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        collate: Callable[[list], Any] | None = None,
        prefetch: int = 2,
    ):
        if not urls:
            raise ValueError("EpochStream needs at least one shard")
        self.urls = sorted(str(u) for u in urls)
        self.decode, self.batch_size, self.seed = decode, batch_size, seed
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.workers, self.slots_per_rank = workers, max(1, workers)
        self.collate = collate or torch.utils.data.default_collate
        self.prefetch = prefetch
        self._state = self._start_of(0)

    @property
    def slots(self) -> int:
        """Loader slots over all ranks: the number of ways each epoch's shards are split."""
        return self.world_size * self.slots_per_rank

    def _start_of(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "consumed": [0] * self.slots_per_rank, "next": 0, "world": self.world_size}

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out."""
        return {**self._state, "consumed": list(self._state["consumed"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; a state of another split restarts its epoch (logged)."""
        consumed = state.get("consumed")
        if (not isinstance(consumed, list) or len(consumed) != self.slots_per_rank
                or state.get("world") != self.world_size):
            log.warning("stream position saved for another split (world %s, consumed %s); this one has world %d "
                        "and %d loader slots: epoch %d restarts from its first sample",
                        state.get("world"), consumed, self.world_size, self.slots_per_rank, int(state["epoch"]))
            self._state = self._start_of(int(state["epoch"]))
            return
        self._state = {"epoch": int(state["epoch"]), "consumed": [int(c) for c in consumed],
                       "next": int(state["next"]), "world": self.world_size}

    def _check_split(self) -> None:
        if len(self.urls) < self.slots:
            log.warning(
                "%d shards for %d loader slots (%d ranks x %d workers): every slot reads every shard and keeps "
                "1 sample in %d. For shard-level splitting write at least %d shards, e.g. "
                "--set shards.samples_per_shard=<train images / %d or fewer>",
                len(self.urls), self.slots, self.world_size, self.slots_per_rank, self.slots, self.slots,
                self.slots)

    def _source(self, w: int, epoch: int, skip: int) -> Iterator[Any]:
        """Worker `w`'s message stream, `skip` samples into `epoch`."""
        args = (self.urls, self.decode, self.seed, self.rank * self.slots_per_rank + w, self.slots,
                self.shuffle_buffer, epoch, skip)
        if not self.workers:
            return slot_messages(*args)
        return WorkerProcess(slot_messages, args, name=f"loader-{self.rank}-{w}")

    def _examples(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(example or None, stream position after it) forever, from the current position."""
        epoch, consumed, w = self._state["epoch"], list(self._state["consumed"]), self._state["next"]
        n = self.slots_per_rank
        sources: list[Iterator[Any]] = []
        pending: list[list[Any]] = [[] for _ in range(n)]
        try:
            sources.extend(self._source(i, epoch, consumed[i]) for i in range(n))
            while True:
                done = [False] * n
                while not all(done):
                    if not done[w] and not pending[w]:
                        message = next(sources[w])
                        done[w] = message is END
                        pending[w] = [] if done[w] else message[::-1]
                    if pending[w]:
                        consumed[w] += 1
                        position = {"epoch": epoch, "consumed": list(consumed), "next": (w + 1) % n,
                                    "world": self.world_size}
                        yield pending[w].pop(), position
                    w = (w + 1) % n
                if not any(consumed):
                    raise RuntimeError(f"no samples for rank {self.rank} of {self.world_size} in {self.urls}")
                epoch, consumed, w = epoch + 1, [0] * n, 0
        finally:
            for source in sources:
                getattr(source, "close", lambda: None)()

    def _batches(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(batch, stream position after it) forever, from the current position."""
        self._check_split()
        examples = []
        for example, state in self._examples():
            if example is not None:
                examples.append(example)
            if len(examples) == self.batch_size:
                yield self.collate(examples), state
                examples = []

    def __iter__(self) -> Iterator[Any]:
        """Batches, collated in a background thread `prefetch` batches ahead."""
        for batch, state in prefetch(self._batches(), self.prefetch, name="epoch-stream"):
            self._state = state
            yield batch
