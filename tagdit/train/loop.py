"""`fit`: the training loop shared by the VAE and the DiT.

`fit` owns everything that is not model-specific: resume or seed, micro-batches and gradient
accumulation under DDP, the optimiser and EMA step, logging, validation and checkpoints. A trainer
(`tagdit.train.dit`, `tagdit.train.vae`) supplies `loss_fn(model, batch, step)`, optionally
`val_fn(ema_module, step, writer)`, and for a second model with its own optimiser (the VAE's
discriminator) an `after_step(batch, step)` hook plus its state-carrying objects in `extra`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from tagdit.config import TrainConfig
from tagdit.devices import autocast, configure_backends
from tagdit.formats.checkpoints import Checkpoints, seed_everything
from tagdit.train.optim import EMA, make_optimizer, make_scheduler
from tagdit.train.reports import Progress
from tagdit.train.resume import load_checkpoint, rank_states, restore_rank
from tagdit.train.stop import TrainingStopped, stop_agreed
from tagdit.train.stream import EpochStream

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, Any]]]  # (model, batch, step) -> loss, logs
ValFn = Callable[[nn.Module, int, Any], dict[str, float]]  # (EMA module, step, writer) -> metrics
AfterStep = Callable[[Any, int], dict[str, Any]]  # (batch, step taken) -> logs; e.g. a discriminator update
Monitor = Callable[[nn.Module, int, Any], None]  # (EMA module, step taken, writer); rank 0; e.g. sample grids


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _State:
    """What the loop carries from step to step, and what a checkpoint restores."""

    model: nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    stream: EpochStream
    extra: dict[str, Any]
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    last_good: Path | None = None
    saved_at: float = field(default_factory=time.monotonic)  # when the last checkpoint was written (or the run began)

    def state_dict(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """The contents of a checkpoint's `state.pt`; `ranks`: every rank's `rank_states` entry."""
        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "ema_n_averaged": self.ema.state_dict()["n_averaged"],
            "ranks": ranks,
            "extra": {k: v.state_dict() for k, v in self.extra.items()},
        }

    def result(self) -> TrainResult:
        return TrainResult(self.step, self.last_good, self.metrics)  # type: ignore[arg-type]


class _Progress:
    """tqdm on stderr plus the run's progress artifact (`tagdit.train.reports`), rank 0 only."""

    def __init__(self, desc: str, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, mininterval=2)
        self.report = Progress(desc, initial, total) if enabled else None

    def update(self, step: int, n: int, postfix: dict[str, float]) -> None:
        self.bar.update(n)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        if self.report is not None:
            self.report.update(step)

    def close(self) -> None:
        self.bar.close()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _due(step: int, every: int, total: int) -> bool:
    return step % every == 0 or step == total


def _restore_or_seed(st: _State, ckpt: Path | None, seed: int, desc: str, device: torch.device,
                     rank: int = 0, world: int = 1) -> None:
    """Continue from checkpoint `ckpt` exactly (read by rank 0 and broadcast), or seed a fresh run."""
    record = load_checkpoint(ckpt, rank, world, device)
    if record is None:
        seed_everything(seed + rank)
        return
    state = record["state"]
    st.model.load_state_dict(record["model"])
    ema_weights = {"module." + k: v for k, v in record["ema"].items()}
    st.ema.load_state_dict({**st.ema.state_dict(), **ema_weights, "n_averaged": state["ema_n_averaged"]})
    st.opt.load_state_dict(state["optimizer"])
    st.sched.load_state_dict(state["scheduler"])
    for name, obj in st.extra.items():
        obj.load_state_dict(state["extra"][name])
    restore_rank(st.stream, state, seed, rank, world)
    st.step, st.last_good, st.metrics = int(state["step"]), Path(record["path"]), record["metrics"]
    log.info("%s: resumed from %s (step %d)", desc, record["path"], st.step)


def _wrap_model(model: nn.Module, cfg: TrainConfig, device: torch.device, world: int) -> nn.Module:
    """The module the loss runs: DDP across ranks, torch.compile'd (inductor, GPU or CPU) when asked."""
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def _open_writer(out_dir: Path) -> Any:
    """TensorBoard writer for `out_dir/tb`."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tb"))


def _grad_norm(model: nn.Module) -> torch.Tensor:
    """Global L2 norm of the current gradients."""
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _no_sync(train_model: nn.Module, accumulating: bool) -> Any:
    """DDP's no_sync() while accumulating: gradients are all-reduced on a step's last micro-batch only."""
    ddp = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if accumulating and isinstance(ddp, nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return contextlib.nullcontext()


def _mean_logs(logs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-micro-batch logs averaged (tensors stay on the device: no sync)."""
    return logs[0] if len(logs) == 1 else {k: sum(m[k] for m in logs) / len(logs) for k in logs[0]}


