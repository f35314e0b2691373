"""Small-sample statistics for comparing search methods over seeds.

A NAS comparison has few seeds (2 to 10), so the tests here make no normality
assumption where they can: p-values come from exact permutation tests (sign flips of
paired differences; relabelings of two unpaired groups), which at few seeds cannot go
below the smallest p their arrangements allow (2 paired seeds: 0.5), and say so. The
confidence interval of a mean difference uses Student's t (paired: n - 1 degrees of
freedom; unpaired: Welch-Satterthwaite), since at 2 or 3 seeds "+- 2 standard errors"
claims far more than the data hold (t at 1 degree of freedom is 12.7, not 2).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

#: the largest number of arrangements a permutation test enumerates; beyond it, random draws
EXACT_LIMIT = 100_000


def _tie_tolerance(x: np.ndarray) -> float:
    """How far below the observed statistic an arrangement still counts as a tie: rounding
    of sums of ``x``, so relative to the data's own size (units must not change a p-value:
    an absolute 1e-12 made every pattern of differences below 1e-12 a tie, p = 1)."""
    return 1e-12 * float(np.abs(x).max())


def sign_flip_p(d: Sequence[float], permutations: int = EXACT_LIMIT, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip permutation test: the share of the 2^n sign
    patterns of the differences ``d`` whose mean is at least as far from 0 as the
    observed one (exact up to 2^16 patterns, else ``permutations`` random draws, counted
    as (hits + 1) / (draws + 1) so it never claims p = 0)."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("sign_flip_p needs a non-empty list of differences")
    observed = abs(d.mean()) - _tie_tolerance(d)
    if len(d) <= 16:
        signs = ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1) * 2 - 1
        return float((np.abs((signs * d).mean(1)) >= observed).mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(permutations, len(d)))
    hits = int((np.abs((signs * d).mean(1)) >= observed).sum())
    return (hits + 1) / (permutations + 1)


def relabel_p(a: Sequence[float], b: Sequence[float], permutations: int = EXACT_LIMIT,
              seed: int = 0) -> float:
    """Two-sided p-value of an unpaired permutation test of mean(b) - mean(a): the share
    of the ways to split the pooled values into groups of ``len(a)`` and ``len(b)`` whose
    difference of means is at least as far from 0 as the observed one (exact up to
    :data:`EXACT_LIMIT` splits, else random draws, counted as in :func:`sign_flip_p`)."""
    pooled = np.asarray([*a, *b], dtype=np.float64)
    na, n = len(a), len(pooled)
    if na == 0 or na == n:
        raise ValueError("relabel_p needs a value on both sides")
    total = pooled.sum()

    def gap(sum_a: np.ndarray) -> np.ndarray:
        return np.abs((total - sum_a) / (n - na) - sum_a / na)

    observed = gap(np.asarray(pooled[:na].sum())) - _tie_tolerance(pooled)
    if math.comb(n, na) <= EXACT_LIMIT:
        picks = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n), na)),
                            dtype=np.int64).reshape(-1, na)
        return float((gap(pooled[picks].sum(1)) >= observed).mean())
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((permutations, n)), axis=1)[:, :na]
    hits = int((gap(pooled[picks].sum(1)) >= observed).sum())
    return (hits + 1) / (permutations + 1)


def smallest_sign_flip_p(n: int) -> float:
    """The smallest p :func:`sign_flip_p` can give with ``n`` non-zero differences: 2 / 2^n
    (both patterns of all equal signs), e.g. 0.5 at 2 seeds, 0.031 at 6."""
    return min(1.0, 2.0 / 2 ** n)


def smallest_relabel_p(na: int, nb: int) -> float:
    """The smallest p :func:`relabel_p` can give with groups of ``na`` and ``nb``: the
    observed split is the most extreme of the C(na + nb, na) splits, tied with its mirror
    image when the groups are equally large, e.g. 1/3 at 2 + 2 seeds, 1/4 at 1 + 3."""
    splits = math.comb(na + nb, na)
    return min(1.0, (2.0 if na == nb else 1.0) / splits)


def welch_df(sa: float, na: int, sb: float, nb: int) -> float | None:
    """Welch-Satterthwaite degrees of freedom of a difference of two means (sample stds
    ``sa``, ``sb`` over ``na``, ``nb`` values); None where both spreads are 0."""
    va, vb = sa**2 / na, sb**2 / nb
    if va + vb == 0:
        return None
    return (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))


def t_interval(mean: float, se: float, df: float | None, level: float = 0.95
               ) -> tuple[float, float]:
    """The ``level`` confidence interval ``mean +- t * se`` with Student's t at ``df``
    degrees of freedom (``df`` None: ``se`` is 0 and the interval is the point)."""
    from scipy.stats import t as student_t

    if df is None or se == 0:
        return mean, mean
    half = float(student_t.ppf(0.5 + level / 2, df)) * se
    return mean - half, mean + half


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``ps`` (one p per comparison, same order back):
    controls the chance of any false "clear difference" among all of them at the level
    the adjusted p is read against."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted, running = [1.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted
