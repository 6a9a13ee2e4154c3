"""A trainer whose rank 1 fails while rank 0 waits for it: `python -m tests.failing_rank` under torchrun.

Used by tests/test_rank_reports.py to check that a crash on any rank reaches the launching task's log.
"""

from __future__ import annotations

from pathlib import Path

from tagdit.config import PipelineConfig
from tagdit.orchestrate.stage import Stage
from tagdit.train.ranks import start_rank
from tasks.trainer import TrainerStage


def train(cfg: PipelineConfig, data: Path, out_dir: Path) -> None:
    import torch.distributed as dist

    r = start_rank(cfg.dit.train, "dit")
    if r.rank == 1:
        raise ValueError(f"rank 1 cannot read {data / 'shard-7.tar'}")
    dist.barrier()  # never passes: torchrun stops this rank when rank 1 fails


TRAINER = TrainerStage(
    stage=Stage(name="failing", modules=(), sections=(), out_dir=lambda cfg, up: cfg.run_dir / "failing"),
    module="tests.failing_rank",
    section="dit",
    inputs=("data",),
    input_paths=lambda cfg, up: (cfg.dataset_dir,),
    train=train,
    info=lambda ckpt, inputs: {},
    checkpoint_bytes=lambda cfg, paths: 0,
)

if __name__ == "__main__":
    TRAINER.main()
