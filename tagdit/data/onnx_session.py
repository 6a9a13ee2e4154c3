"""ONNX Runtime for the WD tagger: the import, the providers, the idle-GPU warning and the session.

`open_session` starts an inference session the way the tagger runs it: CUDA first when this
onnxruntime build has it (the `gpu` extra), else several single-threaded runs side by side on the
CPU, no busy-waiting. It warns once per process, loudly, when torch sees a GPU that onnxruntime
cannot use. Split from `tagdit.data.tagger`, which loads labels, preprocesses and selects tags.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tagdit.config import ConfigError

log = logging.getLogger(__name__)


def import_onnxruntime():
    """The onnxruntime module, or an ImportError naming the extra that installs it."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError('onnxruntime is not installed: pip install -e ".[cpu]", or ".[gpu]" for CUDA tagging '
                          "(one of the two, never both)") from e
    return ort


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (the `gpu` extra: onnxruntime-gpu), CPU always."""
    ort = import_onnxruntime()

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def device_providers(device: str | None) -> list | None:
    """ONNX Runtime providers for a data-stage worker's device: `cuda:i` = CUDA on device_id i (then the
    CPU), a fake `cpu:i` = the CPU, None = `default_providers()` (chosen for the user, warned about)."""
    if device is None:
        return None
    if device.startswith("cpu"):
        return ["CPUExecutionProvider"]
    available = import_onnxruntime().get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ConfigError(f"prefect.devices names {device}, but this onnxruntime offers no CUDAExecutionProvider "
                           f"({available}): pip install -e '.[gpu]' (docs/guide.md: GPU tagging)")
    return [("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])}), "CPUExecutionProvider"]


def _installed(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def gpu_idle_warning() -> str | None:
    """Why tagging would stay on the CPU of a CUDA machine (torch sees a GPU, onnxruntime offers no
    CUDA provider), with the fix; None when there is nothing to say."""
    ort = import_onnxruntime()

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    cpu, gpu = _installed("onnxruntime"), _installed("onnxruntime-gpu")
    why = (f"BOTH onnxruntime {cpu} and onnxruntime-gpu {gpu} are installed and the CPU one shadows the GPU one"
           if cpu and gpu else f"the installed onnxruntime is the CPU build ({cpu or 'version unknown'})")
    return (f"TAGGING RUNS ON THE CPU although torch sees {torch.cuda.device_count()} CUDA device(s): onnxruntime "
            f"offers no CUDAExecutionProvider ({ort.get_available_providers()}); {why}. Fix: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install -e '.[gpu]' (docs/guide.md: GPU tagging)")


_WARNED_GPU_IDLE = False


def warn_once_if_gpu_idle() -> None:
    """Log `gpu_idle_warning` as a WARNING, the first time this process has one to give."""
    global _WARNED_GPU_IDLE
    if not _WARNED_GPU_IDLE and (msg := gpu_idle_warning()):
        _WARNED_GPU_IDLE = True
        log.warning("%s\n%s\n%s", "!" * 100, msg, "!" * 100)


def open_session(model_path: str | Path, providers: Sequence[Any] | None, threads: int) -> tuple[Any, int, bool]:
    """(ONNX session, runs side by side, on a CPU) for `model_path`; `providers` None = `default_providers()`
    (a provider is a name or a (name, options) pair)."""
    ort = import_onnxruntime()
    if providers is None:  # chosen for the user: say so loudly when a GPU sits idle
        warn_once_if_gpu_idle()
    providers = list(providers or default_providers())
    # On a CPU, `runs` single-threaded runs at once (one per core by default) instead of one run
    # split over the cores: no run waits for a thread whose core is preprocessing (docs/design.md §6)
    names = [p if isinstance(p, str) else p[0] for p in providers]
    on_cpu = names == ["CPUExecutionProvider"]
    runs = (threads or os.cpu_count() or 1) if on_cpu else 1
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1 if runs > 1 else threads  # 0 = onnxruntime's default (all cores)
    opts.log_severity_level = 3
    # no busy-waiting between runs: the preprocessing threads need those cycles
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), opts, providers=providers)
    if "CUDAExecutionProvider" in names and "CUDAExecutionProvider" not in session.get_providers():
        log.warning("tagger: onnxruntime could not start its CUDA provider (CUDA/cuDNN libraries missing or "
                    "not matching?); tagging on %s", session.get_providers())
    return session, runs, on_cpu
