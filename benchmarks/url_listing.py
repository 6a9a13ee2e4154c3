"""Listing a source in a bucket: folder by folder, several at once (ours) vs one recursive `find` (baseline).

ratio = the baseline's peak memory over ours at `--objects` (ours is bounded by the folders in flight);
time_ratio = the baseline's walk time over ours.

A moto S3 server on loopback holds `--objects` empty images in `--folders` folders (a folder per
character, the usual layout). Side by side, in one process, each walk yields every object's
(name, size, version) grouped by folder:
  baseline  `fs.find(root, detail=True)`, then grouped by folder: what the walk did before; the whole
            listing is in memory at once
  ours      `tagdit.data.walk.url_files`: each folder listed on its own, `LIST_AHEAD` at once, dropped
            from fsspec's cache once yielded
Time: the best of `--repeats` walks each, on loopback as it is (no latency per request, moto sharing
the CPUs) and with `--latency-ms` added before every S3 request (a cloud store's round trip; patched
into aiobotocore's client, which every s3fs call goes through). Memory: the peak of Python's
allocations (tracemalloc) during one walk each, at `--objects` and at a tenth of them: ours should stay
flat, the baseline grows with the source.

    .venv/bin/python benchmarks/url_listing.py [--objects 20000] [--folders 200] [--latency-ms 30]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_find(url: str) -> int:
    """The baseline: one recursive listing of the whole source, then its files grouped by folder."""
    from tagdit.stores import filesystem, object_version

    fs, root = filesystem(url)
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    by_dir: dict[str, dict[str, tuple[int, int]]] = {}
    prefix = root.rstrip("/") + "/"
    for name, info in found.items():
        reldir, _, fn = name[len(prefix):].rpartition("/")
        by_dir.setdefault(reldir, {})[fn] = (int(info.get("size") or 0), object_version(info))
    del found
    return sum(len(by_dir.pop(d)) for d in sorted(by_dir))


def ours(url: str) -> int:
    from tagdit.data.walk import WalkCounts, url_files

    return sum(1 for _ in url_files(url, WalkCounts()))


def fill(fs, url: str, objects: int, folders: int) -> None:
    per = -(-objects // folders)
    base = url.removeprefix("s3://")
    names = [f"{base}/char{d:04d}/{i:06d}.png" for d in range(folders) for i in range(min(per, objects - d * per))]
    for i in range(0, len(names), 2000):
        fs.pipe({n: b"" for n in names[i:i + 2000]})


def add_latency(seconds: float) -> None:
    """Every S3 request from now on waits `seconds` first, as a remote store's round trip would."""
    import asyncio

    from aiobotocore.client import AioBaseClient

    real = getattr(AioBaseClient, "_untimed_call", AioBaseClient._make_api_call)

    async def delayed(self, operation_name, api_params):
        await asyncio.sleep(seconds)
        return await real(self, operation_name, api_params)

    AioBaseClient._untimed_call, AioBaseClient._make_api_call = real, delayed


def best_time(walk, url: str, objects: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        assert walk(url) == objects
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_mb(walk, url: str, objects: int) -> float:
    tracemalloc.start()
    try:
        assert walk(url) == objects
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=20_000)
    ap.add_argument("--folders", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from tests.s3_server import S3Server

    server = S3Server()
    os.environ.update(server.env)
    try:
        fs, small_n = server.fs(), args.objects // 10
        small, big = server.bucket("small"), server.bucket("big")
        t0 = time.perf_counter()
        fill(fs, small, small_n, args.folders // 10)
        fill(fs, big, args.objects, args.folders)
        print(f"made {small_n} + {args.objects} empty objects in {time.perf_counter() - t0:.0f}s", flush=True)
        walks = (("baseline", one_find), ("ours", ours))
        for _, walk in walks:  # first use (imports, clients, thread pool) counted in neither
            walk(small)
        mem = {(name, n): peak_mb(walk, url, n) for name, walk in walks for url, n in ((small, small_n), (big, args.objects))}
        secs = {(name, 0.0): best_time(walk, big, args.objects, args.repeats) for name, walk in walks}
        add_latency(args.latency_ms / 1000)
        secs.update({(name, args.latency_ms): best_time(walk, big, args.objects, args.repeats) for name, walk in walks})
        for (name, ms), t in sorted(secs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f"{name:8s} {ms:4.0f} ms/request: {t:.2f} s for {args.objects} objects ({args.objects / t:,.0f}/s)")
        for name, _ in walks:
            print(f"{name:8s} peak {mem[name, small_n]:.1f} MB at {small_n} objects, {mem[name, args.objects]:.1f} MB "
                  f"at {args.objects}")
        print(f"machine: {os.cpu_count()} cores; moto on loopback")
        ratio = {ms: secs["baseline", ms] / secs["ours", ms] for ms in (0.0, args.latency_ms)}
        print(f"RESULT url_listing objects={args.objects} folders={args.folders} peak_mb ours={mem['ours', args.objects]:.1f} "
              f"baseline={mem['baseline', args.objects]:.1f} "
              f"ratio={mem['baseline', args.objects] / mem['ours', args.objects]:.1f} "
              f"growth_10x ours={mem['ours', args.objects] / mem['ours', small_n]:.2f} "
              f"baseline={mem['baseline', args.objects] / mem['baseline', small_n]:.2f} "
              f"time_s ours={secs['ours', args.latency_ms]:.2f} baseline={secs['baseline', args.latency_ms]:.2f} "
              f"time_ratio={ratio[args.latency_ms]:.2f} (at {args.latency_ms:.0f} ms/request) "
              f"time_ratio_loopback={ratio[0.0]:.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
