"""An exactly resumable, deterministic stream of training batches from WebDataset tar shards."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tagdit.prefetch import prefetch


class EpochStream:
    """Deterministic, exactly resumable batches from WebDataset tar shards.

    Epoch e visits the shards in an order shuffled with seed (seed, e) and shuffles samples through
    a buffer with the same RNG; global sample i goes to rank i % world_size. `decode(raw)` turns a
    raw sample (`__key__`, `__seed__` and extension -> bytes) into a training example; `__seed__`
    is a per-sample integer for augmentation randomness (use it, not the global RNG: decoding runs
    in a prefetch thread). Returning None drops the sample. Resuming skips samples without decoding.
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
        collate: Callable[[list], Any] | None = None,
        prefetch: int = 2,
    ):
        if not urls:
            raise ValueError("EpochStream needs at least one shard")
        self.urls = sorted(str(u) for u in urls)
        self.decode, self.batch_size, self.seed = decode, batch_size, seed
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.collate = collate or torch.utils.data.default_collate
        self.prefetch = prefetch
        self._state = {"epoch": 0, "consumed": 0}

    def state_dict(self) -> dict[str, int]:
        """Position after the last batch handed out."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._state = {"epoch": int(state["epoch"]), "consumed": int(state["consumed"])}

    def _epoch_samples(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This rank's raw samples of one epoch, in their deterministic order."""
        from webdataset.tariterators import tarfile_samples

        rng = random.Random(f"{self.seed}-{epoch}")
        urls = list(self.urls)
        rng.shuffle(urls)
        buffer: list[dict[str, Any]] = []
        index = 0

        def emit(sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
            nonlocal index
            mine = index % self.world_size == self.rank
            sample["__seed__"] = hash((self.seed, epoch, index)) & 0x7FFFFFFF
            index += 1
            if mine:
                yield sample

        for sample in tarfile_samples({"url": u} for u in urls):
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield from emit(buffer.pop())
        rng.shuffle(buffer)
        for sample in buffer:
            yield from emit(sample)

    def _samples_from(self, epoch: int, skip: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, index, raw) forever, starting `skip` samples into `epoch`."""
        while True:
            seen = 0
            for i, raw in enumerate(self._epoch_samples(epoch)):
                seen += 1
                if i >= skip:
                    yield epoch, i, raw
            if seen == 0:
                raise RuntimeError(f"no samples for rank {self.rank} of {self.world_size} in {self.urls}")
            epoch, skip = epoch + 1, 0

    def _batches(self) -> Iterator[tuple[Any, dict[str, int]]]:
        """(batch, stream position after it) forever, from the current position."""
        examples = []
        for epoch, i, raw in self._samples_from(self._state["epoch"], self._state["consumed"]):
            example = self.decode(raw)
            if example is not None:
                examples.append(example)
            if len(examples) == self.batch_size:
                yield self.collate(examples), {"epoch": epoch, "consumed": i + 1}
                examples = []

    def __iter__(self) -> Iterator[Any]:
        """Batches, decoded in a background thread `prefetch` batches ahead."""
        for batch, state in prefetch(self._batches(), self.prefetch, name="epoch-stream"):
            self._state = state
            yield batch
