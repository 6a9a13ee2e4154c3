"""Training machinery shared by the VAE and the DiT: devices, optimiser, schedule, EMA,
numbered safetensors checkpoints, an exactly resumable WebDataset stream, DDP, and `fit`.

`fit` owns everything that is not model-specific; a trainer supplies `loss_fn(model, batch, step)`
and optionally `val_fn(ema_module, step, writer)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tagdit.config import TrainConfig
from tagdit.files import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- devices and precision


def select_device(pref: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; under torchrun each rank takes its LOCAL_RANK GPU."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls/convolutions on GPU; nothing to do on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on GPU; full fp32 on CPU (CPU bf16 is slower than fp32 on most cores)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------- optimiser, schedule, EMA


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norm scales (params with ndim < 2)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=True)  # fused: CPU too (~4x faster step)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps)
    )


class EMA:
    """Exponential moving average of a model's parameters and buffers (torch's AveragedModel)."""

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


# ---------------------------------------------------------------- weights and checkpoints


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """safetensors weights with the model's config as JSON metadata (rebuilds without pickle)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    write_bytes_atomic(path, save(tensors, metadata={"config": json.dumps(config, sort_keys=True)}))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), json.loads(meta.get("config", "{}"))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Checkpoints:
    """Numbered checkpoint folders `ckpt-NNNNNNN/` that are never overwritten, plus a `latest` pointer."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def dir_for(self, step: int) -> Path:
        return self.root / f"ckpt-{step:07d}"

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        d = self.root / pointer.read_text().strip()
        return d if (d / "meta.json").is_file() else None

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        ema: EMA,
        config: dict,
        state: dict[str, Any],
        meta: dict[str, Any],
    ) -> Path:
        """Write a complete checkpoint folder under a temp name, rename it, then move `latest`."""
        final = self.dir_for(step)
        if not (final / "meta.json").is_file():
            tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_weights(tmp / "model.safetensors", model.state_dict(), config)
            save_weights(tmp / "ema.safetensors", ema.module.state_dict(), config)
            torch.save(state, tmp / "state.pt")
            write_json_atomic(tmp / "meta.json", {"step": step, **meta})
            shutil.rmtree(final, ignore_errors=True)  # an incomplete folder from a killed run
            os.replace(tmp, final)
        write_bytes_atomic(self.root / "latest", f"{final.name}\n".encode())
        return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's `vae/`/`dit/` folder (its `latest`)."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    latest = Checkpoints(p).latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint at {p} (expected ckpt-*/ or a 'latest' pointer)")
    return latest


def load_model_weights(path: str | Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(state_dict, config, checkpoint dir) of the EMA (default) or raw weights."""
    ckpt = resolve_checkpoint(path)
    state, config = load_weights(ckpt / ("ema.safetensors" if ema else "model.safetensors"))
    return state, config, ckpt


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint is kept."""


# ---------------------------------------------------------------- data stream


class EpochStream:
    """Deterministic, exactly resumable batches from WebDataset tar shards.

    Epoch e visits the shards in an order shuffled with seed (seed, e) and shuffles samples through
    a buffer with the same RNG; global sample i goes to rank i % world_size. `decode(raw)` turns a
    raw sample (`__key__`, `__seed__` and extension -> bytes) into a training example; `__seed__`
    is a per-sample integer for augmentation randomness (use it, not the global RNG: decoding runs
    in a prefetch thread). Returning None drops the sample. Resuming skips samples without decoding.
    """

    def __init__(
        self,
        urls: list[str],
        decode: Callable[[dict[str, Any]], Any],
        batch_size: int,
        seed: int,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        collate: Callable[[list], Any] | None = None,
        prefetch: int = 2,
    ):
        if not urls:
            raise ValueError("EpochStream needs at least one shard")
        self.urls = sorted(str(u) for u in urls)
        self.decode, self.batch_size, self.seed = decode, batch_size, seed
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.collate = collate or torch.utils.data.default_collate
        self.prefetch = prefetch
        self._state = {"epoch": 0, "consumed": 0}

    def state_dict(self) -> dict[str, int]:
        """Position after the last batch handed out."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._state = {"epoch": int(state["epoch"]), "consumed": int(state["consumed"])}

    def _epoch_samples(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This rank's raw samples of one epoch, in their deterministic order."""
        from webdataset.tariterators import tarfile_samples

        rng = random.Random(f"{self.seed}-{epoch}")
        urls = list(self.urls)
        rng.shuffle(urls)
        buffer: list[dict[str, Any]] = []
        index = 0

        def emit(sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
            nonlocal index
            mine = index % self.world_size == self.rank
            sample["__seed__"] = hash((self.seed, epoch, index)) & 0x7FFFFFFF
            index += 1
            if mine:
                yield sample

        for sample in tarfile_samples({"url": u} for u in urls):
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield from emit(buffer.pop())
        rng.shuffle(buffer)
        for sample in buffer:
            yield from emit(sample)

    def _samples_from(self, epoch: int, skip: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, index, raw) forever, starting `skip` samples into `epoch`."""
        while True:
            seen = 0
            for i, raw in enumerate(self._epoch_samples(epoch)):
                seen += 1
                if i >= skip:
                    yield epoch, i, raw
            if seen == 0:
                raise RuntimeError(f"no samples for rank {self.rank} of {self.world_size} in {self.urls}")
            epoch, skip = epoch + 1, 0

    def _batches(self, stop: threading.Event) -> Iterator[tuple[Any, dict[str, int]]]:
        examples = []
        for epoch, i, raw in self._samples_from(self._state["epoch"], self._state["consumed"]):
            example = self.decode(raw)
            if example is not None:
                examples.append(example)
            if len(examples) == self.batch_size:
                yield self.collate(examples), {"epoch": epoch, "consumed": i + 1}
                examples = []
                if stop.is_set():
                    return

    def __iter__(self) -> Iterator[Any]:
        """Batches, produced in a background thread `prefetch` batches ahead."""
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def produce() -> None:
            try:
                for item in self._batches(stop):
                    while not stop.is_set():
                        try:
                            q.put(("batch", item), timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as e:  # surfaced in the consumer
                q.put(("error", e))

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "error":
                    raise item
                batch, state = item
                self._state = state
                yield batch
        finally:
            stop.set()


# ---------------------------------------------------------------- distributed


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


def launch_torchrun(module: str, args: list[str], nproc: int) -> None:
    """Run `python -m module args` under torchrun with `nproc` processes on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", module, *args]
    log.info("launching %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)


class _Progress:
    """tqdm on stderr plus a Prefect progress artifact when running inside a Prefect task."""

    def __init__(self, desc: str, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.enabled, self.total = enabled, total
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, mininterval=2)
        self.artifact = None
        if enabled:
            try:
                from prefect.artifacts import create_progress_artifact
                from prefect.context import TaskRunContext

                if TaskRunContext.get() is not None:
                    self.artifact = create_progress_artifact(100 * initial / total, description=desc)
            except Exception:  # progress reporting must never break training
                self.artifact = None

    def update(self, step: int, n: int, postfix: dict[str, float]) -> None:
        self.bar.update(n)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        if self.artifact is not None:
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.artifact, 100 * step / self.total)
            except Exception:
                self.artifact = None

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


def _restore(ckpt: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, sched: Any,
             stream: EpochStream, extra: dict[str, Any]) -> int:
    model.load_state_dict(load_weights(ckpt / "model.safetensors")[0])
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    ema.load_state_dict({**ema.state_dict(), **{"module." + k: v for k, v in load_weights(ckpt / "ema.safetensors")[0].items()},
                         "n_averaged": state["ema_n_averaged"]})
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["stream"])
    for name, obj in extra.items():
        obj.load_state_dict(state["extra"][name])
    _set_rng_state(state["rng"])
    return int(state["step"])


def fit(
    *,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, float]]],
    stream: EpochStream,
    cfg: TrainConfig,
    out_dir: str | Path,
    model_config: dict,
    device: torch.device,
    val_fn: Callable[[nn.Module, int, Any], dict[str, float]] | None = None,
    extra: dict[str, Any] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train `model` for `cfg.steps` optimizer steps, resuming from `out_dir/latest` if present."""
    out_dir = Path(out_dir)
    extra = extra or {}
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    configure_backends(device)
    model.to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model, cfg, device)
    sched = make_scheduler(opt, cfg)
    ckpts = Checkpoints(out_dir)
    step, metrics = 0, {}
    last_good = ckpts.latest()
    if last_good is not None:
        step = _restore(last_good, model, ema, opt, sched, stream, extra)
        metrics = json.loads((last_good / "meta.json").read_text()).get("metrics", {})
        log.info("%s: resumed from %s (step %d)", desc, last_good, step)
    else:
        seed_everything(cfg.seed + rank)
    if step >= cfg.steps:
        return TrainResult(step, last_good, metrics)  # type: ignore[arg-type]

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile and device.type == "cuda":
        train_model = torch.compile(train_model)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
    progress = _Progress(desc, cfg.steps, step, enabled=rank == 0)
    batches = iter(stream)
    logged = step
    model.train()
    try:
        while step < cfg.steps:
            batch = _to_device(next(batches), device)
            with autocast(device):
                loss, logs = loss_fn(train_model, batch, step)
            finite = torch.isfinite(loss.detach()).float()
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                raise NonFiniteLossError(
                    f"{desc}: loss became {loss.item()} at step {step + 1}; stopped. "
                    f"Last good checkpoint: {last_good or 'none yet'}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            ema.update(model)
            step += 1
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                scalars = {"loss": loss.item(), **{k: float(v) for k, v in logs.items()},
                           "lr": sched.get_last_lr()[0], "grad_norm": grad_norm.item()}
                for k, v in scalars.items():
                    writer.add_scalar(f"train/{k}", v, step)
                progress.update(step, step - logged, scalars)
                logged = step
                metrics["loss"] = scalars["loss"]
            if step % cfg.val_every == 0 or step == cfg.steps:
                if rank == 0 and val_fn is not None:
                    ema.module.eval()
                    with torch.no_grad(), autocast(device):
                        metrics.update(val_fn(ema.module, step, writer))
                    for k, v in metrics.items():
                        if k != "loss":
                            writer.add_scalar(f"val/{k}", v, step)
                if world > 1:
                    dist.barrier()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                if rank == 0:
                    state = {
                        "step": step,
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "ema_n_averaged": ema.state_dict()["n_averaged"],
                        "stream": stream.state_dict(),
                        "rng": _rng_state(),
                        "extra": {k: v.state_dict() for k, v in extra.items()},
                    }
                    last_good = ckpts.save(step, model=model, ema=ema, config=model_config, state=state,
                                           meta={"metrics": metrics, "desc": desc})
                    writer.flush()
                if world > 1:
                    dist.barrier()
                last_good = ckpts.latest()
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    return TrainResult(step, last_good, metrics)  # type: ignore[arg-type]