def _train_step(st: _State, train_model: nn.Module, loss_fn: LossFn, batches: list[Any], cfg: TrainConfig,
                device: torch.device, world: int, desc: str) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None]:
    """One optimiser step over its micro-batches: (mean loss, mean logs, clipped grad norm or None).

    Each micro-batch's loss is scaled by 1 / len(batches), so the accumulated gradient is the full
    batch's. A NaN/inf loss on any micro-batch of any rank stops every rank before the update.
    """
    st.opt.zero_grad(set_to_none=True)
    losses, logs = [], []
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with _no_sync(train_model, not last):
            with autocast(device, cfg.precision):
                loss, micro_logs = loss_fn(train_model, batch, st.step)
            losses.append(loss.detach())
            logs.append(micro_logs)
            if not last:
                (loss / len(batches)).backward()
    loss_mean = torch.stack(losses).mean()
    finite = torch.isfinite(torch.stack(losses)).all().float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        raise NonFiniteLossError(
            f"{desc}: loss became {loss_mean.item()} at step {st.step + 1}; stopped. "
            f"Last good checkpoint: {st.last_good or 'none yet'}"
        )
    (loss / len(batches)).backward()
    grad_norm = None
    if cfg.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(st.model.parameters(), cfg.grad_clip)
    st.opt.step()
    st.sched.step()
    st.ema.update(st.model)
    st.step += 1
    return loss_mean, _mean_logs(logs), grad_norm


def _log(st: _State, loss: torch.Tensor, logs: dict[str, Any], grad_norm: torch.Tensor | None,
         writer: Any, progress: _Progress, logged: int) -> None:
    """Training scalars to TensorBoard and the progress bar (rank 0)."""
    norm = grad_norm if grad_norm is not None else _grad_norm(st.model)
    scalars = {"loss": loss.item(), **{k: float(v) for k, v in logs.items()},
               "lr": st.sched.get_last_lr()[0], "grad_norm": norm.item()}
    for k, v in scalars.items():
        writer.add_scalar(f"train/{k}", v, st.step)
    progress.update(st.step, st.step - logged, scalars)
    st.metrics["loss"] = scalars["loss"]


def _validate(st: _State, val_fn: ValFn | None, writer: Any, device: torch.device, rank: int, world: int,
              precision: str = "auto") -> None:
    """Rank 0 scores the EMA model; every rank waits for it."""
    if rank == 0 and val_fn is not None:
        st.ema.module.eval()
        with torch.no_grad(), autocast(device, precision):
            st.metrics.update(val_fn(st.ema.module, st.step, writer))
        for k, v in st.metrics.items():
            if k != "loss":
                writer.add_scalar(f"val/{k}", v, st.step)
    if world > 1:
        dist.barrier()


def _save_checkpoint(st: _State, ckpts: Checkpoints, model_config: dict, desc: str, writer: Any,
                     rank: int, world: int, keep: int | None = None) -> None:
    """Rank 0 writes `ckpt-<step>/` (with every rank's stream position and RNG); all point `last_good` at it."""
    ranks = rank_states(st.stream, world)
    if rank == 0:
        start = time.perf_counter()
        path = ckpts.save(st.step, model=st.model, ema=st.ema.module, config=model_config,
                          state=st.state_dict(ranks), meta={"metrics": st.metrics, "desc": desc})
        seconds = time.perf_counter() - start
        log.info("%s: wrote %s in %.2f s", desc, path.name, seconds)
        writer.add_scalar("train/checkpoint_seconds", seconds, st.step)
        if keep:
            for gone in ckpts.prune(keep):
                log.info("%s: pruned %s (train.keep_checkpoints=%d)", desc, gone.name, keep)
        writer.flush()
    if world > 1:
        dist.barrier()
    st.last_good, st.saved_at = ckpts.latest(), time.monotonic()


def _time_due(since: float, minutes: float | None, device: torch.device, world: int) -> bool:
    """Whether `minutes` have passed since `since` on rank 0's clock (every rank gets its answer)."""
    if minutes is None:
        return False
    due = torch.tensor([time.monotonic() - since >= minutes * 60], dtype=torch.int32, device=device)
    if world > 1:
        dist.broadcast(due, src=0)
    return bool(due.item())


