"""Device choice and numeric precision: CUDA under torchrun, a data-stage worker's device, TF32, bf16
autocast (GPU, or CPU on request); on a CPU, a heap that keeps freed activation memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
CPU_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
CPU_TRIM_THRESHOLD = 1 << 30


def select_device(pref: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; under torchrun each rank takes its LOCAL_RANK GPU."""
    import torch

    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def cuda_device_count() -> int:
    """Visible CUDA devices (after CUDA_VISIBLE_DEVICES), 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def is_fake(device: str | None) -> bool:
    """`cpu:i` in `prefect.devices`: a CPU worker standing for a device (tests, benchmarks), held to one thread."""
    return device is not None and device.startswith("cpu:")


def unit_device(device: str | None, pref: str = "auto") -> torch.device:
    """The torch device of a data-stage worker's device (`cuda:i`; a fake `cpu:i` is the CPU); None = `select_device(pref)`."""
    import torch

    if device is None:
        return select_device(pref)
    return torch.device("cpu") if is_fake(device) else torch.device(device)


def unit_threads(device: str | None) -> int:
    """Threads a worker on `device` may use for decoding and CPU compute: 1 on a fake device, else 0 (the default)."""
    return 1 if is_fake(device) else 0


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls/convolutions on GPU; on CPU, a heap that keeps freed activation memory."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        retain_cpu_heap()


def retain_cpu_heap() -> bool:
    """Make glibc keep freed memory up to 1 GiB and serve blocks up to 32 MiB from the heap.

    By default each multi-MiB activation tensor is a fresh mmap (and munmap) whose pages fault in
    again on every forward: the demo VAE encodes batches of 16 at ~200 images/s that way and ~360
    with this (benchmarks/vae_encode.py). The price: the process returns freed memory to the OS
    later (at most ~1 GiB of it). A no-op off glibc; returns whether it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, CPU_TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        ok = False
    if not ok:
        log.debug("mallopt is not available: keeping the C library's default heap settings")
    return ok


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of `train.precision` on `device`: bf16, or None for plain fp32.

    `auto` is bf16 on CUDA and fp32 on CPU (CPU bf16 is slower than fp32 on most cores); `bf16`
    forces it on CPU too, which is how the tests run the GPU's mixed-precision path.
    """
    import torch

    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """bf16 autocast on `device` when `precision` asks for it (see `autocast_dtype`), else nothing."""
    import torch

    dtype = autocast_dtype(device, precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
