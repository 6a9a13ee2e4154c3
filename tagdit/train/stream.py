"""An exactly resumable, deterministic stream of training batches from WebDataset tar shards.

Each epoch reads every sample once in a global order fixed by (seed, epoch) and the shards' sample
counts (`tagdit.train.epoch_order`): one slot per (rank, loader worker) reads its contiguous piece of
that order, slot k = rank · workers + worker of K = world · workers, from a few neighbouring shards,
read forward. A rank takes its workers' samples in a fixed round-robin order (a worker whose piece is
used up is passed over) and starts the next epoch when all are. The position (samples each worker
consumed) resumes exactly on the same split; on another split (a resume on more or fewer ranks) the
samples of the epoch that no old slot consumed are split anew, so the epoch still reads each once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tagdit.data.prefetch import prefetch
from tagdit.train.epoch_order import EpochOrder, Plan, piece, size
from tagdit.train.loader_workers import END, WorkerProcess
from tagdit.train.tar_samples import tar_sample_count

log = logging.getLogger(__name__)

CHUNK = 16  # decoded examples per message from a loader worker


def slot_messages(order: EpochOrder, decode: Callable[[dict[str, Any]], Any], plan: Plan, slot: int, slots: int,
                  epoch: int, skip: int) -> Iterator[Any]:
    """One slot's decoded examples (None = dropped) in chunks, an END after each epoch, forever.

    Starts `skip` samples into its piece of `epoch`; skipped samples are not read.
    """
    while True:
        chunk = []
        for raw in order.samples(epoch, piece(plan.remaining(epoch, order.n), slot, slots), skip):
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
    prefetch thread; n > 0 decodes in n processes, each with its own piece of the rank's samples (0
    and 1 give the same batches). `shuffle_buffer` samples are shuffled together in the epoch's order.
    `counts`: the shards' sample counts in `urls` order (default: counted from the tar headers).
    The state is (epoch, samples each worker consumed, the next worker) and the plan and order it
    belongs to; resuming reads no skipped sample.
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
        counts: list[int] | None = None,
    ):
        if not urls:
            raise ValueError("EpochStream needs at least one shard")
        counts = list(counts) if counts is not None else [tar_sample_count(str(u)) for u in urls]
        # in name order: a shard read from a store and one read here take the same place
        shards = sorted(zip((str(u) for u in urls), counts, strict=True), key=lambda s: (Path(s[0]).name, s[0]))
        self.urls = [u for u, _ in shards]
        self.order = EpochOrder(self.urls, [c for _, c in shards], seed, shuffle_buffer)
        self.decode, self.batch_size, self.seed = decode, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.workers, self.slots_per_rank = workers, max(1, workers)
        if self.order.n < self.slots:
            raise ValueError(f"{self.order.n} training samples for {self.slots} loader slots ({world_size} ranks x "
                             f"{self.slots_per_rank} loader workers): lower train.loader_workers or the ranks")
        self.collate = collate or torch.utils.data.default_collate
        self.prefetch = prefetch
        self.plan = Plan()
        self._state = self._start_of(0)

    @property
    def slots(self) -> int:
        """Loader slots over all ranks: the number of pieces each epoch's order is split into."""
        return self.world_size * self.slots_per_rank

    def _start_of(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "consumed": [0] * self.slots_per_rank, "next": 0}

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out, with the split, plan and order it counts in."""
        return {**self._state, "consumed": list(self._state["consumed"]), "world": self.world_size,
                "workers": self.slots_per_rank, "plan": self.plan.to_dict(), "order": self.order.fingerprint}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from every rank's `state_dict()` (rank order), saved on this split or another."""
        fingerprint, mine = self.order.fingerprint, states[min(self.rank, len(states) - 1)]
        if any(s.get("order") != fingerprint or s.get("workers") != states[0].get("workers") for s in states):
            log.warning("stream position saved for another order of the samples (other shards, counts, seed or "
                        "train.shuffle_buffer, or an older format): epoch %d restarts from its first sample",
                        int(mine["epoch"]))
            self.plan, self._state = Plan(), self._start_of(int(mine["epoch"]))
        elif len(states) == self.world_size and states[0]["workers"] == self.slots_per_rank:
            self.plan = Plan.from_dict(mine["plan"])
            self._state = {"epoch": int(mine["epoch"]), "consumed": [int(c) for c in mine["consumed"]],
                           "next": int(mine["next"])}
        else:
            self.plan = self._replan(states)
            self._state = self._start_of(self.plan.start)

    def _replan(self, states: list[dict[str, Any]]) -> Plan:
        """The positions no rank of `states` consumed, to be split over this split's slots (logged)."""
        old, workers = Plan.from_dict(states[0]["plan"]), int(states[0]["workers"])
        plan = old.after([(int(s["epoch"]), [int(c) for c in s["consumed"]]) for s in states], workers, self.order.n)
        left = size(plan.remaining(plan.start, self.order.n))
        log.info("stream resumed on another split (%d ranks x %d workers, was %d x %d): epoch %d continues with its "
                 "%d of %d samples not yet read", self.world_size, self.slots_per_rank, len(states), workers,
                 plan.start, left, self.order.n)
        return plan

    def _source(self, w: int, epoch: int, skip: int) -> Iterator[Any]:
        """Worker `w`'s message stream, `skip` samples into its piece of `epoch`."""
        args = (self.order, self.decode, self.plan, self.rank * self.slots_per_rank + w, self.slots, epoch, skip)
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
                        yield pending[w].pop(), {"epoch": epoch, "consumed": list(consumed), "next": (w + 1) % n}
                    w = (w + 1) % n
                epoch, consumed, w = epoch + 1, [0] * n, 0
        finally:
            for source in sources:
                getattr(source, "close", lambda: None)()

    def _batches(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(batch, stream position after it) forever, from the current position."""
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
