"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD²
between two feature sets under the polynomial kernel k(x, y) = (xᵀy/d + 1)³, averaged over subsets.

Feature extraction (Inception pool features) is the caller's; this module only sees (N, d) arrays.
The defaults follow the original project's KID_measure.R: KID is computed per batch of 32 real and
32 generated images and averaged over the batches, i.e. disjoint subsets of 32 covering the sample.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SUBSET_SIZE = 32  # KID_measure.R's batch_size: one MMD² estimate per batch of 32 real + 32 generated


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (xᵀy / d + 1)³ for every pair: (n, d), (m, d) -> (n, m)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3): mean off-diagonal k(x, x') + mean off-diagonal
    k(y, y') - 2 · mean k(x, y), for x (n, d), y (m, d) with n, m ≥ 2; a 0-dim tensor."""
    n, m = len(x), len(y)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return xx + yy - 2 * k_xy.mean()


def kid(
    real: Tensor | np.ndarray,
    fake: Tensor | np.ndarray,
    subset_size: int = SUBSET_SIZE,
    subsets: int | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """KID of two feature sets (N_r, d), (N_f, d) -> (mean, std) of MMD² over subsets.

    Each subset pairs m = min(subset_size, N_r, N_f) real with m fake features, taken as consecutive
    slices of seeded random permutations (a fresh permutation when one runs out). subsets = None
    uses min(N_r, N_f) // m subsets: disjoint, as KID_measure.R's batches; Bińkowski et al. and
    torch-fidelity use subset_size = 1000, subsets = 100. std: population std over the subsets.
    """
    x = torch.as_tensor(real, dtype=torch.float64)
    y = torch.as_tensor(fake, dtype=torch.float64)
    m = min(subset_size, len(x), len(y))
    if m < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need >= 2 samples of equal dimension per set, got {tuple(x.shape)}, {tuple(y.shape)}")
    per_perm = min(len(x), len(y)) // m
    subsets = per_perm if subsets is None else subsets
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    g = torch.Generator().manual_seed(seed)
    scores = []
    for i in range(subsets):
        if i % per_perm == 0:
            perm_x, perm_y = torch.randperm(len(x), generator=g), torch.randperm(len(y), generator=g)
        j = (i % per_perm) * m
        scores.append(mmd2_unbiased(x[perm_x[j:j + m]], y[perm_y[j:j + m]]))
    s = torch.stack(scores)  # (subsets,)
    return float(s.mean()), float(s.std(unbiased=False))
