"""Wall time of the demo pipeline: a cold run (everything built from nothing) vs the cached re-run.

The RESULT line also carries the cold run's quality: tag_recall_ratio (goal >= 0.9) and the VAE's
held-out PSNR (goal >= 30 dB at 64 px); the cold run's goal is <= 600 s on 2 idle cores.

Both runs are `python -m flows.full_pipeline --config configs/demo.yaml` in a fresh copy of the
repository with its own Prefect home (a temporary server each, as `make demo` does), timed from
process start to exit. The re-run must report every stage cached, or the benchmark fails.

    .venv/bin/python benchmarks/pipeline_demo.py [--config configs/demo.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copy_checkout(dst: Path) -> None:
    """The working tree as a fresh clone would have it (tracked + untracked, minus git-ignored files)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # tracked files deleted in the working tree are skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_pipeline(workdir: Path, args: list[str], env: dict[str, str], log: Path) -> tuple[float, dict]:
    """Run the full pipeline once; returns (wall seconds, the flow's printed summary)."""
    cmd = [sys.executable, "-m", "flows.full_pipeline", *args]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=fh, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed (exit {proc.returncode}); log: {log}")
    return wall, json.loads(proc.stdout[proc.stdout.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--keep", action="store_true", help="keep the working copy and its logs")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tagdit-pipeline-demo-"))
    work = tmp / "repo"
    copy_checkout(work)
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PYTHONUNBUFFERED": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    flow_args = ["--config", args.config] + [a for kv in args.overrides for a in ("--set", kv)]
    try:
        cold, first = run_pipeline(work, flow_args, env, tmp / "cold.log")
        print(f"cold run: {cold:.1f} s  tag_recall_ratio={first['tag_recall_ratio']} ± {first['tag_recall_ratio_se']}  "
              f"recall={first['tag_recall']}  vae_psnr_db={first['vae_psnr_db']}")
        cached, second = run_pipeline(work, flow_args, env, tmp / "cached.log")
        print(f"cached re-run: {cached:.1f} s  stages cached: {second['cached']}")
        if not all(second["cached"].values()):
            raise SystemExit(f"re-run was not all cache hits: {second['cached']}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"RESULT pipeline_demo ours={cached:.1f} s baseline={cold:.1f} s ratio={cold / cached:.1f} "
          f"tag_recall_ratio={first['tag_recall_ratio']} tag_recall_ratio_se={first['tag_recall_ratio_se']} "
          f"vae_psnr_db={first['vae_psnr_db']}")


if __name__ == "__main__":
    main()
