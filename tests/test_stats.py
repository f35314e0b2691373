"""diffnas.report.stats: the tests and intervals `diffnas compare` reports, checked
against scipy's own permutation tests and t-tests, and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sst

from diffnas.report.stats import (
    holm,
    relabel_p,
    sign_flip_p,
    smallest_relabel_p,
    smallest_sign_flip_p,
    t_interval,
    welch_df,
)


def _abs_mean_gap(x, y, axis=-1):
    return np.abs(np.mean(y, axis=axis) - np.mean(x, axis=axis))


@pytest.mark.parametrize("a,b", [([1.0, 2.0, 3.0], [2.0, 4.0]),
                                 ([0.5, 0.7, 0.6], [0.9, 0.55]),
                                 ([0.71, 0.74, 0.69, 0.73], [0.75, 0.77, 0.72, 0.78, 0.76])])
def test_relabel_p_is_scipys_exact_permutation_test(a, b):
    """Every split of the pooled values enumerated: scipy's exact independent permutation
    test of |mean(b) - mean(a)| gives the same p."""
    ref = sst.permutation_test((a, b), _abs_mean_gap, permutation_type="independent",
                               alternative="greater", n_resamples=np.inf, vectorized=True)
    assert relabel_p(a, b) == pytest.approx(ref.pvalue)


@pytest.mark.parametrize("d", [[0.1, 0.2, 0.05], [0.3, -0.1, 0.2, 0.25, 0.1],
                               [-0.48, 0.1], [0.01] * 6])
def test_sign_flip_p_is_scipys_exact_paired_permutation_test(d):
    x = np.zeros(len(d))
    ref = sst.permutation_test((x, np.asarray(d)), _abs_mean_gap, permutation_type="samples",
                               alternative="greater", n_resamples=np.inf, vectorized=True)
    assert sign_flip_p(d) == pytest.approx(ref.pvalue)


def test_the_smallest_p_is_what_the_most_extreme_data_give():
    """The floors the page reports are reached by the most extreme data: all differences
    of one sign; the two groups not overlapping at all."""
    for n in range(1, 8):
        assert sign_flip_p([1.0 + i for i in range(n)]) == pytest.approx(smallest_sign_flip_p(n))
    assert smallest_sign_flip_p(2) == 0.5 and smallest_sign_flip_p(6) == pytest.approx(1 / 32)
    for na, nb in [(2, 2), (1, 3), (3, 4), (4, 4)]:
        a, b = list(range(na)), [100.0 + i for i in range(nb)]
        assert relabel_p(a, b) == pytest.approx(smallest_relabel_p(na, nb))
    assert smallest_relabel_p(2, 2) == pytest.approx(1 / 3)
    # one seed against three, by hand: of the 4 ways to pick the lone value, the gaps are
    # 0.3 (0.9, observed), 0.233 (0.5), 0.1 (0.6), 0.033 (0.7): p = 1/4
    assert relabel_p([0.5, 0.7, 0.6], [0.9]) == pytest.approx(0.25)


def test_many_seeds_are_drawn_at_random_and_never_claim_p_zero():
    rng = np.random.default_rng(1)
    d = rng.normal(1.0, 0.1, size=20)  # 2^20 patterns: random draws
    p = sign_flip_p(d, permutations=2000)
    assert p == pytest.approx(1 / 2001)  # every draw is less extreme than all-positive
    a, b = rng.normal(0, 1, 12), rng.normal(0.1, 1, 12)  # C(24, 12) > the exact limit
    exact = sst.permutation_test((a, b), _abs_mean_gap, permutation_type="independent",
                                 alternative="greater", n_resamples=20000, vectorized=True,
                                 random_state=0).pvalue
    assert relabel_p(a, b, permutations=20000) == pytest.approx(exact, abs=0.02)
    # the draws come from the seed: a compare run twice prints the same p
    d = rng.normal(0.1, 1.0, size=20)
    assert sign_flip_p(d, 500, seed=4) == sign_flip_p(d, 500, seed=4)
    assert relabel_p(a, b, 500, seed=4) == relabel_p(a, b, 500, seed=4)
    assert len({sign_flip_p(d, 500, seed=k) for k in range(4)}) > 1  # (the seed matters)


def test_paired_interval_is_scipys_paired_t_interval():
    a = np.array([0.5, 0.7, 0.6, 0.55])
    b = np.array([0.6, 0.9, 0.65, 0.58])
    d = b - a
    se = d.std(ddof=1) / math.sqrt(len(d))
    ref = sst.ttest_rel(b, a).confidence_interval(0.95)
    assert t_interval(d.mean(), se, len(d) - 1) == pytest.approx((ref.low, ref.high))


def test_welch_interval_is_scipys_welch_interval():
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([2.0, 4.0, 3.5, 5.0])
    se = math.sqrt(a.var(ddof=1) / 3 + b.var(ddof=1) / 4)
    df = welch_df(a.std(ddof=1), 3, b.std(ddof=1), 4)
    ref = sst.ttest_ind(b, a, equal_var=False)
    assert df == pytest.approx(ref.df)
    ci = ref.confidence_interval(0.95)
    assert t_interval(b.mean() - a.mean(), se, df) == pytest.approx((ci.low, ci.high))
    assert welch_df(0.0, 3, 0.0, 3) is None  # no spread at all: no interval but the point
    assert t_interval(0.25, 0.0, None) == (0.25, 0.25)


def test_holm_by_hand():
    """Sorted 0.01, 0.03, 0.04 times 3, 2, 1, never decreasing; capped at 1."""
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        sign_flip_p([])
    for a, b in (([], [1.0]), ([1.0], [])):
        with pytest.raises(ValueError, match="both sides"):
            relabel_p(a, b)
