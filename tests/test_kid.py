import itertools

import numpy as np
import pytest
import torch

from models.kid import kid, mmd2_unbiased


def loop_mmd2(x, y):
    """Unbiased MMD² with k(a, b) = (aᵀb/d + 1)³, written out with explicit loops."""
    k = lambda a, b: (sum(ai * bi for ai, bi in zip(a, b, strict=True)) / len(a) + 1) ** 3  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_formula_on_tiny_features():
    x = [[0.5, -1.0], [2.0, 0.3], [-0.7, 1.1]]
    y = [[1.5, 0.2], [0.1, -0.4], [-2.0, 0.9]]
    expected = loop_mmd2(x, y)
    mean, std = kid(np.array(x), np.array(y), subset_size=3)  # one subset: the whole sets, any order
    assert mean == pytest.approx(expected, abs=1e-6) and std == 0.0
    assert float(mmd2_unbiased(torch.tensor(x).double(), torch.tensor(y).double())) == pytest.approx(expected, abs=1e-6)
    assert abs(expected) > 1e-3  # the check is not vacuous


def test_kid_of_two_halves_of_one_sample_is_near_zero_and_grows_with_a_mean_shift():
    feats = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = feats[:2000], feats[2000:]
    same, _ = kid(a, b, subset_size=1000, subsets=4)  # Bińkowski et al.'s subset size
    shifts = [kid(a, b + s, subset_size=1000, subsets=4)[0] for s in (0.1, 0.3, 1.0)]
    assert abs(same) < 3e-3  # measured 2e-4 (|mean| ≤ 1.3e-3 over other seeds)
    assert 0.02 < shifts[0] < shifts[1] < shifts[2]  # measured 0.041, 0.35, 7.8


def test_kid_defaults_to_disjoint_subsets_of_32_and_is_seeded():
    feats = torch.randn(200, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, y = feats[:100], feats[100:] + 0.5
    per_batch = []
    g = torch.Generator().manual_seed(0)  # the same stream of permutations kid() draws
    px, py = torch.randperm(100, generator=g), torch.randperm(100, generator=g)
    for j in range(0, 96, 32):  # 100 // 32 = 3 disjoint batches, as KID_measure.R's batches of 32
        per_batch.append(float(mmd2_unbiased(x[px[j:j + 32]], y[py[j:j + 32]])))
    mean, std = kid(x, y)
    assert mean == pytest.approx(np.mean(per_batch)) and std == pytest.approx(np.std(per_batch))
    assert kid(x, y, seed=0) == (mean, std) and kid(x, y, seed=1) != (mean, std)
    with pytest.raises(ValueError, match="equal dimension"):
        kid(x, y[:, :4])
