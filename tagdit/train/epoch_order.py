"""Each epoch's global sample order, sliced by rank and loader worker (Mosaic streaming's idea).

Epoch e's order is a permutation of all the training samples that depends only on (seed, epoch,
block) and the shards' sample counts, never on how many ranks read it: the shards in an order
shuffled with (seed, epoch), concatenated, then each run of `block` consecutive samples shuffled
(seeded with seed, epoch and the run's index). Neighbouring positions of the order so come from one
or two neighbouring shards, read forward.

K slots (ranks x loader workers) split an epoch's positions into K contiguous pieces of near-equal
size; slot j reads piece j in order. A `Plan` lists the positions of the first epochs that are still
to be read (all of them at the start); a resume on another split subtracts what every old slot
consumed (`Plan.after`) and splits the rest anew, so every sample of an epoch is read exactly once
across the change.
"""

from __future__ import annotations

import hashlib
import itertools
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tagdit.train.tar_samples import TarShard

Intervals = list[tuple[int, int]]  # half-open ranges [a, b) of order positions, ascending


def sample_seed(seed: int, epoch: int, url: str, key: str) -> int:
    """A sample's augmentation seed: fixed by (seed, epoch, shard file name, key), whatever the split."""
    text = f"{seed}-{epoch}-{Path(url).name}-{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & 0x7FFFFFFF


def size(intervals: Intervals) -> int:
    return sum(b - a for a, b in intervals)


def head(intervals: Intervals, n: int) -> Intervals:
    """The first `n` positions of `intervals`."""
    out = []
    for a, b in intervals:
        if n <= 0:
            break
        out.append((a, min(b, a + n)))
        n -= b - a
    return out


def piece(intervals: Intervals, slot: int, slots: int) -> Intervals:
    """Slot `slot`'s contiguous share of `intervals` split `slots` ways (sizes differ by at most one)."""
    total = size(intervals)
    return subtract(head(intervals, total * (slot + 1) // slots), head(intervals, total * slot // slots))


def subtract(intervals: Intervals, removed: Intervals) -> Intervals:
    """The positions of `intervals` that are not in `removed`."""
    out, cuts = [], sorted(removed)
    for a, b in intervals:
        for c, d in cuts:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
        if a < b:
            out.append((a, b))
    return out


@dataclass(frozen=True)
class Plan:
    """The order positions still to be read of epochs start, start + 1, ...; later epochs are whole."""

    start: int = 0
    pending: tuple[tuple[tuple[int, int], ...], ...] = ()

    def remaining(self, epoch: int, n: int) -> Intervals:
        i = epoch - self.start
        return list(self.pending[i]) if 0 <= i < len(self.pending) else [(0, n)]

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "pending": [[list(r) for r in p] for p in self.pending]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(int(d["start"]), tuple(tuple((int(a), int(b)) for a, b in p) for p in d["pending"]))

    def after(self, positions: list[tuple[int, list[int]]], workers: int, n: int) -> Plan:
        """What is left once rank r of len(positions) read `positions[r]` = (its epoch, samples each worker
        consumed of its piece of that epoch) and all of its pieces of earlier epochs."""
        slots = len(positions) * workers
        pending = []
        for epoch in range(self.start, max(e for e, _ in positions) + 1):
            left = self.remaining(epoch, n)
            for r, (e, consumed) in enumerate(positions):
                for w in range(workers):
                    mine = piece(self.remaining(epoch, n), r * workers + w, slots)
                    left = subtract(left, mine if e > epoch else head(mine, consumed[w]) if e == epoch else [])
            pending.append(tuple(left))
        start = self.start
        while pending and not pending[0]:
            start, pending = start + 1, pending[1:]
        return Plan(start, tuple(pending))


class EpochOrder:
    """The samples of `urls` (shards sorted by name, `counts` samples each) in each epoch's order."""

    def __init__(self, urls: list[str], counts: list[int], seed: int, block: int):
        if len(urls) != len(counts):
            raise ValueError(f"{len(urls)} shards but {len(counts)} sample counts")
        self.urls, self.counts, self.seed, self.block = urls, counts, seed, block
        self._key = seed % 2**64  # numpy seeds are non-negative
        self.n = sum(counts)

    @property
    def fingerprint(self) -> str:
        """What the orders depend on: seed, block, shard names and counts."""
        text = f"{self.seed}-{self.block}-" + ",".join(f"{Path(u).name}:{c}" for u, c in zip(self.urls, self.counts, strict=True))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def _shards(self, epoch: int) -> tuple[list[int], list[int]]:
        """Shard indices in epoch `epoch`'s order, and the position each starts at in the concatenation."""
        order = list(range(len(self.urls)))
        np.random.default_rng([self._key, epoch, 0]).shuffle(order)
        return order, [0, *itertools.accumulate(self.counts[s] for s in order)]

    def _raw(self, epoch: int, k: int, offsets: np.ndarray) -> np.ndarray:
        """Concatenation indices of order positions k · block + offsets."""
        n_block = min(self.block, self.n - k * self.block)
        perm = np.random.default_rng([self._key, epoch, 1, k]).permutation(n_block)
        return k * self.block + perm[offsets]

    def samples(self, epoch: int, positions: Intervals, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Raw samples at `positions` of epoch `epoch`'s order (after the first `skip`), each with `__seed__`."""
        order, starts = self._shards(epoch)
        shards: dict[int, TarShard] = {}
        try:
            for k, offsets in _blocks(head_after(positions, skip), self.block):
                raw = self._raw(epoch, k, offsets)
                got = {}
                for g in np.sort(raw).tolist():
                    i = bisect_right(starts, g) - 1
                    got[g] = self._take(shards, order[i], g - starts[i])
                for g in raw.tolist():
                    sample = got.pop(g)
                    sample["__seed__"] = sample_seed(self.seed, epoch, sample["__url__"], sample["__key__"])
                    yield sample
        finally:
            for shard in shards.values():
                shard.close()

    def _take(self, shards: dict[int, TarShard], s: int, i: int) -> dict[str, Any]:
        """Sample `i` of shard `s`, read forward from the shard's open reader (reopened to go back)."""
        shard = shards.get(s)
        if shard is None or shard.index > i:
            for old in shards.values():
                old.close()
            shards.clear()
            shard = shards[s] = TarShard(self.urls[s])
        return next(shard.samples([i]))


def head_after(intervals: Intervals, skip: int) -> Intervals:
    """`intervals` without their first `skip` positions."""
    return subtract(intervals, head(intervals, skip))


def _blocks(positions: Intervals, block: int) -> Iterator[tuple[int, np.ndarray]]:
    """(block index, offsets in the block) of `positions`, block by block in order."""
    for a, b in positions:
        for k in range(a // block, (b - 1) // block + 1):
            lo, hi = max(a, k * block), min(b, (k + 1) * block)
            yield k, np.arange(lo - k * block, hi - k * block)
