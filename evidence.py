"""Evidence from independent replicates: means with Student-t intervals, ratios with intervals on
the log scale, and a family of claims decided together (Holm-Bonferroni), each labelled holds / does
not hold / undecided; then the paper's claims themselves (its Table 1 on both metrics, the
controls), the one family reproduce.py decides. Used by reproduce.py and audit.py; imports numpy
and the standard library only.

A *replicate* is one independent repetition of the whole experiment: its own training sample,
initial weights, training stream, synthetic set, clustering, classifiers and generation noise, with
no seed shared with any other replicate. Methods are compared *within* a replicate (they attack the
same trained model), so every comparison is paired by replicate.

Ratios of counts are geometric means of per-replicate ratios of (count + 1), with the interval taken
on the log scale and exponentiated: exp(mean_i log((a_i + 1) / (b_i + 1)) ± t s / sqrt(n)). The + 1
keeps a replicate where a method found nothing finite (it pulls ratios towards 1, never away from
it). Replicates of different training-set sizes are independent but not identically distributed; a
claim pooled over sizes is the equal-weight mean of the per-size means (a stratified estimate), with
standard error sqrt(Σ_k s_k² / n_k) / S and Welch-Satterthwaite degrees of freedom.

A claim "ratio > c" is a two-sided test of ratio = c. Over the m claims of one run, Holm's step-down
procedure (Holm 1979) tests the claim with the j-th smallest p-value at level α / (m - j + 1) and
stops at the first claim it cannot decide; its *corrected* interval is the two-sided interval at
that level, so it excludes c exactly when Holm decides the claim: **holds** (above c), **does not
hold** (below c), otherwise **undecided**. The family-wise probability of any wrong decision is at
most α = 5 %. The uncorrected 95 % interval and status are kept beside the corrected ones.
"""
import math
from typing import NamedTuple

import numpy as np

# family-wise error rate of one run's claims (and the level of every uncorrected interval)
ALPHA = 0.05
# continued-fraction terms of the incomplete beta function (converges in < 100 here)
BETA_CF_ITERS = 300
BETA_CF_EPS = 1e-15  # relative convergence of that continued fraction
QUANTILE_ITERS = 200  # Newton/bisection steps of t_quantile (Newton converges in < 10)


# ============================================================================ Student's t


def _betacf(a, b, x):
    """Continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, BETA_CF_ITERS + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < BETA_CF_EPS:
            break
    return h


def betainc(a, b, x):
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                     + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x, df):
    """P(T <= x) for Student's t with df > 0 degrees of freedom: 1 - I_{df/(df+x²)}(df/2, 1/2) / 2
    for x >= 0."""
    if df <= 0:
        raise ValueError(f"Student's t needs df > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


def t_pdf(x, df):
    """Student's t density with df > 0 degrees of freedom."""
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def t_quantile(p, df):
    """The p-quantile of Student's t with df > 0 degrees of freedom, 0 < p < 1: Newton's method on
    t_cdf, kept inside a bisection bracket (so it always converges)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    x = 0.5 * (lo + hi)
    for _ in range(QUANTILE_ITERS):
        f = t_cdf(x, df) - p
        lo, hi = (x, hi) if f < 0 else (lo, x)
        step = f / t_pdf(x, df)
        nxt = x - step if lo < x - step < hi else 0.5 * (lo + hi)
        if abs(nxt - x) <= 1e-13 * max(1.0, x):
            return nxt
        x = nxt
    return x


def t975(df):
    """The 97.5 % quantile of Student's t with df degrees of freedom (df > 0): the 95 %
    interval's."""
    if df <= 0:
        raise ValueError(f"t quantile needs df > 0, got {df}")
    return t_quantile(0.975, df)


# ============================================================================ means and ratios


