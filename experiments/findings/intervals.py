"""Confidence intervals for the findings page: every comparison of two groups, or of a group with the
untrained model, carries one, and the verdicts read it (rules of 2026-12-06, issue 21 part 2).

A group's number is the mean over its seeds of a test score that is itself a mean over the test
examples. Its error has two parts, and the interval holds both:

- **seeds**: training randomness on the fixed test set: the sample variance of the per-seed scores
  over the number of seeds (groups paired by seed, where the seeds share initialisation and data order
  and only the method's arithmetic differs, use the variance of the per-seed differences instead);
- **test sample**: which examples the test set happens to hold. Where the run files carry each test
  example's score, it is the variance of the difference over a *paired bootstrap* of the test examples
  (the same resampled examples for both sides; :data:`BOOTSTRAP` resamples, a fixed generator so the
  page renders the same every time). Where they do not (every run before 2026-12-06), it is a bound
  from what each run file does hold (:func:`example_variance_bound`), added for the two sides as if
  their errors on the same examples were uncorrelated: too wide where methods err on the same examples
  (they do), never too narrow unless they err on opposite ones.

The two variances add, and the half-width is Student's t at the Welch-Satterthwaite degrees of
freedom times their root: 95% two-sided (:data:`LEVEL`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
BOOTSTRAP = 2000


# ----------------------------------------------------------------------------- distributions

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)), -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def f_cdf(x: float, d1: float, d2: float) -> float:
    return 0.0 if x <= 0 else betainc(d1 / 2.0, d2 / 2.0, d1 * x / (d1 * x + d2))


def _quantile(cdf, p: float, hi: float = 1.0) -> float:
    """The x >= 0 with cdf(x) = p (bisection; cdf increasing)."""
    lo = 0.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return 0.5 * (lo + hi)


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile for p >= 0.5 (df may be fractional: Welch-Satterthwaite)."""
    if not math.isfinite(df):
        df = 1e9
    return _quantile(lambda x: t_cdf(x, df), p)


def f_quantile(p: float, d1: float, d2: float) -> float:
    return _quantile(lambda x: f_cdf(x, d1, d2), p)


# ----------------------------------------------------------------------------- one side of a comparison

@dataclass
class Side:
    """What the run files say about one group (or about the untrained model) on one test set."""
    name: str
    values: list  # per-seed test scores
    seeds: list  # the seeds, in the order of values
    n: int | None  # test examples
    examples: list | None = None  # per seed: the test examples' scores (None: not recorded)
    bounds: list | None = None  # per seed: a bound on the variance of one example's score (None: no bound)
    exact: bool = False  # the same number whatever the seed (the untrained model): no seed variance

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))


def example_variance_bound(metric: str | None, value: float | None, extra: dict | None = None) -> float | None:
    """An upper bound on the variance of one test example's score, from the run's mean score alone.

    accuracy: an example scores 0 or 1, so the variance is p (1 - p). mrr: an example's reciprocal rank
    is 1 (ranked first; the run records that share as recall@1, r1) or at most 1/2, and below 1/2 its
    square is at most half of it, so E[RR^2] <= r1 + (m - r1)/2 and the variance <= r1 + (m - r1)/2 - m^2;
    without recall@1 (the untrained model) RR lies in [0, 1]: m (1 - m) (Bhatia-Davis). bleu4 (CodeXGLUE's
    smoothed sentence BLEU averaged over examples, x100): each example's score lies in [0, 100]: m (100 - m).
    None for another metric.
    """
    if value is None or not math.isfinite(value):
        return None
    if metric == "accuracy":
        return max(value * (1 - value), 0.0)
    if metric == "mrr":
        r1 = (extra or {}).get("recall@1")
        if isinstance(r1, (int, float)) and 0 <= r1 <= value:
            return max(r1 + (value - r1) / 2 - value * value, 0.0)
        return max(value * (1 - value), 0.0)
    if metric == "bleu4":
        return max(value * (100 - value), 0.0)
    return None


# ----------------------------------------------------------------------------- the interval

