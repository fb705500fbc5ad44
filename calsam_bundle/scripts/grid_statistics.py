"""Statistics of the benchmark grid: mean and std over seeds, relative change, domain gap and paired Wilcoxon tests."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "EXACT_LIMIT",
    "PERMUTATION_LIMIT",
    "PairedTest",
    "domain_gap",
    "gap_reduction",
    "mean_std",
    "paired_wilcoxon",
    "relative_change",
]

# scipy's own thresholds for method="auto" (scipy 1.17, stats/_wilcoxon.py): the exact null distribution up to
# 50 pairs without ties or zeros; with ties or zeros, a permutation test, which enumerates all 2**n sign flips
# for n <= 13 because 2**13 is below its default 9999 resamples; the normal approximation otherwise.
EXACT_LIMIT = 50
PERMUTATION_LIMIT = 13


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Return the mean, sample standard deviation (ddof 1) and count of the finite values.

    The std is NaN for fewer than two values and the mean is NaN for none.
    """
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    count = int(finite.size)
    mean = float(finite.mean()) if count else math.nan
    std = float(finite.std(ddof=1)) if count > 1 else math.nan
    return mean, std, count


def relative_change(value: float, baseline: float) -> float:
    """Return ``(value - baseline) / |baseline|``, or NaN when the baseline is 0 or not finite."""
    if not math.isfinite(baseline) or baseline == 0 or not math.isfinite(value):
        return math.nan
    return (value - baseline) / abs(baseline)


def domain_gap(source: float, target: float, higher_is_better: bool) -> float:
    """Return the source-to-target degradation: ``source - target`` for Dice, ``target - source`` for ECE."""
    return source - target if higher_is_better else target - source


def gap_reduction(gap: float, baseline_gap: float) -> float:
    """Return ``1 - gap / baseline_gap``; NaN when the baseline has no gap (``baseline_gap <= 0``) to reduce."""
    if not math.isfinite(baseline_gap) or baseline_gap <= 0 or not math.isfinite(gap):
        return math.nan
    return 1.0 - gap / baseline_gap


@dataclass(frozen=True)
class PairedTest:
    """Result of a two-sided paired Wilcoxon signed-rank test of ``a - b``."""

    n_pairs: int
    n_zero: int
    mean_difference: float
    median_difference: float
    statistic: float
    p_value: float
    method: str


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Run a two-sided Wilcoxon signed-rank test on paired values, naming the p-value method used.

    Pairs with a NaN on either side are dropped. Zero differences are dropped before ranking
    (``zero_method="wilcox"``) and counted in ``n_zero``. The method follows scipy's own choice for
    ``method="auto"``, but it is passed explicitly so that the report can name it:

    - ``exact`` (exact null distribution) for at most 50 pairs without tied absolute differences or zeros;
    - ``permutation`` (all sign flips, so also exact) for at most 13 pairs with ties or zeros;
    - ``normal approximation`` (with continuity and tie correction) for the rest.

    With all differences zero the test is undefined: the p-value is 1 and the method ``none``.

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    first, second = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(
            f"Paired values must be two 1-D sequences of equal length, got {first.shape} and {second.shape}."
        )
    keep = np.isfinite(first) & np.isfinite(second)
    difference = first[keep] - second[keep]
    n_pairs = int(difference.size)
    n_zero = int(np.count_nonzero(difference == 0))
    mean_difference = float(difference.mean()) if n_pairs else math.nan
    median_difference = float(np.median(difference)) if n_pairs else math.nan
    if n_pairs == n_zero:
        return PairedTest(
            n_pairs, n_zero, mean_difference, median_difference, math.nan, 1.0 if n_pairs else math.nan, "none"
        )

    nonzero = np.abs(difference[difference != 0])
    has_ties = np.unique(nonzero).size < nonzero.size
    if n_pairs <= EXACT_LIMIT and not has_ties and n_zero == 0:
        method, name = "exact", "exact"
    elif n_pairs <= PERMUTATION_LIMIT:
        method, name = stats.PermutationMethod(), "permutation"
    else:
        method, name = "asymptotic", "normal approximation"
    result = stats.wilcoxon(difference, zero_method="wilcox", alternative="two-sided", method=method)
    return PairedTest(
        n_pairs, n_zero, mean_difference, median_difference, float(result.statistic), float(result.pvalue), name
    )