def mean_ci(values, alpha=ALPHA):
    """(mean, lo, hi): the Student-t (1 - alpha) interval of the mean; one value gives
    lo = hi = None."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None, None, None
    m = float(v.mean())
    if v.size == 1:
        return m, None, None
    h = t_quantile(1 - alpha / 2, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - h, m + h


def count_ci(values):
    """mean_ci of a quantity that cannot be negative (a count, a percentage): the lower end clipped
    at 0."""
    m, lo, hi = mean_ci(values)
    return m, (None if lo is None else max(lo, 0.0)), hi


class Estimate(NamedTuple):
    """An estimate with a Student-t interval: the value on its test scale (the log of a ratio, or a
    difference when log_scale is False), standard error (None: no interval), degrees of freedom, and
    the number of independent replicates behind it."""
    log: float
    se: float | None
    df: float | None
    n: int
    log_scale: bool = True

    def value(self, v=None):
        """The estimate (or v, on the test scale) on the reporting scale: a ratio exp(log), or a
        difference."""
        v = self.log if v is None else v
        return math.exp(v) if self.log_scale else v

    def interval(self, alpha=ALPHA):
        """(lo, hi) at two-sided level 1 - alpha on the reporting scale, or (None, None)."""
        if self.se is None:
            return None, None
        h = 0.0 if self.se == 0 else t_quantile(1 - alpha / 2, self.df) * self.se
        return self.value(self.log - h), self.value(self.log + h)

    def p_value(self, threshold):
        """Two-sided p of the test value = threshold (1 without an interval; 0 or 1 with zero
        spread)."""
        d = self.log - (math.log(threshold) if self.log_scale else threshold)
        if self.se is None:
            return 1.0
        if self.se == 0:
            return 0.0 if d != 0 else 1.0
        return min(1.0, 2.0 * (1.0 - t_cdf(abs(d) / self.se, self.df)))


def _stratified(groups):
    """Estimate of the equal-weight mean of the groups' means (each a 1-d array of per-replicate
    values): se = sqrt(Σ s_k²/n_k) / S, Welch-Satterthwaite
    df = (Σ v_k)² / Σ v_k²/(n_k - 1)."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    n = sum(len(g) for g in groups)
    if not groups:
        raise ValueError("an estimate needs at least one replicate")
    est = float(np.mean([g.mean() for g in groups]))
    if min(len(g) for g in groups) < 2:
        return Estimate(est, None, None, n)
    S = len(groups)
    v = [g.var(ddof=1) / len(g) / S ** 2 for g in groups]
    se = math.sqrt(sum(v))
    if se == 0:
        return Estimate(est, 0.0, float(n - S), n)
    df = sum(v) ** 2 / sum(vk ** 2 / (len(g) - 1) for vk, g in zip(v, groups) if vk > 0)
    return Estimate(est, se, df, n)


def paired_log_ratio(a, b, strata=None):
    """Estimate of the log of the geometric-mean ratio of (a_i + 1) / (b_i + 1) over paired
    replicates i; strata (one key per replicate, e.g. the training-set size) makes it the stratified
    mean."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0 or a.ndim != 1:
        raise ValueError("a paired ratio needs two equal-length, non-empty sequences, "
                         f"got {a.shape} and {b.shape}")
    d = np.log(a + 1.0) - np.log(b + 1.0)
    keys = np.zeros(len(d)) if strata is None else np.asarray(strata)
    return _stratified([d[keys == k] for k in sorted(set(keys.tolist()))])


def unpaired_log_ratio(a, b):
    """Estimate of log(mean(a + 1) / mean(b + 1)) for independent samples: the delta-method standard
    error of the log of each mean, combined, with Welch-Satterthwaite degrees of freedom."""
    a, b = np.asarray(a, dtype=np.float64) + 1.0, np.asarray(b, dtype=np.float64) + 1.0
    if min(a.size, b.size) < 2:
        raise ValueError("an unpaired ratio needs at least two values on each side")
    va, vb = a.var(ddof=1) / a.size / a.mean() ** 2, b.var(ddof=1) / b.size / b.mean() ** 2
    r = math.log(a.mean() / b.mean())
    if va + vb == 0:
        return Estimate(r, 0.0, float(a.size + b.size - 2), a.size + b.size)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return Estimate(r, math.sqrt(va + vb), df, a.size + b.size)


def mean_estimate(values):
    """Estimate (difference scale) of the mean of independent replicate values, Student-t."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("an estimate needs at least one replicate")
    se = float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else None
    return Estimate(float(v.mean()), se, float(v.size - 1) if v.size > 1 else None, int(v.size),
                    log_scale=False)


def paired_ratio(a, b):
    """(ratio, lo, hi): geometric mean of (a_i + 1) / (b_i + 1) over replicates i, with its 95 %
    interval."""
    e = paired_log_ratio(a, b)
    return (math.exp(e.log), *e.interval())


# ========================================================================= claims, decided together


def status(lo, hi, threshold, direction=">"):
    """For the claim "value > threshold" (direction ">"; "<" for "value < threshold"): holds when
    the interval lies wholly on the claimed side, does not hold when wholly on the other, else
    undecided."""
    if lo is None or hi is None:
        return "undecided"
    above, below = lo > threshold, hi < threshold
    if (above and direction == ">") or (below and direction == "<"):
        return "holds"
    return "does not hold" if above or below else "undecided"


