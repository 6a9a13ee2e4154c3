"""train-agent: this node's ranks for a training run of several nodes that a flow run leads (runs no flow).

    tagdit train-agent --config my.yaml --set launch.nnodes=2 --set launch.rdzv_endpoint=node0:29400
    tagdit train-agent --stage train-vae ...        # the VAE trainer's run instead of the DiT's

Start it on every node but the one running the training flow (`tagdit stage train-dit`, `tagdit run`),
with the same config: it starts torchrun with `<stage>.train.nproc` ranks that join the flow's
rendezvous and take their arguments from the flow's ranks. The flow run does the bookkeeping
(identity, disk check, stamp) once; the ranks check that they share the run folder. Under SLURM the
rendezvous comes from the job (`srun ... tagdit train-agent --config my.yaml`); see docs/guide.md.
"""

from __future__ import annotations

import logging
from typing import Any

from flows import outside_flow_runs
from tagdit.orchestrate.cli import config_parser, parse_config

TRAINERS = ("train-dit", "train-vae")


def main(argv: list[str] | None = None) -> Any:
    """The command line: `tagdit train-agent` or `python -m flows.train_agent`."""
    outside_flow_runs()
    p = config_parser("Join a training run of several nodes led by a flow run on another node (runs no flow).")
    p.add_argument("--stage", choices=TRAINERS, default="train-dit", help="the trainer whose run to join")
    a = p.parse_args(argv)
    cfg = parse_config(a)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if a.stage == "train-dit":
        from tasks.train_dit import TRAINER
    else:
        from tasks.train_vae import TRAINER
    TRAINER.join(cfg)


if __name__ == "__main__":
    main()
