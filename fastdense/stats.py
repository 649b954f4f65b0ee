"""Statistics of evaluations: means with bootstrap confidence intervals, win rates, paired differences.

An evaluation scores every (prompt, seed) pair; a pair is the unit of resampling. Two models
evaluated on the same prompts and seeds are compared pair by pair (the same noise, the same
prompt), which removes most of the prompt-to-prompt and seed-to-seed variance from the comparison.

Intervals are percentile bootstrap intervals over the pairs, drawn from a seeded generator, so
the same scores always give the same interval. Non-finite scores are left out, and their count
is reported (a pair is left out of a comparison when either of its scores is not finite).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fastdense.errors import FastdenseError

__all__ = ["Estimate", "mean_ci", "paired_difference", "tie_tolerance", "win_rate", "win_scores", "DEFAULT_RESAMPLES"]

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A statistic over ``n`` finite values (``dropped`` non-finite ones left out): its value,
    the standard deviation of the values, and the ``level`` bootstrap interval [low, high]."""

    value: float
    std: float
    low: float
    high: float
    n: int
    dropped: int = 0
    level: float = DEFAULT_LEVEL

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __format__(self, spec: str) -> str:
        spec = spec or ".4f"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise FastdenseError(f"{what}: no values to summarise; at least one score is needed")
    return arr


def _check(level: float, resamples: int) -> None:
    if not 0.0 < level < 1.0:
        raise FastdenseError(f"confidence level {level!r} is not allowed; it must be in (0, 1), e.g. 0.95")
    if int(resamples) < 1:
        raise FastdenseError(f"bootstrap resamples {resamples!r} is not allowed; it must be an integer >= 1")


def _bootstrap(values: np.ndarray, dropped: int, *, level: float, resamples: int, seed: int) -> Estimate:
    """Mean of ``values`` with its percentile bootstrap interval (resampling the values)."""
    _check(level, resamples)
    n = values.size
    if n == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, nan, 0, dropped, level)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else 0.0
    rng = np.random.default_rng(seed)
    # resamples × n indices, drawn in chunks so a large evaluation never builds a huge matrix
    means = np.empty(int(resamples))
    chunk = max(1, 4_000_000 // n)
    for start in range(0, int(resamples), chunk):
        stop = min(int(resamples), start + chunk)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # a constant sample gives a zero-width interval exactly (no rounding from the resampled means)
    if std == 0.0:
        low = high = mean
    return Estimate(mean, std, float(low), float(high), n, dropped, level)


def mean_ci(values: Sequence[float] | np.ndarray, *, level: float = DEFAULT_LEVEL,
            resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
    """The mean of the finite ``values`` with a percentile bootstrap interval."""
    arr = _values(values, "mean")
    finite = np.isfinite(arr)
    return _bootstrap(arr[finite], int((~finite).sum()), level=level, resamples=resamples, seed=seed)


def _pairs(a, b, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    a, b = _values(a, what), _values(b, what)
    if a.shape != b.shape:
        raise FastdenseError(f"{what}: {a.size} scores against {b.size}; a paired comparison needs the same "
                             "prompts and seeds on both sides")
    finite = np.isfinite(a) & np.isfinite(b)
    return a[finite], b[finite], int((~finite).sum())


def _wins(a: np.ndarray, b: np.ndarray, tie: float) -> np.ndarray:
    if not (math.isfinite(tie) and tie >= 0):
        raise FastdenseError(f"tie tolerance {tie!r} is not allowed; it must be a number >= 0 (0 = exact ties only)")
    diff = a - b
    return np.where(np.abs(diff) <= tie, 0.5, np.where(diff > 0, 1.0, 0.0))


def win_scores(aligned, base, *, tie: float = 0.0) -> np.ndarray:
    """Per pair: 1 where ``aligned`` scores above ``base``, 0.5 on a tie (scores within ``tie`` of
    each other), 0 below (finite pairs only)."""
    a, b, _ = _pairs(aligned, base, "win rate")
    return _wins(a, b, tie)


def win_rate(aligned, base, *, tie: float = 0.0, level: float = DEFAULT_LEVEL,
             resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
    """The fraction of (prompt, seed) pairs where ``aligned`` scores above ``base``, ties (scores
    within ``tie``; a reward's :attr:`tie_tolerance`) counting half, with a bootstrap interval over
    the pairs. Both are flat in the same pair order."""
    a, b, dropped = _pairs(aligned, base, "win rate")
    return _bootstrap(_wins(a, b, tie), dropped, level=level, resamples=resamples, seed=seed)


def paired_difference(after, before, *, level: float = DEFAULT_LEVEL, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0) -> Estimate:
    """Mean of ``after - before`` over the pairs, with a bootstrap interval over the pairs."""
    a, b, dropped = _pairs(after, before, "paired difference")
    return _bootstrap(a - b, dropped, level=level, resamples=resamples, seed=seed)


def tie_tolerance(reward) -> float:
    """The score difference below which a reward calls two images equal (its ``tie_tolerance``
    attribute; a weighted sum: the weighted sum of its terms'; 0 when a reward has none)."""
    terms = getattr(reward, "terms", None)
    if terms is not None:
        return float(sum(abs(w) * tie_tolerance(r) for r, w in terms))
    return float(getattr(reward, "tie_tolerance", 0.0) or 0.0)
