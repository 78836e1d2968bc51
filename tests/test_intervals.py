"""benchmarks/intervals.py: bootstrap intervals over seeds, paired differences, the verdict rule."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import intervals as I  # noqa: E402


def test_the_95_percent_interval_covers_a_known_mean_about_95_percent_of_the_time():
    # 200 normal samples of 30 around 1.5; the percentile interval undercovers a little at this n (~0.94),
    # so 0.88..0.99 is about 3 binomial sds (sqrt(.94 * .06 / 200) = 0.017) either side. Each repetition
    # resamples with its own Generator seed: one shared seed would reuse the same resample indices 200 times
    # and make the repetitions dependent.
    # The exact t interval on the same samples is the yardstick: the bootstrap should cover about as often.
    # (Data seed 7 draws an unlucky 200: t covers 178, the bootstrap 175; seeds 8, 9, 10: t 193, 189, 191.)
    rng = np.random.default_rng(8)
    hits = t_hits = 0
    for rep in range(200):
        sample = rng.normal(1.5, 2.0, size=30)
        ci = I.mean_ci(sample, seed=rep)
        hits += ci.lo <= 1.5 <= ci.hi
        t_hits += abs(sample.mean() - 1.5) <= 2.045 * sample.std(ddof=1) / np.sqrt(30)  # t(0.975, 29) = 2.045
    assert 0.88 <= hits / 200 <= 0.99, hits
    assert abs(hits - t_hits) <= 8, (hits, t_hits)  # percentile intervals are a little narrower than t's


def test_the_interval_is_seeded_and_brackets_the_mean():
    xs = [0.3, 0.1, 0.7, 0.4, 0.5]
    a, b = I.mean_ci(xs), I.mean_ci(xs)
    assert a == b and a.n == 5 and a.mean == pytest.approx(0.4)
    assert a.lo < a.mean < a.hi and 0.1 <= a.lo and a.hi <= 0.7
    assert I.mean_ci(xs, seed=1) != a  # another Generator seed, other resamples


def test_one_seed_has_no_interval_rather_than_a_zero_width_one():
    ci = I.mean_ci([0.25])
    assert (ci.mean, ci.lo, ci.hi, ci.n) == (0.25, None, None, 1) and not ci.has_interval
    assert I.verdict(I.paired_difference({0: 0.9}, {0: 0.1}), "A", "B") == "not separated (1 seed: no interval)"


def test_a_shared_seed_offset_makes_the_paired_interval_much_narrower():
    rng = np.random.default_rng(3)
    offset = rng.normal(0.0, 1.0, size=10)  # how hard each seed's data order is, for both methods
    a = {s: 0.5 + offset[s] + rng.normal(0.0, 0.02) for s in range(10)}
    b = {s: 0.4 + offset[s] + rng.normal(0.0, 0.02) for s in range(10)}
    paired = I.paired_difference(a, b)
    ca, cb = I.mean_ci(a.values()), I.mean_ci(b.values())
    unpaired_width = (ca.hi - ca.lo) + (cb.hi - cb.lo)  # at least as wide as the unpaired difference's
    assert (paired.hi - paired.lo) < unpaired_width / 10
    assert paired.mean == pytest.approx(np.mean([a[s] - b[s] for s in range(10)]))
    assert paired.lo > 0 and I.verdict(paired, "A", "B") == "A better than B"
    # the unpaired means' intervals overlap: without the pairing the two would not be told apart
    assert ca.lo < cb.hi


def test_unmatched_seeds_are_refused_by_name():
    with pytest.raises(ValueError, match=r"\[2\] only in blur, \[5\] only in npo_sum"):
        I.paired_difference({0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.0, 1: 1.0, 5: 1.0}, names=("blur", "npo_sum"))
    with pytest.raises(ValueError, match="no seeds"):
        I.paired_difference({}, {})
    with pytest.raises(ValueError, match="non-finite"):
        I.mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        I.mean_ci([])


@pytest.mark.parametrize(
    ("lo", "hi", "higher_is_better", "expected"),
    [
        (0.1, 0.3, True, "A better than B"),
        (-0.3, -0.1, True, "B better than A"),
        (-0.3, -0.1, False, "A better than B"),  # e.g. a loss or an accuracy on the forget set
        (-0.1, 0.3, True, "not separated"),
        (0.0, 0.3, True, "not separated"),  # touching 0 does not exclude it
    ],
)
def test_better_only_when_the_paired_interval_excludes_zero(lo, hi, higher_is_better, expected):
    assert I.verdict(I.Interval((lo + hi) / 2, lo, hi, 3), "A", "B", higher_is_better) == expected


def test_equal_values_give_the_point_and_are_not_separated_from_themselves():
    ci = I.mean_ci([0.49, 0.49, 0.49])
    assert ci.lo == ci.hi == pytest.approx(0.49) and ci.lo <= ci.mean <= ci.hi
    assert I.verdict(I.paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}), "A", "B") == "not separated"
