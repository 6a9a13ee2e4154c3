"""Float comparisons that hold on every CPU kind.

Two float32 computations of the same maths agree only to rounding unless they run the same kernels
on the same shapes: MKL/oneDNN pick other GEMM kernels for another batch size or instruction set
(AVX-512, AVX2, SSE4.2), so sums are taken in another order. These helpers compare within a
tolerance relative to the values' magnitude; tests keep exact equality (`torch.equal`) only where
the same kernels run on the same shapes, and say so.
"""

from __future__ import annotations

import numpy as np
import torch


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """|actual - expected| ≤ rel × max(1, max|expected|) everywhere (float32 rounding, any kernel)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x scale {scale:.3g}"


def assert_images_close(actual, expected, levels: int = 1) -> None:
    """8-bit images equal to `levels`: a float difference at rounding size can flip one level."""
    a, b = np.asarray(actual).astype(np.int16), np.asarray(expected).astype(np.int16)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = int(np.abs(a - b).max())
    assert diff <= levels, f"images differ by up to {diff} levels (> {levels})"
