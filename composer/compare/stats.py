"""Paired statistics for an A/B comparison: bootstrap intervals, McNemar's exact test, and the
smallest difference a comparison of that many items would detect.

Every suite yields one score per item for each side, on the same items. The difference is
always taken as B − A in the suite's own metric; whether that is good for B depends on the
metric's direction (accuracy up, loss down).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

A_BETTER, B_BETTER, NO_DIFFERENCE = "A better", "B better", "no significant difference"
BOOTSTRAP_SAMPLES = 10_000
POWER = 0.8  # "detected": found significant this often, when the difference is real


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


def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])


def _binomial_pmf(counts: np.ndarray, q: float, log_fact: np.ndarray) -> np.ndarray:
    """pmf[i, k] = P(Binomial(counts[i], q) = k) for k = 0..max(counts); 0 where k > counts[i].
    0 < q < 1."""
    k = np.arange(int(counts.max()) + 1)[None, :]
    d = counts[:, None]
    inside = k <= d
    rest = np.where(inside, d - k, 0)
    log_pmf = log_fact[d] - log_fact[k] - log_fact[rest] + k * math.log(q) + rest * math.log1p(-q)
    return np.where(inside, np.exp(log_pmf), 0.0)


def _mcnemar_critical(counts: np.ndarray, alpha: float, log_fact: np.ndarray) -> np.ndarray:
    """Per number d of discordant pairs, the largest k for which `mcnemar_exact(k, d - k)` is
    below `alpha` (-1 where no split of d pairs is significant)."""
    tails = 2 * np.cumsum(_binomial_pmf(counts, 0.5, log_fact), axis=1)
    k = np.arange(tails.shape[1])[None, :]
    significant = (tails < alpha) & (k <= counts[:, None])
    return significant.sum(axis=1) - 1


def mcnemar_power(n: int, discordant_rate: float, diff: float, alpha: float = 0.05) -> float:
    """The probability that `mcnemar_exact` finds p < `alpha` over `n` items when each item
    differs between the sides with probability `discordant_rate` and B's pass rate exceeds A's
    by `diff` (so a differing item goes B's way with probability (rate + diff) / (2 rate)).
    Exact: summed over the binomial number of differing items and, given it, of B's wins."""
    return _power_curve(n, discordant_rate, alpha)(diff)


def _power_curve(n: int, rate: float, alpha: float) -> Callable[[float], float]:
    log_fact = _log_factorials(n)
    all_counts = np.arange(n + 1)
    p_count = _binomial_pmf(np.array([n]), min(max(rate, 1e-12), 1 - 1e-12), log_fact)[0]
    counts = all_counts[p_count > 1e-12]  # the counts of differing items that can happen
    weights = p_count[counts]
    critical = _mcnemar_critical(counts, alpha, log_fact)
    k = np.arange(int(counts.max()) + 1)[None, :]
    # Two-sided: B's wins at most the critical count, or at least d minus it.
    rejected = ((k <= critical[:, None]) | (k >= (counts - critical)[:, None])) & (
        critical[:, None] >= 0
    )

    def power(diff: float) -> float:
        q = min(max((rate + diff) / (2 * rate), 1e-12), 1 - 1e-12)
        given = (_binomial_pmf(counts, q, log_fact) * rejected).sum(axis=1)
        return float((weights * given).sum())

    return power


def _smallest(
    power: Callable[[float], float], top: float, target: float, tol: float = 1e-5
) -> float | None:
    """The smallest x in (0, top] with power(x) >= target (power rising in x), or None."""
    if top <= 0 or power(top) < target:
        return None
    low, high = 0.0, top
    while high - low > tol:
        mid = (low + high) / 2
        low, high = (low, mid) if power(mid) >= target else (mid, high)
    return high


def mde_paired_binary(
    n: int, discordant_rate: float | None, *, alpha: float = 0.05, power: float = POWER
) -> float | None:
    """The smallest difference in pass rate (a fraction of the items) that McNemar's exact test
    at two-sided `alpha` finds with probability `power` over `n` paired items.

    `discordant_rate`: the share of items on which the sides differ (the observed one, or a
    planning assumption); the difference cannot exceed it, and None is returned where even
    that difference would not be found. None instead: the best case, where every differing item
    goes one way (the rate equals the difference): a lower bound whatever the rate, since more
    disagreement for the same difference only adds noise."""
    if n <= 0:
        return None
    if discordant_rate is None:
        # All differing items go B's way: significant once there are enough of them.
        count = _mcnemar_critical(np.arange(n + 1), alpha, _log_factorials(n))
        needed = int(np.argmax(count >= 0)) if (count >= 0).any() else n + 1

        def best(diff: float) -> float:
            return 1.0 - sum(
                math.comb(n, d) * diff**d * (1 - diff) ** (n - d) for d in range(needed)
            )

        return _smallest(best, 1.0, power)
    if discordant_rate <= 0:
        return None
    curve = _power_curve(n, discordant_rate, alpha)
    return _smallest(curve, discordant_rate * (1 - 1e-9), power)


def mde_paired_mean(
    n: int, sd: float, *, alpha: float = 0.05, power: float = POWER
) -> float | None:
    """The smallest mean paired difference a two-sided test at `alpha` finds with probability
    `power` over `n` items whose differences spread with standard deviation `sd`: (z_{1-α/2} +
    z_power) · sd / √n, the normal approximation the bootstrap interval also rests on."""
    if n < 2 or not math.isfinite(sd):
        return None
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * sd / math.sqrt(n)


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
    # The smallest difference (in the metric; pass rates as a fraction) these items detect
    # POWER of the time at the verdict's level, and what it assumes; None: none would be.
    mde: float | None = None
    mde_basis: str = ""

    def to_dict(self) -> dict:
        return {
            "mde": self.mde,
            "mde_power": POWER,
            "mde_basis": self.mde_basis,
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
        rate = (a_only + b_only) / n if n else 0.0
        if rate > 0:
            basis = f"at the observed {rate:.0%} of items where the sides differ"
            mde = mde_paired_binary(n, rate, alpha=1 - level)
        else:
            basis = "no item differed here: the best case, every differing item going one way"
            mde = mde_paired_binary(n, None, alpha=1 - level)
        return Comparison(
            n, a_mean, b_mean, diff, ci, "mcnemar", p, verdict, a_only, b_only, mde, basis
        )
    significant = n > 0 and (ci[0] > 0 or ci[1] < 0)
    verdict = _verdict(significant, diff, higher_is_better)
    sd = float(np.std(diffs, ddof=1)) if n > 1 else math.nan
    mde = mde_paired_mean(n, sd, alpha=1 - level)
    basis = "from the observed spread of the per-item differences"
    return Comparison(
        n, a_mean, b_mean, diff, ci, "bootstrap", None, verdict, mde=mde, mde_basis=basis
    )


def _verdict(significant: bool, diff: float, higher_is_better: bool) -> str:
    if not significant or diff == 0:
        return NO_DIFFERENCE
    return B_BETTER if (diff > 0) == higher_is_better else A_BETTER
