"""The stage skeleton both trainer stages share; `tasks.train_vae` and `tasks.train_dit` wire into it.

A trainer stage: reuse a stamped record, or keep a resumable run folder (moving a run of another
configuration aside), refuse a run whose checkpoints cannot fit the disk, train in this process or
under torchrun (`main` is one rank) on this node or several (`join`: another node's ranks, for
`tagdit train-agent`; `tagdit.train.nodes`), then stamp the latest checkpoint. A stage supplies its library
trainer `train(cfg, *inputs, out_dir)` (`tagdit.train.vae.train_vae`, `tagdit.train.dit.train_dit`),
one checkpoint's projected size, and the facts its stamp adds to `checkpoint_facts`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tagdit.config import PipelineConfig, TrainConfig, batch_split_error
from tagdit.files import write_json_atomic
from tagdit.orchestrate.markers import prepare_out_dir
from tagdit.orchestrate.stage import Stage, StageRecord
from tagdit.train.nodes import Rendezvous

log = logging.getLogger(__name__)

# The training code whose version is part of a trainer stage's cache key.
TRAIN_MODULES = ("tasks.trainer", "tagdit.train.ranks", "tagdit.train.loop", "tagdit.train.optim",
                 "tagdit.formats.checkpoints", "tagdit.train.stream", "tagdit.train.tar_samples",
                 "tagdit.train.loader_workers", "tagdit.train.epoch_order", "tagdit.train.resume", "tagdit.devices",
                 "models.config")
# Settings that may change between runs without invalidating the checkpoints (resume continues).
# nproc / loader_workers change how the epoch's sample order is split: a resumed run re-splits what is
# left of its epoch over the new ranks and workers (each sample once; tagdit.train.epoch_order).
RESUMABLE = ("steps", "checkpoint_every", "log_every", "val_every", "device", "nproc", "compile",
             "keep_checkpoints", "grad_accum", "loader_workers", "continue_on_new_data")


@dataclass(frozen=True)
class TrainerStage:
    """What a trainer plugs into the skeleton; `run` is the whole stage, `main` the torchrun entry."""

    stage: Stage
    module: str  # `python -m <module>` runs one DDP rank (its `main`)
    section: str  # the config section (`vae`, `dit`) whose `.train` is the TrainConfig
    inputs: tuple[str, ...]  # names of `train`'s path arguments, in order (also the rank's CLI flags)
    input_paths: Callable[[PipelineConfig, dict[str, StageRecord]], tuple[Path, ...]]
    train: Callable[..., Any]  # train(cfg, *input paths, out_dir) in this process / rank
    info: Callable[[Path, tuple[Path, ...]], dict[str, Any]]  # (checkpoint, inputs) -> facts beyond checkpoint_facts
    checkpoint_bytes: Callable[[PipelineConfig, tuple[Path, ...]], int]  # (cfg, inputs) -> one checkpoint's projected size
    identity_extra: Callable[[PipelineConfig], dict[str, Any]] = field(default=lambda cfg: {})

    def train_config(self, cfg: PipelineConfig) -> TrainConfig:
        return getattr(cfg, self.section).train

    def identity(self, cfg: PipelineConfig, upstream: dict[str, StageRecord]) -> dict[str, Any]:
        """What existing checkpoints must share with this run to be resumed."""
        section = getattr(cfg, self.section).model_dump(mode="json")
        section["train"] = {k: v for k, v in section["train"].items() if k not in RESUMABLE}
        return {self.section: section, **self.identity_extra(cfg),
                "upstream": {k: v.fingerprint for k, v in sorted(upstream.items())}}

    def check_disk(self, cfg: PipelineConfig, paths: tuple[Path, ...], out_dir: Path) -> None:
        """Refuse to start when the checkpoints still to come cannot fit out_dir's file system (DiskSpaceError)."""
        from tagdit.formats.checkpoints import Checkpoints, read_checkpoint_meta
        from tagdit.train.disk import check_disk_space

        tc = self.train_config(cfg)
        latest = Checkpoints(out_dir).latest()
        step = read_checkpoint_meta(latest).step if latest else 0
        size = self.checkpoint_bytes(cfg, paths)
        if latest is not None:  # a real one beats the projection
            size = max(size, sum(p.stat().st_size for p in latest.iterdir() if p.is_file()))
        check_disk_space(out_dir, size, step=step, steps=tc.steps, every=tc.checkpoint_every,
                         keep=tc.keep_checkpoints, section=self.section, what=self.stage.name,
                         pinned=len(Checkpoints(out_dir).record_pinned()))

    def pin_recorded(self, out_dir: Path) -> None:
        """Pin the checkpoint this stage's stamp names, so a resumed run never prunes it (`Checkpoints.keep_for`)."""
        from tagdit.formats.checkpoints import Checkpoints
        from tagdit.orchestrate.stage import read_stamp

        record = read_stamp(out_dir, self.stage.name)
        named = Path(record.info.get("checkpoint", "")) if record else None
        if named is not None and named.parent.resolve() == out_dir.resolve() and (named / "meta.json").is_file():
            Checkpoints(out_dir).keep_for(out_dir / named.name, self.stage.name)

    def rendezvous(self, cfg: PipelineConfig) -> Rendezvous | None:
        """The nodes this trainer spans (`launch:` or SLURM's), None for one; refuses a batch they cannot split."""
        from tagdit.train.nodes import resolve_rendezvous

        rdzv = resolve_rendezvous(cfg.launch, cfg.run.name, self.stage.name)
        if rdzv is not None and (problem := batch_split_error(self.train_config(cfg), self.section, rdzv.nnodes)):
            raise ValueError(problem)
        return rdzv

    def run_training(self, cfg: PipelineConfig, paths: tuple[Path, ...], out_dir: Path) -> None:
        """In-process training, or torchrun DDP over `<section>.train.nproc` processes (on each of the nodes)."""
        from tagdit.train.launch import launch_torchrun

        nproc, rdzv = self.train_config(cfg).nproc, self.rendezvous(cfg)
        if nproc <= 1 and rdzv is None:
            self.train(cfg, *paths, out_dir)
            return
        if rdzv is not None:
            log.info("%s on %d nodes: start `tagdit train-agent --stage %s` with this config on the other %d "
                     "(rendezvous %s, id %s)", self.stage.name, rdzv.nnodes, self.stage.name, rdzv.nnodes - 1,
                     rdzv.endpoint, rdzv.run_id)
        cfg_path = out_dir / "config.json"
        write_json_atomic(cfg_path, cfg.model_dump(mode="json"))
        flags = [a for name, p in zip(self.inputs, paths, strict=True) for a in (f"--{name}", str(p))]
        launch_torchrun(self.module, ["--config-json", str(cfg_path), *flags, "--out", str(out_dir)], nproc,
                        out_dir=out_dir, rdzv=rdzv)

    def join(self, cfg: PipelineConfig) -> None:
        """Another node's ranks for the run the training task launches (`tagdit train-agent`): no bookkeeping."""
        from tagdit.train.launch import launch_torchrun

        rdzv = self.rendezvous(cfg)
        if rdzv is None:
            raise ValueError("launch.nnodes is 1 (and no SLURM job of several nodes): there is no run of several "
                             "nodes to join; set launch.nnodes and launch.rdzv_endpoint as the training flow has them")
        out_dir = self.stage.out_dir(cfg, {})
        launch_torchrun(self.module, ["--join", str(out_dir)], self.train_config(cfg).nproc, out_dir=out_dir,
                        rdzv=rdzv, joining=True)

    def run(self, cfg: PipelineConfig, upstream: dict[str, StageRecord], force: bool = False) -> StageRecord:
        """The stage: cached record, or train (resuming) and stamp the final checkpoint."""
        from tagdit.formats.checkpoints import Checkpoints, checkpoint_facts

        if not force and (rec := self.stage.valid_record(cfg, upstream)):
            return rec
        out_dir = self.stage.out_dir(cfg, upstream)
        prepare_out_dir(out_dir, self.identity(cfg, upstream), force, self.stage.name,
                        continue_despite="upstream" if self.train_config(cfg).continue_on_new_data else None)
        paths = self.input_paths(cfg, upstream)
        self.pin_recorded(out_dir)  # a stamp written before pins existed
        self.check_disk(cfg, paths, out_dir)
        self.run_training(cfg, paths, out_dir)
        ckpts = Checkpoints(out_dir)
        ckpt = ckpts.latest()
        if ckpt is None:
            raise RuntimeError(f"{self.stage.name} wrote no checkpoint to {out_dir}")
        files = [ckpt / "model.safetensors", ckpt / "ema.safetensors", ckpt / "meta.json"]
        record = self.stage.write_stamp(cfg, upstream, files, {**checkpoint_facts(ckpt), **self.info(ckpt, paths)})
        ckpts.keep_for(ckpt, self.stage.name)  # moves the pin from the checkpoint the old stamp named
        return record

    def main(self, argv: list[str] | None = None) -> None:
        """torchrun entry point: one DDP rank; a failure leaves its traceback for the launcher (and torchrun)."""
        from torch.distributed.elastic.multiprocessing.errors import record

        record(self._rank_main)(argv)

    def _rank_main(self, argv: list[str] | None) -> None:
        import sys

        import torch.distributed as dist

        from tagdit.train.nodes import start_ranks
        from tagdit.train.reports import write_rank_error
        from tagdit.train.stop import TrainingStopped

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        p = argparse.ArgumentParser(description=f"one rank of {self.stage.name} (launched by its task or an agent)")
        for name in ("config-json", *self.inputs, "out"):
            p.add_argument(f"--{name}", required="--join" not in (argv or sys.argv))
        p.add_argument("--join", help="a joining agent's run folder: the arguments come from the task's ranks")
        a = p.parse_args(argv)
        try:
            a = p.parse_args(start_ranks(None if a.join else (argv or sys.argv[1:]), Path(a.join or a.out)))
            cfg = PipelineConfig.model_validate_json(Path(a.config_json).read_text())
            self.train(cfg, *(Path(getattr(a, name)) for name in self.inputs), Path(a.out))
        except TrainingStopped as e:  # a cancel: the launcher raises it again; no traceback, nothing failed
            write_rank_error(e)
            raise SystemExit(1) from None
        except Exception as e:  # the launcher logs it and re-raises its kind (a NaN loss is never retried)
            write_rank_error(e)
            raise
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
