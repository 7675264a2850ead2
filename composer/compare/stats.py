"""Paired statistics for an A/B comparison: bootstrap intervals and McNemar's exact test.

Every suite yields one score per item for each side, on the same items. The difference is
always taken as B − A in the suite's own metric; whether that is good for B depends on the
metric's direction (accuracy up, loss down).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

A_BETTER, B_BETTER, NO_DIFFERENCE = "A better", "B better", "no significant difference"
BOOTSTRAP_SAMPLES = 10_000


def bootstrap_ci(
    diffs: Sequence[float], *, level: float = 0.95, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float]:
    """Percentile interval of the mean paired difference, items resampled with replacement."""
    values = np.asarray(diffs, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // values.size)  # bounds the (chunk, n) index matrix
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        picks = rng.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[picks].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return (float(low), float(high))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    `a_only`: items A passes and B fails; `b_only`: the reverse. Under "no difference" each
    discordant pair is a fair coin, so p = P(a binomial(n, 1/2) is at least as lopsided).
    """
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass
class Comparison:
    n: int
    a_mean: float
    b_mean: float
    diff: float  # mean of B − A
    ci: tuple[float, float]
    test: str  # "mcnemar" or "bootstrap"
    p_value: float | None
    verdict: str
    a_only: int | None = None  # pass/fail suites: items only A passes
    b_only: int | None = None

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "a_mean": self.a_mean,
            "b_mean": self.b_mean,
            "diff_b_minus_a": self.diff,
            "ci": list(self.ci),
            "test": self.test,
            "p_value": self.p_value,
            "verdict": self.verdict,
            "a_only": self.a_only,
            "b_only": self.b_only,
        }


def compare_paired(
    a: Sequence[float],
    b: Sequence[float],
    *,
    higher_is_better: bool,
    binary: bool,
    level: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Paired comparison of per-item scores; McNemar decides pass/fail suites, the interval
    decides the others (significant when it excludes zero)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    a_mean = float(np.mean(a)) if n else math.nan
    b_mean = float(np.mean(b)) if n else math.nan
    ci = bootstrap_ci(diffs, level=level, seed=seed)
    diff = float(np.mean(diffs)) if n else math.nan
    if binary:
        a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
        b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
        p = mcnemar_exact(a_only, b_only)
        verdict = _verdict(p < 1 - level, b_only - a_only, higher_is_better=True)
        return Comparison(n, a_mean, b_mean, diff, ci, "mcnemar", p, verdict, a_only, b_only)
    significant = n > 0 and (ci[0] > 0 or ci[1] < 0)
    verdict = _verdict(significant, diff, higher_is_better)
    return Comparison(n, a_mean, b_mean, diff, ci, "bootstrap", None, verdict)


def _verdict(significant: bool, diff: float, higher_is_better: bool) -> str:
    if not significant or diff == 0:
        return NO_DIFFERENCE
    return B_BETTER if (diff > 0) == higher_is_better else A_BETTER
