"""fastdense.stats on constructed cases with known answers."""

import math

import numpy as np
import pytest

from fastdense.errors import FastdenseError
from fastdense.stats import mean_ci, paired_difference, win_rate, win_scores


def test_win_rate_counts_ties_half():
    aligned = [1.0, 2.0, 3.0, 5.0]
    base = [0.0, 2.0, 4.0, 1.0]
    assert win_scores(aligned, base).tolist() == [1.0, 0.5, 0.0, 1.0]
    est = win_rate(aligned, base)
    assert est.value == pytest.approx(2.5 / 4)
    assert est.n == 4 and est.dropped == 0
    assert est.low <= est.value <= est.high


def test_win_rate_all_ties_is_one_half_with_zero_width():
    est = win_rate([0.5] * 10, [0.5] * 10)
    assert (est.value, est.low, est.high, est.std) == (0.5, 0.5, 0.5, 0.0)


def test_constant_values_give_a_zero_width_interval():
    est = mean_ci([0.25] * 7)
    assert (est.value, est.low, est.high) == (0.25, 0.25, 0.25)


def test_bootstrap_interval_matches_the_normal_interval_for_many_values():
    rng = np.random.default_rng(1)
    x = rng.binomial(1, 0.7, size=4000).astype(float)
    est = mean_ci(x, resamples=4000, seed=3)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert est.value == pytest.approx(x.mean())
    assert est.std == pytest.approx(x.std(ddof=1))
    assert est.half_width == pytest.approx(1.96 * se, rel=0.1)
    assert est.low < x.mean() < est.high


def test_paired_difference_and_non_finite_pairs():
    after = [1.0, 1.0, float("nan"), 0.0, 1.0]
    before = [0.0, 1.0, 1.0, 0.0, float("inf")]
    est = paired_difference(after, before)
    assert est.n == 3 and est.dropped == 2
    assert est.value == pytest.approx(1 / 3)
    assert win_rate(after, before).value == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_interval_is_deterministic_and_seeded():
    x = np.linspace(0, 1, 50) ** 2
    assert mean_ci(x, seed=0) == mean_ci(x, seed=0)
    assert mean_ci(x, seed=0).low != mean_ci(x, seed=1).low
    assert f"{mean_ci([1.0, 1.0]):.2f}" == "1.00 [1.00, 1.00]"


def test_all_non_finite_gives_nan_and_counts_them():
    est = mean_ci([float("nan")] * 3)
    assert est.n == 0 and est.dropped == 3 and math.isnan(est.value)


@pytest.mark.parametrize("call, match", [
    (lambda: mean_ci([]), "no values"),
    (lambda: win_rate([1.0, 2.0], [1.0]), "same prompts and seeds"),
    (lambda: mean_ci([1.0], level=1.5), "level 1.5"),
    (lambda: mean_ci([1.0], resamples=0), "resamples 0"),
])
def test_bad_input_is_one_line(call, match):
    with pytest.raises(FastdenseError, match=match):
        call()


def test_tie_tolerance_counts_near_equal_scores_as_ties():
    aligned = [0.99995, 1.0, 0.5, 0.0]
    base = [0.99990, 0.2, 0.495, 0.3]
    assert win_scores(aligned, base).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert win_scores(aligned, base, tie=0.01).tolist() == [0.5, 1.0, 0.5, 0.0]
    assert win_rate(aligned, base, tie=0.01).value == pytest.approx(2.0 / 4)
    with pytest.raises(FastdenseError, match="tie tolerance -1"):
        win_rate(aligned, base, tie=-1)


def test_a_rewards_tie_tolerance():
    from fastdense.rewards import Brightness, WeightedSum
    from fastdense.stats import tie_tolerance
    from fastdense.toy.reward import ColorFidelity

    assert tie_tolerance(Brightness()) == 0.0
    assert tie_tolerance(ColorFidelity()) == 0.01
    assert tie_tolerance(WeightedSum([(ColorFidelity(), 2.0), (Brightness(), 1.0)])) == pytest.approx(0.02)
    assert tie_tolerance(lambda images, prompts: images.mean()) == 0.0  # a plain callable: exact ties
