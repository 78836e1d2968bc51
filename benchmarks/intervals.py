"""95 % bootstrap intervals over seeds: of one method's mean, and of the paired difference of two methods.

The resampling is scipy.stats.bootstrap (method="percentile", one sample): it already does the percentile
interval of a mean with a seeded numpy Generator, so only the pairing and the verdict are ours. A paired
difference resamples seeds, not runs: the mean of the per-seed differences a_s - b_s is bootstrapped as one
sample, which is what scipy's ``paired=True`` does for mean(a) - mean(b) (a shared per-seed offset, e.g. a
seed whose data order is hard for every method, cancels instead of widening the interval).

With 3 seeds a percentile interval is coarse: the resampled means take at most 10 values, and the interval
is known to be too narrow for n this small (it estimates the spread with 1/n, not 1/(n-1)). One seed gives
no interval at all: ``lo`` and ``hi`` are None, never a zero-width interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0


class Interval(NamedTuple):
    """A mean over n values and its bootstrap interval; lo and hi are None when n == 1 (no interval)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    @property
    def has_interval(self) -> bool:
        return self.lo is not None and self.hi is not None


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
            seed: int = SEED) -> Interval:  # fmt: skip
    """Mean of `values` and its percentile bootstrap interval (`resamples` means, numpy Generator `seed`).

    Raises:
        ValueError: no values, or a value that is not finite.
    """
    xs = np.asarray(list(values), dtype=np.float64)
    if xs.size == 0:
        raise ValueError("mean_ci: no values (expected at least one)")
    if not np.all(np.isfinite(xs)):
        raise ValueError(f"mean_ci: non-finite values {xs[~np.isfinite(xs)].tolist()} (expected finite numbers)")
    mean = float(xs.mean())
    if xs.size == 1:
        return Interval(mean, None, None, 1)
    result = stats.bootstrap((xs,), np.mean, n_resamples=resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed))  # fmt: skip
    low, high = result.confidence_interval
    # all values equal: every resampled mean is that value (up to rounding), so the interval is the point
    return Interval(mean, min(float(low), mean), max(float(high), mean), int(xs.size))


def paired_difference(
    a: Mapping[int, float],
    b: Mapping[int, float],
    names: tuple[str, str] = ("a", "b"),
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Mean over seeds of a[s] - b[s] and its bootstrap interval; a and b map seed -> value.

    Raises:
        ValueError: the two do not hold the same seeds (the message names the unmatched ones), or none.
    """
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(f"paired_difference {names[0]} vs {names[1]}: unmatched seeds: {only_a} only in "
                         f"{names[0]}, {only_b} only in {names[1]} (expected the same seeds in both)")  # fmt: skip
    if not a:
        raise ValueError(f"paired_difference {names[0]} vs {names[1]}: no seeds")
    seeds = sorted(a)
    return mean_ci([a[s] - b[s] for s in seeds], confidence, resamples, seed)


def verdict(difference: Interval, a: str, b: str, higher_is_better: bool = True) -> str:
    """Says "A better than B" only when the paired interval of A - B excludes 0; else "not separated"."""
    if not difference.has_interval:
        return f"not separated ({difference.n} seed: no interval)"
    assert difference.lo is not None and difference.hi is not None
    if difference.lo <= 0.0 <= difference.hi:
        return "not separated"
    a_higher = difference.lo > 0.0
    better, worse = (a, b) if a_higher == higher_is_better else (b, a)
    return f"{better} better than {worse}"
