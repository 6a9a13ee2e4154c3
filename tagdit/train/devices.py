"""Device choice and numeric precision: CUDA under torchrun, TF32, bf16 autocast on GPU."""

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


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on GPU; full fp32 on CPU (CPU bf16 is slower than fp32 on most cores)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
