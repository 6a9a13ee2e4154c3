"""An ordered map over forked processes for the demo's pure numpy/PIL work (drawing, encoding)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator


def ordered_map(fn: Callable, args: list[tuple], workers: int) -> Iterator:
    """`fn(*a)` for each `a` in `args`, in order, over `workers` processes; in-process when workers <= 1."""
    if workers <= 1 or len(args) < 64:
        return (fn(*a) for a in args)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork: spawn would re-run an unguarded __main__ script; the children only draw and encode
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method))
    chunk = max(1, len(args) // (workers * 8))
    cols = list(zip(*args, strict=True))
    return _close_after(pool, pool.map(fn, *cols, chunksize=chunk))


def _close_after(pool, results):
    try:
        yield from results
    finally:
        pool.shutdown(cancel_futures=True)


def default_workers() -> int:
    """Processes to use when the caller says 0: the CPU count, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))