def claim(text, est, threshold, direction=">", **extra):
    """One claim "value > threshold" (or "<") from an Estimate, with its uncorrected 95 % interval
    and status; `holm` adds the corrected ones (they start equal to the raw ones: a family of one).
    `ratio` is the estimate on its reporting scale (a ratio, or a difference for log_scale=False
    estimates)."""
    lo, hi = est.interval()
    raw = dict(lo=lo, hi=hi, status=status(lo, hi, threshold, direction))
    return dict(claim=text, ratio=est.value(), threshold=threshold, direction=direction,
                scale="ratio" if est.log_scale else "difference", replicates=est.n, df=est.df,
                se=est.se, p=est.p_value(threshold), raw=raw,
                corrected=dict(raw, level=1 - ALPHA, rank=1, m=1),
                lo=lo, hi=hi, status=raw["status"], **extra)


def holm(claims, alpha=ALPHA):
    """Decide the family `claims` (from `claim`) together by Holm's step-down procedure: the claim
    with the j-th smallest p-value (j = 1..m) is tested at alpha / (m - j + 1) while every earlier
    one was decided; its corrected interval is the two-sided interval at that level (the last level
    reached, for the claims after the first undecided one, whose intervals then contain the
    threshold). Sets `corrected`, and `lo`, `hi`, `status` to the corrected values; returns the
    claims."""
    decided = [c for c in claims if c.get("p") is not None]
    m = len(decided)
    order = sorted(range(m), key=lambda i: decided[i]["p"])
    level_at, stopped = None, False
    for j, i in enumerate(order):
        c = decided[i]
        if not stopped:
            level_at = alpha / (m - j)
            stopped = c["p"] > level_at
        lo, hi = c["_est"].interval(level_at) if "_est" in c else (c["raw"]["lo"], c["raw"]["hi"])
        st = "undecided" if stopped else status(lo, hi, c["threshold"], c.get("direction", ">"))
        c["corrected"] = dict(lo=lo, hi=hi, status=st, level=1 - level_at, rank=j + 1, m=m)
        c.update(lo=lo, hi=hi, status=st)
    return claims


def decide(specs, alpha=ALPHA):
    """A family of claims from (text, Estimate, threshold, extra dict) specs (extra may hold
    `direction`), decided together by `holm`; each gets `needed`, the replicates at which its
    corrected interval would exclude the threshold at the observed effect and spread. Plain dicts
    (JSON-ready) are returned."""
    claims = [dict(claim(text, est, thr, **extra), _est=est) for text, est, thr, extra in specs]
    holm(claims, alpha)
    for c in claims:
        c["needed"] = replicates_needed(c.pop("_est"), c["threshold"], c["corrected"]["level"])
    return claims


def replicates_needed(est, threshold, level=1 - ALPHA, cap=1000):
    """The smallest number of replicates n at which an interval at `level` around the observed
    ratio, with the observed per-replicate spread (se·sqrt(replicates)), would exclude the
    threshold; None if the estimate sits on the threshold, has no spread estimate, or needs more
    than `cap`. The degrees of freedom grow with n in the estimate's own proportion,
    df·(n - 1)/(replicates - 1) (n - 1 for a plain mean; a stratified estimate's Welch df is
    smaller), so that at n = replicates the interval is the estimate's own and an undecided claim
    never reads as needing no more replicates."""
    if est.se is None or est.se == 0:
        return None if est.se is None else est.n
    d = abs(est.log - (math.log(threshold) if est.log_scale else threshold))
    sd = est.se * math.sqrt(est.n)
    if d == 0:
        return None
    per = est.df / (est.n - 1) if est.df is not None and est.n > 1 else 1.0
    half = lambda n: t_quantile(0.5 + level / 2, per * (n - 1)) * sd / math.sqrt(n)  # noqa: E731
    if half(cap) >= d:
        return None
    lo, hi = 2, cap  # half(lo) >= d (or lo = 2, the fewest with a spread) and half(hi) < d: bisect
    if half(lo) < d:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if half(mid) >= d else (lo, mid)
    return hi


# ============================================================================ summaries of a table


