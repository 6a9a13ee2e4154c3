"""Device choice and numeric precision: CUDA under torchrun, TF32, bf16 autocast (GPU, or CPU on request)."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch


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


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of `train.precision` on `device`: bf16, or None for plain fp32.

    `auto` is bf16 on CUDA and fp32 on CPU (CPU bf16 is slower than fp32 on most cores); `bf16`
    forces it on CPU too, which is how the tests run the GPU's mixed-precision path.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """bf16 autocast on `device` when `precision` asks for it (see `autocast_dtype`), else nothing."""
    dtype = autocast_dtype(device, precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
