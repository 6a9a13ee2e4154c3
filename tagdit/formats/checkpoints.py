"""Weights and checkpoints: safetensors files that describe themselves, numbered checkpoint folders
that are never overwritten (their `meta.json` read back as a typed `CheckpointMeta`), and the RNG
state that makes a resume exact."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tagdit.files import write_bytes_atomic, write_json_atomic
from tagdit.stores import WEIGHTS, publish_files, pull_tree, unpublish


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """safetensors weights with the model's config as JSON metadata (rebuilds without pickle)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    write_bytes_atomic(path, save(tensors, metadata={"config": json.dumps(config, sort_keys=True)}))


def save_weights_only(folder: str | Path, model: nn.Module, config: dict, step: int = 0) -> Path:
    """A checkpoint folder holding one set of weights as both raw and EMA, and no training state:
    an untrained stand-in model that loads like a trained one (tests, benchmarks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "ema.safetensors"):
        save_weights(folder / name, model.state_dict(), config)
    write_json_atomic(folder / "meta.json", {"step": step})
    return folder


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, config) of a file written by `save_weights`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), json.loads(meta.get("config", "{}"))


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) global RNG states, as torch.load(weights_only=True) can read."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's `meta.json`: the step it was saved at and the training run's metrics then."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)  # loss, val_loss / val_psnr, ...
    desc: str | None = None  # the run that wrote it (`train-dit`, `train-vae`)


def read_checkpoint_meta(ckpt: str | Path) -> CheckpointMeta:
    """The `meta.json` `Checkpoints.save` wrote into checkpoint folder `ckpt`, or a clear error."""
    path = Path(ckpt) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint folder: it has no meta.json "
                                "(a checkpoint folder holds model.safetensors, ema.safetensors, state.pt, meta.json)")
    raw = json.loads(path.read_text())
    if "step" not in raw:
        raise ValueError(f"{path} records no step: not a meta.json that Checkpoints.save wrote")
    return CheckpointMeta(step=int(raw["step"]), metrics=dict(raw.get("metrics", {})), desc=raw.get("desc"))


class Checkpoints:
    """Numbered checkpoint folders `ckpt-NNNNNNN/` that are never overwritten, plus a `latest` pointer.

    A folder holds `model.safetensors` and `ema.safetensors` (weights + model config), `state.pt`
    (optimiser, schedule, EMA count, stream position, RNG, extras) and `meta.json` (step, metrics;
    read it with `read_checkpoint_meta`).
    """

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

    def require_latest(self) -> Path:
        """The latest complete checkpoint, or a clear error."""
        latest = self.latest()
        if latest is None:
            raise FileNotFoundError(f"no checkpoint at {self.root} (expected ckpt-*/ and a 'latest' pointer)")
        return latest

    @contextlib.contextmanager
    def pinned(self, ckpt: Path) -> Iterator[Path]:
        """Keep `ckpt` from pruning while the block runs (e.g. an evaluation of a run still training)."""
        pin = Path(ckpt) / f".pin-{uuid.uuid4().hex[:12]}"
        pin.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        try:
            yield Path(ckpt)
        finally:
            pin.unlink(missing_ok=True)

    @staticmethod
    def is_pinned(ckpt: Path) -> bool:
        """Pinned by a live process (a pin left by a dead process on this host does not count)."""
        for pin in ckpt.glob(".pin-*"):
            try:
                holder = json.loads(pin.read_text())
            except (OSError, ValueError):
                continue
            if holder.get("host") != socket.gethostname():
                return True  # another machine's pin: trust it
            try:
                os.kill(int(holder["pid"]), 0)
                return True
            except ProcessLookupError:
                continue
            except PermissionError:
                return True
        return False

    def keep_for(self, ckpt: Path, holder: str) -> None:
        """Pin `ckpt` for as long as `holder`'s record (a stage stamp) names it: pruning never deletes it.

        A record outlives the run that wrote it: a finished train-dit stamp names its last checkpoint
        while the run is resumed for more steps, and evaluate --force reads that stamp. So the record's
        checkpoint stays (costing disk beyond `keep`) rather than evaluation silently swapping in another
        one. One pin per holder: pinning a new checkpoint releases the holder's earlier one.
        """
        name = f".kept-{holder}"
        for other in self.root.glob(f"ckpt-[0-9]*/{name}"):
            if other.parent != Path(ckpt):
                other.unlink(missing_ok=True)
                unpublish(other)
        write_json_atomic(Path(ckpt) / name, {"holder": holder})

    @staticmethod
    def kept_by(ckpt: Path) -> list[str]:
        """The records (`keep_for` holders) that pin `ckpt`."""
        return sorted(p.name.removeprefix(".kept-") for p in Path(ckpt).glob(".kept-*"))

    def record_pinned(self) -> list[Path]:
        """Checkpoints a record pins (they stay on disk beyond `keep`)."""
        return [c for c in sorted(self.root.glob("ckpt-[0-9]*")) if self.kept_by(c)]

    def prune(self, keep: int) -> list[Path]:
        """Delete all but the newest `keep` checkpoints, never `latest`, one in use or one a record names."""
        latest = self.latest()
        ckpts = sorted(self.root.glob("ckpt-[0-9]*"))
        doomed = [c for c in ckpts[:-keep]
                  if c != latest and not self.is_pinned(c) and not self.kept_by(c)] if keep else []
        for c in doomed:
            shutil.rmtree(c, ignore_errors=True)
            unpublish(c)  # a run root on a URL: the store keeps `keep` too
        return doomed

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        ema: nn.Module,  # the EMA copy of `model`
        config: dict,
        state: dict[str, Any],
        meta: dict[str, Any],
    ) -> Path:
        """Write a complete checkpoint folder under a temp name, rename it, then move `latest`.

        A write that fails (a full disk) removes the partial folder and leaves `latest` and every
        earlier checkpoint as they were, so the run resumes from the previous one.
        """
        final = self.dir_for(step)
        tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
        try:
            if not (final / "meta.json").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                save_weights(tmp / "model.safetensors", model.state_dict(), config)
                save_weights(tmp / "ema.safetensors", ema.state_dict(), config)
                torch.save(state, tmp / "state.pt")
                write_json_atomic(tmp / "meta.json", {"step": step, **meta})
                shutil.rmtree(final, ignore_errors=True)  # an incomplete folder from a killed run
                os.replace(tmp, final)
                # a run root on a URL: the folder's files uploaded, meta.json (what makes it complete) last
                publish_files(sorted(final.iterdir(), key=lambda f: (f.name == "meta.json", f.name)))
            write_bytes_atomic(self.root / "latest", f"{final.name}\n".encode())  # uploaded last
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            before = self.latest()
            raise OSError(e.errno, f"could not write checkpoint {final.name} ({e.strerror or e}); it was removed and "
                          f"latest is still {before.name if before else 'none'}: the run resumes from there "
                          f"once {self.root} has room", e.filename) from e
        return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's `vae/`/`dit/` folder (its `latest`), to load a model from. In a
    working copy of a run on a URL, the folder's small files come down first, then the weights of that one
    checkpoint, not its optimiser state (`state.pt`: a resume's, which pulls its run's folder)."""
    p = Path(path)
    pull_tree(p, skip=WEIGHTS)
    ckpt = p if (p / "meta.json").is_file() else Checkpoints(p).latest()
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint at {p} (expected ckpt-*/ or a 'latest' pointer)")
    pull_tree(ckpt, skip=("state.pt",))
    return ckpt


