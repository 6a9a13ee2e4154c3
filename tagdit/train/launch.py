"""Distributed data parallel: the process group under torchrun, and launching torchrun itself."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


NONFINITE_MARKER = "nonfinite.json"  # a rank that stopped on a NaN/inf loss leaves this in the run folder
STOP_GRACE_SECONDS = 15  # SIGTERM, then SIGKILL the ranks' process group after this


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launching process dies (Linux), even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process_group(proc: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM torchrun's whole process group (it stops its ranks), SIGKILL what is left after `grace`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        proc.poll()  # reap the leader so a finished group reads as gone
        time.sleep(0.2)
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def launch_torchrun(module: str, args: list[str], nproc: int, out_dir: Path | None = None) -> None:
    """Run `python -m module args` under torchrun with `nproc` processes on this node.

    torchrun and its ranks get their own process group: when this process is cancelled (Prefect
    sends SIGTERM, raised here as an exception) or dies, every rank is stopped within seconds.
    Rank 0's output streams into this process's log (and so into the flow run's log).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--local-ranks-filter=0", "-m", module, *args]
    log.info("launching %s", " ".join(cmd))
    if out_dir is not None:
        (out_dir / NONFINITE_MARKER).unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, preexec_fn=_die_with_parent)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            log.info("[rank 0] %s", line.rstrip())
        code = proc.wait()
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            log.warning("stopping torchrun (process group %d)", proc.pid)
            stop_process_group(proc)
    if code != 0:
        marker = out_dir / NONFINITE_MARKER if out_dir is not None else None
        if marker is not None and marker.is_file():
            from tagdit.train.loop import NonFiniteLossError

            raise NonFiniteLossError(json.loads(marker.read_text())["message"])
        raise RuntimeError(f"torchrun {module} exited with code {code}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
