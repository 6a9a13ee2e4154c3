"""Run a message generator in a loader worker process: the training stream's decoding off the GIL.

Messages cross as pickled bytes, a chunk of same-shaped examples as one stacked numpy array per field
(pickling a torch tensor costs ~25x more than a numpy array; torch's own multiprocessing path costs a
shared-memory file per tensor); the consumer gets the examples back as views of those arrays.
A worker process exits when the consumer closes the stream, and on its own when its parent is gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

END = None  # a slot's end-of-epoch message
DEPTH = 4  # messages a worker may run ahead of the consumer
_ERROR = "__loader_worker_error__"


class _Array:
    """A tensor in transit, as a numpy array."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return _Array, (self.array,)


class _Stacked:
    """A chunk of same-shaped examples in transit: one stacked array per field, and where the Nones were."""

    __slots__ = ("fields", "kept")

    def __init__(self, fields: np.ndarray | dict[str, np.ndarray], kept: list[bool]):
        self.fields, self.kept = fields, kept

    def __reduce__(self):
        return _Stacked, (self.fields, self.kept)

    def examples(self) -> list[Any]:
        """The chunk's examples as tensor views of the stacked arrays, Nones back in place."""
        if isinstance(self.fields, dict):
            columns = {k: torch.from_numpy(v).unbind(0) for k, v in self.fields.items()}
            rows = iter([dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)])
        else:
            rows = iter(torch.from_numpy(self.fields).unbind(0))
        return [next(rows) if kept else None for kept in self.kept]


def _stackable(xs: list[Any]) -> bool:
    return all(isinstance(x, torch.Tensor) and x.dtype != torch.bfloat16  # numpy has no bfloat16
               and x.shape == xs[0].shape and x.dtype == xs[0].dtype for x in xs)


def _stack(chunk: list[Any]) -> _Stacked | None:
    """`chunk` as stacked arrays, if its examples are all same-shaped tensors or dicts of them."""
    xs = [x for x in chunk if x is not None]
    kept = [x is not None for x in chunk]
    if xs and _stackable(xs):
        return _Stacked(np.stack([x.numpy() for x in xs]), kept)
    if xs and all(isinstance(x, dict) and x.keys() == xs[0].keys() for x in xs):
        columns = {k: [x[k] for x in xs] for k in xs[0]}
        if all(_stackable(c) for c in columns.values()):
            return _Stacked({k: np.stack([v.numpy() for v in c]) for k, c in columns.items()}, kept)
    return None


def _pack(x: Any) -> Any:
    """A message made cheap to pickle: chunks stacked where possible, tensors as numpy arrays."""
    if isinstance(x, list) and (stacked := _stack(x)) is not None:
        return stacked
    if isinstance(x, torch.Tensor) and x.dtype != torch.bfloat16:
        return _Array(x.numpy())
    if isinstance(x, dict):
        return {k: _pack(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_pack(v) for v in x)
    return x


def _unpack(x: Any) -> Any:
    if isinstance(x, _Stacked):
        return x.examples()
    if isinstance(x, _Array):
        return torch.from_numpy(x.array)
    if isinstance(x, dict):
        return {k: _unpack(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_unpack(v) for v in x)
    return x


def _put(q: mp.Queue, payload: bytes, parent: int) -> bool:
    """Queue `payload`, waiting while the consumer is behind; False once the parent process is gone."""
    while True:
        try:
            q.put(payload, timeout=1.0)
            return True
        except queue.Full:
            if os.getppid() != parent:
                return False


def _work(q: mp.Queue, fn: Callable[..., Iterator[Any]], args: tuple, parent: int) -> None:
    """The worker process: every message of fn(*args), pickled, into `q`."""
    # close() ends us with SIGTERM; a handler forked from the parent (a Prefect flow run's raises an
    # exception here) would leave us blocked on the full queue until close() gives up after 5 s.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    try:
        for message in fn(*args):
            if not _put(q, pickle.dumps(_pack(message), protocol=pickle.HIGHEST_PROTOCOL), parent):
                return
    except BaseException:  # re-raised in the consumer
        _put(q, pickle.dumps((_ERROR, traceback.format_exc())), parent)


def _context() -> Any:
    """fork where the platform has it (no pickling of `fn`, instant start), else spawn."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


class WorkerProcess:
    """The messages of the generator fn(*args), produced in a worker process up to DEPTH ahead."""

    def __init__(self, fn: Callable[..., Iterator[Any]], args: tuple, name: str = "loader"):
        ctx = _context()
        self.name, self.queue = name, ctx.Queue(maxsize=DEPTH)
        self.proc = ctx.Process(target=_work, args=(self.queue, fn, args, os.getpid()), name=name, daemon=True)
        self.proc.start()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                message = pickle.loads(self.queue.get(timeout=5.0))
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"{self.name}: loader worker died (exit code {self.proc.exitcode})") from None
        if isinstance(message, tuple) and len(message) == 2 and message[0] == _ERROR:
            raise RuntimeError(f"{self.name}: loader worker failed:\n{message[1]}")
        return _unpack(message)

    def close(self) -> None:
        """Stop the worker process and release its queue."""
        self.proc.terminate()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.queue.close()
        self.queue.cancel_join_thread()
