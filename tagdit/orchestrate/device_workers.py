"""A worker process per device for the data stages' GPU units: tag chunks and encode shards.

The local runner (`tagdit.orchestrate.chunks.LocalTaskRunner`) opens `device_pool(devices)`: one
process per device, each told its device once at start (`cuda:i`, or a fake `cpu:i` held to
one thread), so the model a worker loads stays on that device and a device runs one unit at a time.
A unit body calls `on_devices(fn, calls)`: fn(device, *args) for each args, all queued at once, each
on the next free worker (so one task run's units use every device), or in this process on its
default device (None) when no pool is open: the in-process runner of one device, or
a Dask worker, which dask-cuda pins to its own GPU with CUDA_VISIBLE_DEVICES. Not forked from this
process (CUDA cannot run in a forked child of a process that touched it): forked from a fresh server
process that imported torch once (multiprocessing's forkserver; spawned where there is none), so a
worker starts in about a second instead of importing torch itself (2 workers on 2 loaded cores: 1.7 s
against 15 s spawned); the server stays for the pools of later stages.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_POOL: ProcessPoolExecutor | None = None  # the open pool's workers, in the process that opened it
_DEVICE: str | None = None  # in a worker: its device
_STARTED: Any = None  # in a worker: the barrier every worker of its pool meets once at start
START_TIMEOUT = 300.0  # seconds for every worker to start


@dataclass(frozen=True)
class DeviceRun:
    """What one unit returned, and where and when it ran."""

    value: Any
    device: str | None  # the worker's device; None = the default device of the process that ran it
    pid: int
    started: float  # time.time()
    finished: float


def local_devices(spec: str | list[str], cuda_count: int) -> list[str | None]:
    """`prefect.devices` on this machine: a list as given; `auto` = cuda:0..n-1 when there are
    several, else [None] (one device, the process's default: the units run in this process)."""
    if spec != "auto":
        return list(spec)
    return [f"cuda:{i}" for i in range(cuda_count)] if cuda_count > 1 else [None]


def _become_worker(devices: Any, started: Any) -> None:
    """Pool initializer: take one device from the queue for this process's life."""
    from tagdit.devices import is_fake

    global _DEVICE, _STARTED
    _DEVICE, _STARTED = devices.get(), started
    if is_fake(_DEVICE):  # one thread: torch's (preloaded) and any library's that reads these later
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


def _meet() -> None:
    """Wait until every worker of the pool holds one of these calls: each is then a distinct started worker."""
    _STARTED.wait(START_TIMEOUT)


def _run(fn: Callable[..., Any], *args: Any) -> DeviceRun:
    started = time.time()
    value = fn(_DEVICE, *args)
    return DeviceRun(value, _DEVICE, os.getpid(), started, time.time())


def on_devices(fn: Callable[..., Any], calls: list[tuple]) -> list[DeviceRun]:
    """fn(device, *args) for each args of `calls`, all queued at once on the open pool's workers (a free
    worker takes the next), else one after the other here; results in order."""
    if _POOL is None:
        return [_run(fn, *args) for args in calls]
    futures = [_POOL.submit(_run, fn, *args) for args in calls]
    return [f.result() for f in futures]


def worker_context() -> multiprocessing.context.BaseContext:
    """Forkserver with torch preloaded (one import for every worker of every pool), else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch"])  # importing torch starts no CUDA context: the children may use any GPU
    return ctx


@contextmanager
def device_pool(devices: list[str | None]) -> Iterator[None]:
    """A worker process per device while open; [None] opens nothing (units run in this process)."""
    global _POOL
    if devices == [None]:
        yield
        return
    ctx = worker_context()
    queue, started = ctx.Queue(), ctx.Barrier(len(devices))
    for d in devices:
        queue.put(d)
    pool = ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_become_worker, initargs=(queue, started))
    outer, _POOL = _POOL, pool
    try:  # start them all now (started on demand, the first might take every unit of a small stage)
        for f in [pool.submit(_meet) for _ in devices]:
            f.result()
        yield
    finally:
        _POOL = outer
        pool.shutdown(wait=True, cancel_futures=True)
