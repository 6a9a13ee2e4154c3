"""Training on several nodes: torchrun's c10d rendezvous settings (the `launch:` section, else the
scheduler's environment), and the checks the ranks make at start.

One node runs the training task of a flow run (the stage's bookkeeping: identity, disk check, stamp,
and the ranks' arguments); every other node runs an agent (`tagdit train-agent`) that joins the same
rendezvous. torchrun's c10d rendezvous numbers the nodes itself (it ignores a node rank), so there
is none to set: whichever rank is 0 writes into the shared run folder, and the flow run's node
relays what it writes.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tagdit.config import LaunchConfig

log = logging.getLogger(__name__)

RDZV_PORT = 29400  # torchrun's default c10d port
TOKEN_FILE = ".shared-token"  # rank 0's random token in the run folder; every rank reads it back
TOKEN_WAIT_SECONDS = 5.0  # a network file system may show a new file late; a folder that is not shared never


@dataclass(frozen=True)
class Rendezvous:
    """Where and as what the nodes of one training run meet (torchrun's multi-node options)."""

    nnodes: int
    endpoint: str  # host:port of the c10d store, hosted by the node whose address it names
    run_id: str
    max_restarts: int = 0
    join_timeout: float = 600.0

    def torchrun_options(self) -> list[str]:
        """torchrun's command-line options for this rendezvous (in place of `--standalone`)."""
        timeout = int(self.join_timeout)
        return [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}",
                f"--rdzv-id={self.run_id}", f"--max-restarts={self.max_restarts}",
                f"--rdzv-conf=join_timeout={timeout},read_timeout={timeout}"]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[003-005,010],cpu1` -> `gpu003`."""
    m = re.match(r"([^,\[]+)(?:\[([^\],\-]+))?", nodelist.strip())
    if m is None:
        raise ValueError(f"cannot read a host from the node list {nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def resolve_rendezvous(lc: LaunchConfig, run_name: str, stage: str,
                       env: Mapping[str, str] = os.environ) -> Rendezvous | None:
    """The rendezvous of `stage`'s training; None for one node (torchrun --standalone).

    A setting in `launch:` wins; else SLURM's job (SLURM_JOB_NUM_NODES, SLURM_JOB_ID, the first host
    of SLURM_JOB_NODELIST) or MASTER_ADDR / MASTER_PORT; else one node. The id ends in the stage, so
    an agent of one trainer never joins another's ranks (`tagdit run` trains the VAE, then the DiT).
    """
    nnodes = lc.nnodes or int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if nnodes == 1:
        return None
    endpoint = lc.rdzv_endpoint
    if endpoint is None and env.get("MASTER_ADDR"):
        endpoint = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT') or RDZV_PORT}"
    if endpoint is None and env.get("SLURM_JOB_NODELIST"):
        endpoint = f"{first_host(env['SLURM_JOB_NODELIST'])}:{RDZV_PORT}"
    if endpoint is None:
        raise ValueError(f"launch.nnodes is {nnodes} but no rendezvous endpoint is known: set launch.rdzv_endpoint="
                         "HOST:PORT (the node that runs the flow), or MASTER_ADDR, or run under SLURM")
    run_id = f"{lc.rdzv_id or env.get('SLURM_JOB_ID') or run_name}-{stage}"
    return Rendezvous(nnodes, endpoint, run_id, lc.max_restarts, lc.join_timeout)


# ---------------------------------------------------------------- in the ranks, at start


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def start_ranks(mine: list[str] | None, own: Path) -> list[str]:
    """A rank's arguments: its own, or under DDP (after joining the group) the training task's ranks'
    (a joining agent's ranks have none), once every rank has checked that it shares the run folder.

    `own`: the run folder this rank was pointed at.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if mine is None:
            raise RuntimeError("a joining rank needs a run of several ranks (launch.nnodes > 1)")
        return mine
    init_distributed()
    argv = run_arguments(mine)
    check_shared_run_folder(own)
    return argv


def run_arguments(mine: list[str] | None) -> list[str]:
    """The run's rank arguments, from the ranks the training task started (a joining agent's ranks have none)."""
    import torch.distributed as dist

    every: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    for argv in every:
        if argv is not None:
            return argv
    raise RuntimeError("no rank was started by a training task: every node joined (`tagdit train-agent`); start the "
                       "training flow on one node, with the same launch settings")


def check_shared_run_folder(out_dir: Path, wait: float = TOKEN_WAIT_SECONDS) -> None:
    """Rank 0 writes a random token into `out_dir`, every rank reads it back from its own `out_dir`.

    A rank that reads no token, or another one, sees another folder: every rank raises, naming it,
    before any training (a run folder that is not shared would desynchronise the checkpoints).
    """
    import torch.distributed as dist

    from tagdit.files import write_bytes_atomic

    rank, world = dist.get_rank(), dist.get_world_size()
    token = [secrets.token_hex(16) if rank == 0 else None]
    if rank == 0:
        write_bytes_atomic(out_dir / TOKEN_FILE, token[0].encode())  # type: ignore[union-attr]
    dist.broadcast_object_list(token, src=0)
    seen = _read_token(out_dir / TOKEN_FILE, token[0], wait)
    problem = None if seen == token[0] else ("no token" if seen is None else "another token")
    every: list[tuple[int, str, str, str | None] | None] = [None] * world
    dist.all_gather_object(every, (rank, socket.gethostname(), str(out_dir), problem))
    bad = [e for e in every if e is not None and e[3] is not None]
    if bad:
        r, host, folder, what = bad[0]
        raise RuntimeError(f"run folder {folder} is not shared between nodes: rank 0 wrote a token into "
                           f"{every[0][2]} on {every[0][1]}, rank {r} on {host} reads {what} in {folder} "  # type: ignore[index]
                           f"({len(bad)} of {world} ranks); mount the run root on a shared file system at the same path")


def _read_token(path: Path, expected: str | None, wait: float) -> str | None:
    """The token in `path`, polled for up to `wait` seconds while it is missing or differs."""
    deadline = time.monotonic() + wait
    while True:
        try:
            seen: str | None = path.read_text()
        except FileNotFoundError:
            seen = None
        if seen == expected or time.monotonic() >= deadline:
            return seen
        time.sleep(0.2)