def summarize(rows, fields=("distinct_any", "ams_any")):
    """{field: {mean, lo, hi, n}} over rows (one row per replicate), plus per-band `distinct`,
    `ams`, `ums`."""
    out = {}
    for f in fields:
        m, lo, hi = count_ci([r[f] for r in rows])
        out[f] = dict(mean=m, lo=lo, hi=hi, n=len(rows))
    for f in ("distinct", "ams", "ums"):
        bands = rows[0][f].keys() if rows else ()
        out[f] = {b: dict(zip(("mean", "lo", "hi"), count_ci([r[f][b] for r in rows])))
                  for b in bands}
    return out


def curve_summary(curves):
    """Mean and 95 % interval per budget over replicates; curves: list (replicates) of [{budget,
    distinct_any, distinct{band}}]. Budgets present in every replicate only."""
    if not curves:
        return []
    budgets = sorted(set.intersection(*[{p["budget"] for p in c} for c in curves]))
    out = []
    for b in budgets:
        pts = [next(p for p in c if p["budget"] == b) for c in curves]
        m, lo, hi = count_ci([p["distinct_any"] for p in pts])
        bands = {k: dict(zip(("mean", "lo", "hi"), count_ci([p["distinct"][k] for p in pts])))
                 for k in pts[0]["distinct"]}
        out.append(dict(budget=b, mean=m, lo=lo, hi=hi, n=len(pts), distinct=bands))
    return out


def overtake(a, b):
    """The smallest budget from which curve a's mean stays above curve b's (None if never); both
    from curve_summary, compared at their common budgets."""
    common = sorted({p["budget"] for p in a} & {p["budget"] for p in b})
    ma, mb = ({p["budget"]: p["mean"] for p in c} for c in (a, b))
    above = [ma[x] > mb[x] for x in common]
    for i, x in enumerate(common):
        if all(above[i:]):
            return x
    return None


# ============================================================ the paper's claims, as one family
# The claims reproduce.py decides from its per-replicate rows: the paper's, on both of its
# metrics, and the controls, as ONE family corrected for multiplicity (decide: Holm-Bonferroni),
# plus descriptive lines that carry an interval but no verdict. The paper's headline (arXiv
# 2410.02467v7, Table 1 and the abstract's "over 50 % more effective") is a statement about AMS
# and UMS in each similarity band; here every comparison of SIDE with a baseline is made on both
# metrics, counted per replicate at equal N_G: the hit count (generations whose nearest training
# image is in a band: AMS x N_G / 100) and the distinct count (training images reached: UMS x
# N_G / 100), in any band and in the high band, each at the thresholds 1 (more) and 1.5 (the
# paper's 50 % more). A ratio pooled over training-set sizes is the stratified mean of per-size
# paired log-ratios (every replicate of every size is independent).

NAMES = dict(uncond="Carlini UnCond", cond="Carlini Cond (classifier on the true labels)",
             cond_ddpm="a class-conditional DDPM on the true labels (Cond, other reading)",
             side_random="SIDE with its surrogate labels permuted (control)",
             uncond_budget="UnCond with SIDE's whole budget N_syn + N_G (compute-matched)")
METRIC_NAMES = dict(hits="hit rate (AMS)", distinct="distinct training images (UMS)")
PAPER_THRESHOLDS = (1.0, 1.5)  # "more", and the abstract's "over 50 % more effective"


def value(row, metric, band):
    """The count of `metric` (hits or distinct) in `band` (any = all bands together) of one row."""
    return row[f"{metric}_any"] if band == "any" else row[metric][band]


def paired(rows, a, b, metric, band, arm="table", sizes=None):
    """(a values, b values, size of each pair) over the replicates that ran both
    methods in `arm`."""
    by = {(r["arm"], r["n_train"], r["replicate"], r["method"]): r for r in rows}
    keys = sorted(k[:3] for k in by if k[0] == arm and k[3] == a and k[:3] + (b,) in by
                  and (sizes is None or k[1] in sizes))
    return ([value(by[k + (a,)], metric, band) for k in keys],
            [value(by[k + (b,)], metric, band) for k in keys],
            [k[1] for k in keys])


def _ratio(rows, a, b, metric, band, arm="table", sizes=None):
    va, vb, strata = paired(rows, a, b, metric, band, arm, sizes)
    if len(va) < 2 or max(va + vb) == 0:  # nothing found by either: a ratio of 1 says nothing
        return None
    return paired_log_ratio(va, vb, strata=strata)