def _log_batch(stream: EpochStream, cfg: TrainConfig, world: int, writer: Any, desc: str) -> None:
    """The effective batch of one optimiser step, once at the start (log and TensorBoard text)."""
    micro = getattr(stream, "batch_size", None)
    if micro is None:
        return
    text = (f"effective batch {micro * cfg.grad_accum * world} = micro-batch {micro} x grad_accum "
            f"{cfg.grad_accum} x {world} ranks")
    log.info("%s: %s", desc, text)
    writer.add_text("train/batch", text, 0)
    if micro * cfg.grad_accum * world != cfg.batch_size:
        log.warning("%s: the stream's micro-batches make an effective batch of %d, not train.batch_size %d",
                    desc, micro * cfg.grad_accum * world, cfg.batch_size)


def fit(
    *,
    model: nn.Module,
    loss_fn: LossFn,
    stream: EpochStream,
    cfg: TrainConfig,
    out_dir: str | Path,
    model_config: dict,
    device: torch.device,
    val_fn: ValFn | None = None,
    extra: dict[str, Any] | None = None,
    after_step: AfterStep | None = None,
    monitor: Monitor | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train `model` for `cfg.steps` optimizer steps, resuming from `out_dir/latest` if present.

    `extra`: objects with state_dict/load_state_dict saved in and restored from every checkpoint.
    `after_step(batch, step)`: run after each optimiser step (its logs join the training scalars);
    with `cfg.grad_accum` > 1 it sees the step's last micro-batch.
    `monitor(ema_module, step, writer)`: rank 0, after each step's validation (e.g. sample grids); it
    decides itself when it is due and must leave the RNG state as it found it.
    """
    out_dir = Path(out_dir)
    rank, world = _rank_world()
    configure_backends(device)
    model.to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model, cfg, device)
    st = _State(model, ema, opt, make_scheduler(opt, cfg), stream, extra or {})
    ckpts = Checkpoints(out_dir)
    _restore_or_seed(st, ckpts.latest() if rank == 0 else None, cfg.seed, desc, device, rank, world)
    if st.step >= cfg.steps:
        return st.result()
    train_model = _wrap_model(model, cfg, device, world)
    writer = _open_writer(out_dir) if rank == 0 else None
    if rank == 0:
        _log_batch(stream, cfg, world, writer, desc)
    progress = _Progress(desc, cfg.steps, st.step, enabled=rank == 0)
    batches: Iterator[Any] = iter(stream)
    model.train()
    try:
        logged = st.step
        while st.step < cfg.steps:
            micro = [_to_device(next(batches), device) for _ in range(cfg.grad_accum)]
            loss, logs, grad_norm = _train_step(st, train_model, loss_fn, micro, cfg, device, world, desc)
            if after_step is not None:
                with autocast(device, cfg.precision):
                    logs = {**logs, **after_step(micro[-1], st.step)}
            if rank == 0 and _due(st.step, cfg.log_every, cfg.steps):
                _log(st, loss, logs, grad_norm, writer, progress, logged)
                logged = st.step
            _after_step_io(st, cfg, val_fn, monitor, ckpts, model_config, desc, writer, device, rank, world)
            if st.step < cfg.steps and stop_agreed(world, device):  # its flow run is cancelled (tagdit.train.stop)
                _stop_early(st, cfg, ckpts, model_config, desc, writer, rank, world)
    finally:
        getattr(batches, "close", lambda: None)()
        progress.close()
        if writer is not None:
            writer.close()
    return st.result()


def _after_step_io(st: _State, cfg: TrainConfig, val_fn: ValFn | None, monitor: Monitor | None, ckpts: Checkpoints,
                   model_config: dict, desc: str, writer: Any, device: torch.device, rank: int, world: int) -> None:
    """What is due after a step: validation (all ranks), the rank-0 monitor, a checkpoint (all ranks)."""
    if _due(st.step, cfg.val_every, cfg.steps):
        _validate(st, val_fn, writer, device, rank, world, cfg.precision)
    if monitor is not None and rank == 0:
        monitor(st.ema.module, st.step, writer)
    if _due(st.step, cfg.checkpoint_every, cfg.steps) or _time_due(st.saved_at, cfg.checkpoint_minutes, device, world):
        _save_checkpoint(st, ckpts, model_config, desc, writer, rank, world, cfg.keep_checkpoints)


def _stop_early(st: _State, cfg: TrainConfig, ckpts: Checkpoints, model_config: dict, desc: str, writer: Any,
                rank: int, world: int) -> NoReturn:
    """A checkpoint of this step (unless one was just written), then `TrainingStopped` on every rank."""
    if not _due(st.step, cfg.checkpoint_every, cfg.steps):
        _save_checkpoint(st, ckpts, model_config, desc, writer, rank, world, cfg.keep_checkpoints)
    raise TrainingStopped(f"{desc}: stopped at step {st.step} of {cfg.steps} because its flow run is cancelled; "
                          f"checkpoint {st.last_good} (the next run resumes from it)")
