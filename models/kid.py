"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD²
between two feature sets under the polynomial kernel k(x, y) = (xᵀy/d + 1)³, averaged over subsets.

Feature extraction (models.inception) is the caller's; this module only sees (N, d) arrays. Two named
variants fix everything else, so a KID in metrics.json says which one it is:

- `ORIGINAL`, the original project's DiT/KID_measure.R: InceptionV3 at 75x75 input, one MMD² per batch
  of 32 generated images against a batch of 32 real ones (disjoint batches covering the generated set),
  averaged (its Keras `Mean` tracker). Each MMD² over 32 images is unbiased but noisy, and 75 px
  features are not the 299 px ones papers use: it compares with the original, not with papers.
- `STANDARD`, as papers report it (Bińkowski et al.; torch-fidelity's defaults): 299x299 input,
  100 subsets of 1000 drawn at random without replacement from each set, mean ± std.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


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


def _features(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, size: int) -> tuple[Tensor, Tensor, int]:
    """Both sets as float64 tensors and the subset size m = min(size, N_r, N_f), checked usable."""
    x = torch.as_tensor(real, dtype=torch.float64)
    y = torch.as_tensor(fake, dtype=torch.float64)
    m = min(size, len(x), len(y))
    if m < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need >= 2 samples of equal dimension per set, got {tuple(x.shape)}, {tuple(y.shape)}")
    return x, y, m


def mmd2_batches(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, batch: int = 32, seed: int = 0) -> Tensor:
    """KID_measure.R's estimate, one MMD² per batch: (N_f // m,) for m = min(batch, N_r, N_f).

    The generated set is cut into disjoint batches of m (in a seeded random order); each meets the
    next m real features of a seeded permutation of the real set, a fresh permutation when it runs
    out (the original drew a fresh real batch for every generated one).
    """
    x, y, m = _features(real, fake, batch)
    g = torch.Generator().manual_seed(seed)
    perm_y = torch.randperm(len(y), generator=g)
    perm_x, used = torch.randperm(len(x), generator=g), 0
    scores = []
    for j in range(0, len(y) - m + 1, m):
        if used + m > len(x):
            perm_x, used = torch.randperm(len(x), generator=g), 0
        scores.append(mmd2_unbiased(x[perm_x[used:used + m]], y[perm_y[j:j + m]]))
        used += m
    return torch.stack(scores)  # (N_f // m,)


def mmd2_subsets(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, subset_size: int = 1000, subsets: int = 100,
                 seed: int = 0) -> Tensor:
    """Bińkowski et al.'s / torch-fidelity's estimate: (subsets,) MMD², each of m = min(subset_size,
    N_r, N_f) features drawn from each set without replacement, independently per subset."""
    x, y, m = _features(real, fake, subset_size)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    g = torch.Generator().manual_seed(seed)
    scores = [mmd2_unbiased(x[torch.randperm(len(x), generator=g)[:m]], y[torch.randperm(len(y), generator=g)[:m]])
              for _ in range(subsets)]
    return torch.stack(scores)  # (subsets,)


@dataclass(frozen=True)
class KidVariant:
    """One way of measuring KID: the extractor's input size and how MMD² is averaged over subsets."""

    name: str
    input_size: int  # px the images are resized to (bilinear, no antialiasing) before Inception-v3
    subset_size: int  # images per set in one MMD² estimate
    subsets: int | None  # None: disjoint batches covering the generated set (KID_measure.R)

    def mmd2(self, real: Tensor | np.ndarray, fake: Tensor | np.ndarray, seed: int = 0) -> Tensor:
        """MMD² per subset, (subsets,)."""
        if self.subsets is None:
            return mmd2_batches(real, fake, self.subset_size, seed)
        return mmd2_subsets(real, fake, self.subset_size, self.subsets, seed)


ORIGINAL = KidVariant("original", input_size=75, subset_size=32, subsets=None)
STANDARD = KidVariant("standard", input_size=299, subset_size=1000, subsets=100)
VARIANTS = {v.name: v for v in (ORIGINAL, STANDARD)}


def kid(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, variant: KidVariant = ORIGINAL,
        seed: int = 0) -> tuple[float, float, int]:
    """KID of two feature sets (N_r, d), (N_f, d) under `variant`: (mean, population std, subsets)."""
    s = variant.mmd2(real, fake, seed)
    return float(s.mean()), float(s.std(unbiased=False)), len(s)