def family(rows, conditional, sizes, weak_size=None, cond_is_uncond=False):
    """The specs (text, Estimate, threshold, extra) of every claim of one run, in report order.
    cond_is_uncond: Carlini Cond's tuned guidance scale is 0, so its generations are plain
    sampling's, bit for bit; its claims would repeat UnCond's and are left out (one hypothesis is
    tested once)."""
    specs = []
    baselines = ("uncond",) if cond_is_uncond else ("uncond", "cond")

    def add(text, est, thr=1.0, **extra):
        if est is not None:
            specs.append((text, est, thr, dict(extra)))

    for b in baselines:  # the paper's Table 1, on both metrics, any and high band, > 1 and > 1.5
        for metric in ("hits", "distinct"):
            for band in ("any", "high"):
                for thr in PAPER_THRESHOLDS:
                    verb = "more" if thr == 1 else "at least 1.5x (the paper: over 50 % more)"
                    add(f"SIDE {verb} than {NAMES[b]}: {METRIC_NAMES[metric]}, {band} band",
                        _ratio(rows, "side", b, metric, band), thr, group="paper", baseline=b,
                        metric=metric, band=band)
    for metric in ("hits", "distinct"):  # controls: one factor each
        add(f"SIDE more than {NAMES['side_random']}: {METRIC_NAMES[metric]}, any band",
            _ratio(rows, "side", "side_random", metric, "any"), group="control", metric=metric)
    add(f"SIDE more than {NAMES['uncond_budget']}: distinct training images, any band",
        _ratio(rows, "side", "uncond_budget", "distinct", "any"), group="control",
        metric="distinct")
    add("SIDE counting its synthetic set (N_syn + N_G samples) more than UnCond with the same "
        "N_syn + N_G: distinct training images, any band",
        _ratio(rows, "side_union", "uncond_budget", "distinct", "any"),
        group="control", metric="distinct")
    for metric in ("hits", "distinct"):
        add(f"SIDE more than {NAMES['cond_ddpm']}: {METRIC_NAMES[metric]}, any band",
            _ratio(rows, "side", "cond_ddpm", metric, "any"), group="control", metric=metric)
    # the abstract's "where previous methods fail": a weakly memorized model
    if weak_size is not None:
        for b in baselines:
            for metric in ("hits", "distinct"):
                add(f"weakly memorized model (n={weak_size}): SIDE more than {NAMES[b]}: "
                    f"{METRIC_NAMES[metric]}, any band",
                    _ratio(rows, "side", b, metric, "any", arm="weak"), group="weak", baseline=b,
                    metric=metric)
    _size_claims(rows, sizes, add)
    _label_claims(conditional, add)
    return specs


def _size_claims(rows, sizes, add):
    """Smaller sets leak more: UnCond's hit rate and its share of the training set at the
    smallest size against the largest (unpaired: different models)."""
    small, large = min(sizes), max(sizes)
    if small != large:
        for metric, what in (("hits", "UnCond's hit rate"),
                             ("share", "the share of its training set UnCond reaches")):
            a, b = ([_size_value(r, metric) for r in rows if r["arm"] == "table"
                     and r["method"] == "uncond" and r["n_train"] == n] for n in (small, large))
            if min(len(a), len(b)) >= 2 and max(a + b) > 0:
                add(f"smaller sets leak more: {what}, n={small} above n={large} (each size at its "
                    "calibrated budget)",
                    unpaired_log_ratio(a, b), group="size", metric=metric)


def _label_claims(conditional, add):
    """SIDE Definition 1 / Theorem 1: each labelling's Δ < 0, and informative below permuted."""
    deltas = {c["labelling"]: c["delta"]["per_replicate"] for c in conditional if c.get("delta")}
    # SIDE Definition 1 / SIDE Theorem 1: a label lowers M (more memorization)
    for lab, per in deltas.items():
        if len(per) >= 2:
            add(f"{lab} labels lower the memorization divergence: "
                "Δ = M(conditional) − M(unconditional) < 0 (nats)",
                mean_estimate(per), 0.0, direction="<", group="conditional")
    inf, perm = deltas.get("informative", []), deltas.get("permuted", [])
    if len(inf) == len(perm) >= 2:  # the same classes and class sizes: only informativeness differs
        add("informative labels lower it more than the same labels permuted: "
            "Δ(informative) − Δ(permuted) < 0 (nats, paired by replicate)",
            mean_estimate([a - b for a, b in zip(inf, perm)]), 0.0, direction="<",
            group="conditional")


