"""Launching torchrun: the ranks of one node (or, with a rendezvous, one node of several); the process group
the ranks then join is `tagdit.train.nodes.init_distributed`."""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tagdit.train.nodes import Rendezvous
from tagdit.train.reports import REPORT_DIR_ENV, Relay, rank_errors
from tagdit.train.stop import STOP_FILE_ENV, TrainingStopped, stop_file

log = logging.getLogger(__name__)


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


def launch_torchrun(module: str, args: list[str], nproc: int, out_dir: Path, rdzv: Rendezvous | None = None,
                    joining: bool = False) -> None:
    """Run `python -m module args` under torchrun with `nproc` processes on this node.

    `rdzv`: this node is one of several meeting there (else `--standalone`). The node of the training
    task clears and relays the run's reports; a `joining` node (`tagdit train-agent`) only adds its
    ranks, which write into the same, shared, folder.
    torchrun and its ranks get their own process group: when this process is cancelled (Prefect
    sends SIGTERM, raised here as an exception) or dies, every rank is stopped within seconds. A stop
    asked in this process (`tagdit.train.stop`) reaches the ranks through their stop file: they
    checkpoint, stop, and `TrainingStopped` is raised here.
    Rank 0's output streams into this process's log (and so into the flow run's log); its progress
    and sample grids, and any rank's exception, come through `out_dir/reports/`
    (`tagdit.train.reports`) and become this run's artifacts and log lines.
    """
    reports = out_dir / "reports"
    if not joining:
        shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir(parents=True, exist_ok=True)
    where = rdzv.torchrun_options() if rdzv is not None else ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
           "--local-ranks-filter=0", "-m", module, *args]
    log.info("launching %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, REPORT_DIR_ENV: str(reports), STOP_FILE_ENV: str(stop_file(reports))},
                            start_new_session=True, preexec_fn=_die_with_parent)
    try:
        with contextlib.nullcontext() if joining else Relay(reports):
            for line in proc.stdout:  # type: ignore[union-attr]
                log.info("[local rank 0] %s" if rdzv is not None else "[rank 0] %s", line.rstrip())
            code = proc.wait()
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            log.warning("stopping torchrun (process group %d)", proc.pid)
            stop_process_group(proc)
    if code != 0:
        raise_rank_failure(module, code, rank_errors(reports))


def raise_rank_failure(module: str, code: int, errors: list[dict]) -> None:
    """Log every failed rank's traceback; raise the first failure again, as the same built-in kind (or
    NonFiniteLossError) where it is one, so that errors a retry cannot fix are not retried. Ranks that all
    stopped for a cancel raise `TrainingStopped` (no tracebacks: nothing failed)."""
    if errors and all(e["type"] == TrainingStopped.__name__ for e in errors):
        raise TrainingStopped(errors[0]["message"])
    for e in errors:
        log.error("rank %d failed:\n%s", e["rank"], e["traceback"].rstrip())
    if not errors:
        raise RuntimeError(f"torchrun {module} exited with code {code} (no rank reported an exception: "
                           "killed, or out of memory?)")
    first = errors[0]
    message = (f"rank {first['rank']} failed with {first['type']}: {first['message']} "
               f"(torchrun {module} exited with code {code})")
    if first["type"] == "NonFiniteLossError":
        from tagdit.train.loop import NonFiniteLossError

        raise NonFiniteLossError(message)
    kind = getattr(builtins, first["type"], None)  # ValueError stays ValueError: the retry policy sees its kind
    if isinstance(kind, type) and issubclass(kind, Exception) and not issubclass(kind, OSError):
        raise kind(message)
    raise RuntimeError(message)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