def unread_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoint folders under `folder` (a run's) that no stage reads: not a trainer's `latest` (what
    a resume loads), not one a record names (`Checkpoints.keep_for`: what encode and evaluate load), not
    one a live process pins. A stage computing on a run kept on a URL leaves their weights in the store;
    their meta.json files still come down, so pruning finds them and deletes them there too."""
    roots = sorted({c.parent for c in Path(folder).rglob("ckpt-[0-9]*") if c.is_dir()})
    return [c for root in roots for c in sorted(root.glob("ckpt-[0-9]*"))
            if c != Checkpoints(root).latest() and not Checkpoints.kept_by(c) and not Checkpoints.is_pinned(c)]


def load_model_weights(path: str | Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(state_dict, config, checkpoint dir) of the EMA (default) or raw weights."""
    ckpt = resolve_checkpoint(path)
    state, config = load_weights(ckpt / ("ema.safetensors" if ema else "model.safetensors"))
    return state, config, ckpt


def checkpoint_facts(ckpt: Path) -> dict[str, Any]:
    """What every trainer's stamp records: checkpoint, step, last training loss, parameter count."""
    meta = read_checkpoint_meta(ckpt)
    state, _ = load_weights(ckpt / "ema.safetensors")
    return {"checkpoint": str(ckpt), "step": meta.step, "loss": meta.metrics.get("loss"),
            "params": sum(v.numel() for v in state.values())}