def _size_value(row, metric):
    """Hits (AMS x N_G / 100, any band) or the share of the n training images reached
    (distinct / n, x 100)."""
    return row["hits_any"] if metric == "hits" else 100.0 * row["distinct_any"] / row["n_train"]


def descriptive(rows, curves, sizes, steps=None):
    """Per-size paired ratios of SIDE to UnCond on both metrics (raw 95 % intervals, no verdict),
    the ceiling of each UMS comparison (how much of its training set plain sampling already
    reaches), the budget from which SIDE with its synthetic set stays ahead of plain sampling, and
    the sampler check: the same attack with steps[1] sampler steps against the reported steps[0],
    paired by replicate."""
    out = []
    if steps and any(r["arm"] == "steps" for r in rows):
        by = {(r["arm"], r["n_train"], r["replicate"], r["method"]): r for r in rows}
        for m in ("uncond", "side"):
            for metric in ("hits", "distinct"):
                keys = sorted(k[1:3] for k in by if k[0] == "steps" and k[3] == m)
                a = [value(by[("steps", n, r, m)], metric, "any") for n, r in keys]
                b = [value(by[("table", n, r, m)], metric, "any") for n, r in keys]
                if len(a) >= 2:
                    ratio, lo, hi = paired_ratio(a, b)
                    out.append(dict(kind="steps", method=m, metric=metric, ratio=ratio, lo=lo,
                                    hi=hi, replicates=len(a),
                                    text=f"{steps[1]} / {steps[0]} sampler steps, "
                                         f"{NAMES.get(m, 'SIDE')}, {METRIC_NAMES[metric]}, "
                                         "any band (the same replicates, seeds and models)"))
    for n in sizes:
        for metric in ("hits", "distinct"):
            va, vb, _ = paired(rows, "side", "uncond", metric, "any", sizes=[n])
            if len(va) >= 2:
                r, lo, hi = paired_ratio(va, vb)
                out.append(dict(kind="per size", n=n, metric=metric, ratio=r, lo=lo, hi=hi,
                                replicates=len(va),
                                text=f"n={n}: SIDE / Carlini UnCond, {METRIC_NAMES[metric]}, "
                                     "any band"))
        reached = [r["distinct_any"] for r in rows
                   if r["arm"] == "table" and r["method"] == "uncond" and r["n_train"] == n]
        if reached:
            m, lo, hi = count_ci(reached)
            out.append(dict(kind="ceiling", n=n, mean=m, lo=lo, hi=hi, share=m / n,
                            text=f"n={n}: plain sampling reaches {m:.1f} of {n} training images "
                                 f"({100 * m / n:.0f} %): a distinct-count ratio cannot exceed "
                                 f"{(n + 1) / (m + 1):.2f}"))
        u, s = curves.get(f"{n}/uncond_budget"), curves.get(f"{n}/side_union")
        if u and s:
            out.append(dict(kind="budget", n=n, budget=overtake(s, u),
                            text=f"n={n}: budget from which SIDE (synthetic set + guided) stays "
                                 "ahead of plain sampling, by mean distinct images"))
    return out


def verdict(rows, curves, conditional, sizes, weak_size=None, steps=None, cond_is_uncond=False):
    """{claims: the decided family (decide), descriptive: the lines without a verdict}."""
    claims = decide(family(rows, conditional, sizes, weak_size, cond_is_uncond))
    return dict(claims=claims, descriptive=descriptive(rows, curves, sizes, steps),
                family=dict(size=len(claims), alpha=ALPHA, method="Holm-Bonferroni",
                            cond_is_uncond=cond_is_uncond))


def summarize_table(rows, sizes, arm="table"):
    """{"n/method": summarize(...)} of one arm's rows."""
    stats = {}
    for n in sizes:
        for m in sorted({r["method"] for r in rows if r["arm"] == arm and r["n_train"] == n}
                        - {"side_union"}):
            sel = [r for r in rows if r["arm"] == arm and r["n_train"] == n and r["method"] == m]
            stats[f"{n}/{m}"] = summarize(sel,
                                                   fields=("distinct_any", "ams_any", "hits_any"))
    return stats


def check_independent(plan):
    """Raise ValueError unless no seed is used by two replicates (any role, any kind of seed)."""
    seen = {}
    for rep in plan:
        for kind, s in rep["seeds"].items():
            if s in seen and seen[s] != rep["name"]:
                raise ValueError(f"seed {s} is shared by {seen[s]} and {rep['name']} ({kind})")
            seen[s] = rep["name"]
    return len(seen)