@dataclass
class Interval:
    diff: float  # b - a
    low: float
    high: float
    how: str  # "paired bootstrap", "bound", "seeds only" or "identical"
    df: float | None = None

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high

    def text(self, digits: int = 4) -> str:
        return f"{self.diff:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def _seed_term(side: Side) -> tuple[float, float | None]:
    """(variance of the seed mean, its degrees of freedom); (0, None) for an exact side."""
    if side.exact:
        return 0.0, None
    k = len(side.values)
    return float(np.var(side.values, ddof=1)) / k, k - 1


def _rng(a: Side, b: Side) -> np.random.Generator:
    seed = int(hashlib.sha256(f"{a.name}|{b.name}".encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed)


def _per_example_means(side: Side) -> np.ndarray | None:
    if side.examples is None or any(e is None for e in side.examples) or not side.examples:
        return None
    lengths = {len(e) for e in side.examples}
    if len(lengths) != 1:
        return None
    return np.mean(np.asarray(side.examples, dtype=np.float64), axis=0)


def compare(a: Side, b: Side, paired_seeds: bool = False, level: float = LEVEL) -> Interval | None:
    """The interval of b's mean minus a's; None when a side has fewer than two seeds (and is not exact).

    ``paired_seeds``: a and b ran the same seeds, with the same initialisation and data order (e.g. a
    run with and without its recycling cache): the seed term is that of the per-seed differences.
    """
    for side in (a, b):
        if not side.values or (not side.exact and len(side.values) < 2):
            return None
    diff = b.mean - a.mean
    terms = []  # (variance, degrees of freedom)
    if paired_seeds and not a.exact and not b.exact and a.seeds == b.seeds:
        d = np.asarray(b.values, dtype=np.float64) - np.asarray(a.values, dtype=np.float64)
        if np.all(d == 0):  # the same score on every seed: the same predictions (float equality to the last bit)
            return Interval(0.0, 0.0, 0.0, "identical")
        terms.append((float(np.var(d, ddof=1)) / len(d), len(d) - 1))
    else:
        terms += [t for t in (_seed_term(a), _seed_term(b)) if t[1] is not None]
    how = "seeds only"
    xa, xb = _per_example_means(a), _per_example_means(b)
    n = a.n if a.n == b.n else None
    if xa is not None and xb is not None and len(xa) == len(xb):
        d = xb - xa
        idx = _rng(a, b).integers(0, len(d), size=(BOOTSTRAP, len(d)))
        terms.append((float(d[idx].mean(axis=1).var(ddof=1)), len(d) - 1))
        how = "paired bootstrap"
    elif n and a.bounds and b.bounds and all(x is not None for x in a.bounds + b.bounds):
        # the variance of a seed-mean of per-example scores is at most the mean of the seeds' variances
        terms.append(((float(np.mean(a.bounds)) + float(np.mean(b.bounds))) / n, n - 1))
        how = "bound"
    total = sum(v for v, _ in terms)
    if total <= 0:
        return Interval(diff, diff, diff, how)
    denominator = sum(v * v / df for v, df in terms if df and v > 0)
    df = total * total / denominator if denominator > 0 else math.inf
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(total)
    return Interval(diff, diff - half, diff + half, how, df)


def variance_ratio(a: Side, b: Side, level: float = LEVEL) -> tuple[float, float, float] | None:
    """(ratio, low, high): b's seed variance over a's, with its F interval (k_b - 1, k_a - 1 degrees)."""
    ka, kb = len(a.values), len(b.values)
    if ka < 2 or kb < 2:
        return None
    va, vb = float(np.var(a.values, ddof=1)), float(np.var(b.values, ddof=1))
    if va <= 0:
        return None
    ratio = vb / va
    lo_q = 1.0 / f_quantile(0.5 + level / 2, ka - 1, kb - 1)  # F(kb-1, ka-1) lower quantile = 1 / F(ka-1, kb-1) upper
    hi_q = f_quantile(0.5 + level / 2, kb - 1, ka - 1)
    return ratio, ratio / hi_q, ratio / lo_q
