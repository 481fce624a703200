"""Evidence from several seeds: means with 95 % intervals, paired ratios with intervals, and claims
labelled holds / does not hold / undecided. Used by reproduce.py; imports numpy only.

A *unit* is one independent repetition of the whole attack (a training seed x an attack seed: the
attacker redraws its synthetic set, clustering, classifiers and generations). Every figure of the
reproduction is a mean over units with a Student-t 95 % interval, and every comparison is paired by
unit: the two methods of one unit share the trained model (and UnCond and SIDE share the synthetic set).

Ratios of counts are geometric means of per-unit ratios of (count + 1), with the t-interval taken on
the log scale and exponentiated: exp(mean_i log((a_i + 1) / (b_i + 1)) ± t s / sqrt(n)). The + 1 keeps
a unit where a method found nothing finite (it pulls ratios towards 1, never away from it); for hit
rates the counts are the numbers of generations in a band (AMS x N_G / 100). A claim "ratio > c"
*holds* when the whole interval lies above c, *does not hold* when it lies below c, and is
*undecided* when it contains c.
"""
import math

import numpy as np

# Two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..30 (any statistics table); 1.96 beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t975(df):
    """The 97.5 % quantile of Student's t with df degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_ci(values):
    """(mean, lo, hi): the Student-t 95 % interval of the mean; one value gives lo = hi = None."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None, None, None
    m = float(v.mean())
    if v.size == 1:
        return m, None, None
    h = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - h, m + h


def paired_ratio(a, b):
    """(ratio, lo, hi): geometric mean of (a_i + 1) / (b_i + 1) over units i, with its 95 % interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_ratio needs two equal-length, non-empty sequences, got {a.shape} and {b.shape}")
    m, lo, hi = mean_ci(np.log(a + 1.0) - np.log(b + 1.0))
    return math.exp(m), (None if lo is None else math.exp(lo)), (None if hi is None else math.exp(hi))


def unpaired_ratio(a, b):
    """(ratio, lo, hi) of mean(a + 1) / mean(b + 1) for independent samples: the delta-method standard
    error of the log of each mean, combined, with Welch-Satterthwaite degrees of freedom."""
    a, b = np.asarray(a, dtype=np.float64) + 1.0, np.asarray(b, dtype=np.float64) + 1.0
    if min(a.size, b.size) < 2:
        raise ValueError("unpaired_ratio needs at least two values on each side")
    va, vb = a.var(ddof=1) / a.size / a.mean() ** 2, b.var(ddof=1) / b.size / b.mean() ** 2
    r = math.log(a.mean() / b.mean())
    if va + vb == 0:
        return math.exp(r), math.exp(r), math.exp(r)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    h = t975(max(1, int(df))) * math.sqrt(va + vb)
    return math.exp(r), math.exp(r - h), math.exp(r + h)


def status(lo, hi, threshold):
    """holds (interval above threshold), does not hold (below), undecided (contains it or no interval)."""
    if lo is None or hi is None:
        return "undecided"
    if lo > threshold:
        return "holds"
    if hi < threshold:
        return "does not hold"
    return "undecided"


def claim(text, ratio, lo, hi, threshold, **extra):
    """One verdict entry {claim, ratio, lo, hi, threshold, status}."""
    return dict(claim=text, ratio=ratio, lo=lo, hi=hi, threshold=threshold, status=status(lo, hi, threshold), **extra)


def count_ci(values):
    """mean_ci of a quantity that cannot be negative (a count, a percentage): the lower end clipped at 0."""
    m, lo, hi = mean_ci(values)
    return m, (None if lo is None else max(lo, 0.0)), hi


def summarize(rows, fields=("distinct_any", "ams_any")):
    """{field: {mean, lo, hi, n}} over rows (one row per unit), plus per-band `distinct`, `ams`, `ums`."""
    out = {}
    for f in fields:
        m, lo, hi = count_ci([r[f] for r in rows])
        out[f] = dict(mean=m, lo=lo, hi=hi, n=len(rows))
    for f in ("distinct", "ams", "ums"):
        bands = rows[0][f].keys() if rows else ()
        out[f] = {b: dict(zip(("mean", "lo", "hi"), count_ci([r[f][b] for r in rows]))) for b in bands}
    return out


def curve_summary(curves):
    """Mean and 95 % interval per budget over units; curves: list (units) of [{budget, distinct_any,
    distinct{band}}]. Budgets present in every unit only."""
    if not curves:
        return []
    budgets = sorted(set.intersection(*[{p["budget"] for p in c} for c in curves]))
    out = []
    for b in budgets:
        pts = [next(p for p in c if p["budget"] == b) for c in curves]
        m, lo, hi = count_ci([p["distinct_any"] for p in pts])
        bands = {k: dict(zip(("mean", "lo", "hi"), count_ci([p["distinct"][k] for p in pts]))) for k in pts[0]["distinct"]}
        out.append(dict(budget=b, mean=m, lo=lo, hi=hi, n=len(pts), distinct=bands))
    return out


def overtake(a, b):
    """The smallest budget from which curve a's mean stays above curve b's (None if never); both from
    curve_summary, compared at their common budgets."""
    common = sorted({p["budget"] for p in a} & {p["budget"] for p in b})
    ma, mb = ({p["budget"]: p["mean"] for p in c} for c in (a, b))
    above = [ma[x] > mb[x] for x in common]
    for i, x in enumerate(common):
        if all(above[i:]):
            return x
    return None
