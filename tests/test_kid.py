import itertools

import numpy as np
import pytest
import torch

from models.kid import (
    ORIGINAL,
    STANDARD,
    KidVariant,
    kid,
    mmd2_batches,
    mmd2_subsets,
    mmd2_unbiased,
)


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
    for variant in (KidVariant("one batch", 75, 3, None), KidVariant("one subset", 299, 3, 2)):
        mean, std, n = kid(np.array(x), np.array(y), variant)  # every subset is the whole sets, any order
        assert mean == pytest.approx(expected, abs=1e-6) and std == pytest.approx(0.0, abs=1e-12)
    assert float(mmd2_unbiased(torch.tensor(x).double(), torch.tensor(y).double())) == pytest.approx(expected, abs=1e-6)
    assert abs(expected) > 1e-3  # the check is not vacuous


def test_kid_of_two_halves_of_one_sample_is_near_zero_and_grows_with_a_mean_shift():
    feats = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = feats[:2000], feats[2000:]
    same = float(mmd2_subsets(a, b, subset_size=1000, subsets=4).mean())  # Bińkowski et al.'s subset size
    shifts = [float(mmd2_subsets(a, b + s, subset_size=1000, subsets=4).mean()) for s in (0.1, 0.3, 1.0)]
    assert abs(same) < 3e-3  # measured 2e-4 (|mean| ≤ 1.3e-3 over other seeds)
    assert 0.02 < shifts[0] < shifts[1] < shifts[2]  # measured 0.041, 0.35, 7.8


def test_the_original_variant_scores_every_generated_batch_of_32_against_its_own_real_batch():
    feats = torch.randn(230, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    real, fake = feats[:70], feats[70:] + 0.5  # 70 real, 160 generated: 5 batches; reals run out after 2
    g = torch.Generator().manual_seed(0)  # the stream of permutations mmd2_batches draws
    py, px = torch.randperm(160, generator=g), torch.randperm(70, generator=g)
    expected, used = [], 0
    for j in range(0, 160, 32):
        if used + 32 > 70:
            px, used = torch.randperm(70, generator=g), 0
        expected.append(float(mmd2_unbiased(real[px[used:used + 32]], fake[py[j:j + 32]])))
        used += 32
    mean, std, n = kid(real, fake, ORIGINAL)
    assert (ORIGINAL.input_size, ORIGINAL.subset_size, n) == (75, 32, 5)
    assert mean == pytest.approx(np.mean(expected)) and std == pytest.approx(np.std(expected))
    assert kid(real, fake, ORIGINAL, seed=0) == (mean, std, n) and kid(real, fake, ORIGINAL, seed=1) != (mean, std, n)
    assert len(mmd2_batches(real, fake[:40])) == 1  # a partial last batch is left out, as whole batches only
    with pytest.raises(ValueError, match="equal dimension"):
        kid(real, fake[:, :4])


def test_the_standard_variant_draws_each_subset_independently_without_replacement():
    feats = torch.randn(300, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    real, fake = feats[:120], feats[120:]
    s = mmd2_subsets(real, fake, subset_size=100, subsets=7, seed=3)
    g = torch.Generator().manual_seed(3)
    expected = [float(mmd2_unbiased(real[torch.randperm(120, generator=g)[:100]],
                                    fake[torch.randperm(180, generator=g)[:100]])) for _ in range(7)]
    assert s.tolist() == pytest.approx(expected) and len(set(s.tolist())) == 7  # overlapping, not identical
    assert (STANDARD.input_size, STANDARD.subset_size, STANDARD.subsets) == (299, 1000, 100)
    assert kid(real, fake, STANDARD)[2] == 100  # subsets of min(1000, 120, 180) = 120
