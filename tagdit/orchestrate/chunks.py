"""Where the data stages' independent units run: crop chunks, tag chunks, encode shards.

A stage task plans its units and hands the missing ones to `run_units`, which submits one Prefect
task run per unit on the runner `chunk_runner(cfg.prefect, ...)` opened:
  - `local` (default): `LocalTaskRunner`, Prefect's thread-pool runner for the task runs plus, for
    CPU-bound units, a pool of forked processes that the unit bodies `offload` their work to, and for
    device units (tag, encode) a worker process per device (`tagdit.orchestrate.device_workers`). Forked
    workers start in milliseconds with everything imported; Prefect's ProcessPoolTaskRunner spawns
    fresh interpreters that each import Prefect and connect to its API first (cropping 300 JPEGs in
    6 chunks on 2 cores: 4-5 s here, 14-17 s on that runner; with the ephemeral API it times out).
  - `dask`: prefect-dask's DaskTaskRunner on the scheduler at `prefect.dask_address`, or on a local
    cluster of `prefect.dask_workers` processes. Every worker must see the same paths.
Outside a flow run (library calls from benchmarks and tests) there is no API to report task runs
to, so the local runner calls the units' functions directly, on the same threads and processes.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tagdit.config import ConfigError
from tagdit.orchestrate.device_workers import device_pool

if TYPE_CHECKING:
    from tagdit.config import PipelineConfig, PrefectConfig

DASK_EXTRA = 'pip install -e ".[dask]"'
_POOL: ProcessPoolExecutor | None = None  # the open local runner's process pool, in this process


def pack_units(todo: list[int], most: int, parts: int, sizes: dict[int, int] | None = None) -> list[list[int]]:
    """Consecutive units (sizes: files each, default 1) grouped into task runs of at most `most` files
    (a larger unit alone), and about `parts` runs or more while the units allow: few task runs at
    scale, all workers busy."""
    sizes = sizes or dict.fromkeys(todo, 1)
    total = sum(sizes[b] for b in todo)
    target = max(1, min(most, -(-total // max(parts, 1))))
    runs: list[list[int]] = []
    files = 0
    for b in todo:
        if runs and files + sizes[b] <= target:
            runs[-1].append(b)
            files += sizes[b]
        else:
            runs.append([b])
            files = sizes[b]
    return runs


def items_per_run(cfg: PipelineConfig) -> int:
    """Chunks or shards per task run of the tag and encode stages: about `crop.unit_files` images
    (a bucket holds about `shards.samples_per_shard`)."""
    return max(1, cfg.crop.unit_files // cfg.shards.samples_per_shard)


def unit_task(name: str, run_name: str) -> Callable[[Callable], Task]:
    """@task for one unit: no Prefect cache or stored result (the unit's file on disk is both)."""
    return task(name=name, task_run_name=run_name, cache_policy=NO_CACHE, persist_result=False)


def offload(fn: Callable[..., Any], /, *args: Any) -> Any:
    """fn(*args) on the local runner's process pool when one is open in this process, else here."""
    if _POOL is None:
        return fn(*args)
    return _POOL.submit(fn, *args).result()


class LocalTaskRunner(ThreadPoolTaskRunner):
    """Task runs on `threads` threads of this process; the work they `offload`, on `processes` forks;
    the work they run `on_devices`, on a worker per device (a thread each), or here for [None]."""

    def __init__(self, threads: int = 1, processes: int = 1, devices: list[str | None] | None = None):
        self.devices = devices or [None]
        threads = max(threads, len(self.devices))
        super().__init__(max_workers=threads)
        self.threads, self.processes = threads, processes
        self._pool: ProcessPoolExecutor | None = None
        self._outer: ProcessPoolExecutor | None = None
        self._devices = ExitStack()

    def duplicate(self) -> LocalTaskRunner:
        return type(self)(self.threads, self.processes, self.devices)

    def __enter__(self) -> LocalTaskRunner:
        global _POOL
        super().__enter__()
        self._devices.enter_context(device_pool(self.devices))
        if self.processes > 1:
            # fork: workers start with everything imported and need no `__main__` guard; they only
            # run the units' PIL / pyarrow work (Python re-initialises logging locks after fork).
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self._pool = ProcessPoolExecutor(self.processes, mp_context=ctx)
            self._outer, _POOL = _POOL, self._pool
        return self

    def __exit__(self, *exc: Any) -> None:
        global _POOL
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            _POOL, self._pool = self._outer, None
        self._devices.close()
        super().__exit__(*exc)


def dask_runner(pc: PrefectConfig) -> TaskRunner:
    """DaskTaskRunner on `pc.dask_address`, or on a local cluster of `pc.dask_workers` processes."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as e:
        raise ConfigError(f"prefect.task_runner=dask needs the dask extra: {DASK_EXTRA} ({e})") from e
    if pc.dask_address:
        return DaskTaskRunner(address=pc.dask_address)
    cluster = {"n_workers": pc.dask_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"}
    return DaskTaskRunner(cluster_kwargs=cluster)


@contextmanager
def chunk_runner(pc: PrefectConfig, threads: int = 1, processes: int = 1,
                 devices: list[str | None] | None = None) -> Iterator[TaskRunner]:
    """The open task runner for a stage's units; `threads` / `processes` / `devices` shape the local one
    (a Dask worker runs its units on its own default device)."""
    runner = dask_runner(pc) if pc.task_runner == "dask" else LocalTaskRunner(threads, processes, devices)
    with runner:
        yield runner


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _plain_calls(fn: Callable[..., Any], params: list[dict[str, Any]], threads: int) -> Iterator[Any]:
    """fn(**p) for each p, in order, on `threads` threads; pending calls are dropped after an error."""
    if threads == 1 or len(params) < 2:
        yield from (fn(**p) for p in params)
        return
    with ThreadPoolExecutor(min(threads, len(params))) as pool:
        futures = [pool.submit(fn, **p) for p in params]
        try:
            yield from (f.result() for f in futures)
        finally:
            for f in futures:
                f.cancel()


def run_units(runner: TaskRunner, unit: Task, params: list[dict[str, Any]], desc: str,
              sizes: list[int] | None = None, unit_name: str = "unit") -> list[Any]:
    """Run `unit` once per parameter dict on `runner`, waiting for all; results in order."""
    from tqdm.auto import tqdm

    sizes = sizes or [1] * len(params)
    if isinstance(runner, LocalTaskRunner) and not _in_prefect_run():
        results: Iterator[Any] = _plain_calls(unit.fn, params, runner.threads)
    else:
        futures = [runner.submit(unit, p) for p in params]
        results = (f.result() for f in futures)  # raises the first failed unit's error
    out = []
    with tqdm(total=sum(sizes), desc=desc, unit=unit_name, disable=len(params) < 2) as bar:
        for size, result in zip(sizes, results, strict=True):
            out.append(result)
            bar.update(size)
    return out
