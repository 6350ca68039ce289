"""Uncertainty and tests for the study's seed-level results.

Every cell of the study is a handful of seeds, so its numbers are reported as

    mean [low, high]      the mean over seeds and its 95% percentile-bootstrap interval
                          (resampling seeds with replacement, `bootstrap_ci`),

and a claim "A differs from B in direction d" is a one-sided Welch t-test (unequal variances,
`welch`; or a paired t-test where both come from the same seeds' runs, `paired`). The claims a
report makes are one family: their p-values are adjusted together by Holm's step-down method
(`holm`), which bounds the family-wise error rate at alpha without assuming independence.

References:
  Welch (1947), The generalization of "Student's" problem when several different population
  variances are involved. Biometrika 34.
  Holm (1979), A simple sequentially rejective multiple test procedure. Scand. J. Statist. 6.
  Efron & Tibshirani (1993), An Introduction to the Bootstrap, ch. 13 (percentile intervals).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

__all__ = ["Interval", "bootstrap_ci", "holm", "paired", "welch"]

ALTERNATIVES = ("greater", "less", "two-sided")


class Interval(NamedTuple):
    """A mean over seeds with its bootstrap interval; n values (NaN/None left out).

    Example:
      >>> Interval(0.5, 0.4, 0.6, 5).mean
      0.5
    """

    mean: float
    low: float
    high: float
    n: int


def _finite(values) -> np.ndarray:
    x = np.asarray([np.nan if v is None else v for v in values], np.float64)
    return x[np.isfinite(x)]


def bootstrap_ci(
    values: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """The mean of `values` and its percentile-bootstrap `confidence` interval.

    B = `resamples` means of len(values) draws with replacement; the interval is their
    ((1 - confidence) / 2, (1 + confidence) / 2) quantiles. One value gives a zero-width
    interval; none gives NaNs. Deterministic for a given `seed`.

    Example:
      >>> ci = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
      >>> ci.mean, 1.0 <= ci.low < 3.0 < ci.high <= 5.0, ci.n
      (3.0, True, 5)
      >>> bootstrap_ci([2.0, None, float("nan")])
      Interval(mean=2.0, low=2.0, high=2.0, n=1)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be in (0, 1).")
    x = _finite(values)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if x.size == 1:
        return Interval(float(x[0]), float(x[0]), float(x[0]), 1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(x.mean()), float(low), float(high), int(x.size))


def _check(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r}: choose one of {ALTERNATIVES}.")


def welch(a: Sequence[float], b: Sequence[float], alternative: str = "two-sided") -> float:
    """p-value of Welch's t-test of mean(a) vs mean(b) (`alternative` 'greater': a > b).

    NaN when either side has fewer than 2 values; 1.0 (or 0.0) when both have no spread and
    their means are equal (or differ in the tested direction), where the t statistic is
    undefined.

    Example:
      >>> welch([5.1, 5.3, 4.9, 5.2, 5.0], [4.0, 4.2, 3.9, 4.1, 4.0], "greater") < 1e-4
      True
      >>> round(welch([1.0, 2.0, 3.0], [1.5, 2.5, 2.0]), 3)
      1.0
      >>> welch([1.0, 1.0], [1.0, 1.0]), welch([2.0, 2.0], [1.0, 1.0], "greater")
      (1.0, 0.0)
    """
    _check(alternative)
    x, y = _finite(a), _finite(b)
    if x.size < 2 or y.size < 2:
        return math.nan
    if x.std() == 0 and y.std() == 0:
        diff = x.mean() - y.mean()
        holds = {"greater": diff > 0, "less": diff < 0, "two-sided": diff != 0}[alternative]
        return 0.0 if holds else 1.0
    with warnings.catch_warnings():
        # Near-identical samples make scipy warn about precision; the p-value is still right
        # (about 1 for equal means), and the study's report is no place for the warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(x, y, equal_var=False, alternative=alternative).pvalue)


def paired(a: Sequence[float], b: Sequence[float], alternative: str = "two-sided") -> float:
    """p-value of a paired t-test of a vs b (same seeds, pairs where both are finite).

    Example:
      >>> paired([2.0, 3.1, 4.0, 5.2], [1.0, 2.0, 3.1, 4.0], "greater") < 1e-3
      True
    """
    _check(alternative)
    x = np.asarray([np.nan if v is None else v for v in a], np.float64)
    y = np.asarray([np.nan if v is None else v for v in b], np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired: a and b need the same length, got {x.size} and {y.size}.")
    keep = np.isfinite(x) & np.isfinite(y)
    d = x[keep] - y[keep]
    if d.size < 2:
        return math.nan
    if d.std() == 0:
        holds = {"greater": d[0] > 0, "less": d[0] < 0, "two-sided": d[0] != 0}[alternative]
        return 0.0 if holds else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # as in `welch`
        return float(stats.ttest_1samp(d, 0.0, alternative=alternative).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order (NaN stays NaN and does not count).

    With the m finite p-values sorted, p_(1) <= ... <= p_(m), the adjusted value of p_(i) is
    max_{j <= i} min(1, (m - j + 1) p_(j)); reject at level alpha where adjusted <= alpha.

    Example:
      >>> holm([0.01, 0.04, 0.03, float("nan")])
      [0.03, 0.06, 0.06, nan]
    """
    p = np.asarray(pvalues, np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    running = 0.0
    for rank, index in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[index]))
        out[index] = running
    return [float(v) for v in out]
