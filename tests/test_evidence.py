"""evidence.py against independent references: the Student-t distribution integrated numerically,
hand-computed intervals, coverage by simulation, and hand-built verdicts."""
import math

import numpy as np
import pytest

import evidence


def t_cdf(x, df, n=200001):
    """P(T <= x) for Student's t by the trapezoid rule on its density (independent of the table)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    u = np.linspace(0.0, x, n)
    pdf = c * (1 + u ** 2 / df) ** (-(df + 1) / 2)
    return 0.5 + float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(u)))


# Two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..30, as printed in statistics tables
# (3 decimals).
T975_TABLE = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
              2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
              2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 20, 30, 200, 2.5, 17.3])
def test_t_quantiles_are_the_975_points_of_student_t(df):
    assert t_cdf(evidence.t975(df), df) == pytest.approx(0.975, abs=2e-4)


def test_t975_agrees_with_the_printed_table():
    for df, v in enumerate(T975_TABLE, start=1):
        assert evidence.t975(df) == pytest.approx(v, abs=5.1e-4)


@pytest.mark.parametrize("p,df,value", [(0.975, 2, 4.302652730), (0.995, 10, 3.169272673),
                                        (0.9995, 5, 6.868826626), (0.975, 1, 12.70620474),
                                        (0.99, 3, 4.540702858), (0.975, 1e7, 1.959964)])
def test_t_quantiles_at_other_levels_match_published_values(p, df, value):
    assert evidence.t_quantile(p, df) == pytest.approx(value, rel=1e-6)
    assert evidence.t_quantile(1 - p, df) == pytest.approx(-value, rel=1e-6)


@pytest.mark.parametrize("x,df", [(0.3, 1), (1.7, 2), (-2.2, 4), (3.1, 9.5), (0.05, 30)])
def test_t_cdf_against_the_integrated_density(x, df):
    assert evidence.t_cdf(x, df) == pytest.approx(t_cdf(x, df), abs=1e-6)


@pytest.mark.parametrize("x", [0.0, 0.1, 0.37, 0.5, 0.93, 1.0])
def test_incomplete_beta_closed_forms(x):
    assert evidence.betainc(1, 1, x) == pytest.approx(x, abs=1e-12)
    assert evidence.betainc(3.5, 1, x) == pytest.approx(x ** 3.5, abs=1e-12)
    assert evidence.betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, abs=1e-12)
    assert evidence.betainc(2.2, 0.7, x) == pytest.approx(1 - evidence.betainc(0.7, 2.2, 1 - x),
                                                          abs=1e-12)


def test_mean_interval_by_hand():
    m, lo, hi = evidence.mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: half-width t_{.975,2} / sqrt(3)
    assert (m == 2.0 and hi - m == pytest.approx(4.302653 / math.sqrt(3))
            and m - lo == pytest.approx(4.302653 / math.sqrt(3)))
    assert evidence.mean_ci([5.0]) == (5.0, None, None)


@pytest.mark.parametrize("n", [3, 6])
def test_mean_interval_covers_the_true_mean_95_percent_of_the_time(n):
    rng = np.random.default_rng(0)
    reps, hit = 4000, 0
    for _ in range(reps):
        _, lo, hi = evidence.mean_ci(rng.normal(10.0, 3.0, n))
        hit += lo <= 10.0 <= hi
    assert abs(hit / reps - 0.95) < 0.012


def test_paired_ratio_of_an_exact_multiple_has_no_width():
    b = np.array([3, 7, 0, 12])
    r, lo, hi = evidence.paired_ratio(2 * (b + 1) - 1, b)  # (a + 1) / (b + 1) = 2 in every unit
    assert r == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)


def test_paired_ratio_is_the_geometric_mean_with_a_log_scale_interval():
    a, b = np.array([9, 19, 4]), np.array([4, 4, 4])  # ratios of (x+1): 2, 4, 1
    logs = np.log([2.0, 4.0, 1.0])
    h = 4.302653 * logs.std(ddof=1) / math.sqrt(3)
    r, lo, hi = evidence.paired_ratio(a, b)
    assert r == pytest.approx(2.0) and lo == pytest.approx(math.exp(logs.mean() - h))
    assert hi == pytest.approx(math.exp(logs.mean() + h))


def unpaired_ratio(a, b):
    """(ratio, lo, hi) of mean(a + 1) / mean(b + 1) from evidence.unpaired_log_ratio."""
    e = evidence.unpaired_log_ratio(a, b)
    return (math.exp(e.log), *e.interval())


def test_unpaired_ratio_covers_the_true_ratio():
    rng = np.random.default_rng(1)
    reps, hit = 2000, 0
    for _ in range(reps):  # Poisson counts with means 30 and 15: (30 + 1) / (15 + 1)
        _, lo, hi = unpaired_ratio(rng.poisson(30, 8), rng.poisson(15, 8))
        hit += lo <= 31 / 16 <= hi
    assert 0.93 <= hit / reps <= 0.97


@pytest.mark.parametrize("lo,hi,expect", [(1.1, 2.0, "holds"), (0.5, 0.9, "does not hold"),
                                          (0.9, 1.2, "undecided"), (None, None, "undecided"),
                                          (1.0, 1.3, "undecided")])
def test_status_of_an_interval(lo, hi, expect):
    assert evidence.status(lo, hi, 1.0) == expect


def test_curve_summary_and_overtaking_by_hand():
    c1 = [dict(budget=b, distinct_any=v, distinct={"high": v})
          for b, v in ((10, 1), (20, 2), (30, 3))]
    c2 = [dict(budget=b, distinct_any=v, distinct={"high": v})
          for b, v in ((10, 3), (20, 4), (30, 5))]
    s = evidence.curve_summary([c1, c2])
    assert ([p["mean"] for p in s] == [2.0, 3.0, 4.0]
            and s[0]["hi"] - 2.0 == pytest.approx(12.706205 * 1.0 / 1.0))
    assert s[0]["lo"] == 0.0  # 2 - 12.7 clipped: a count is never negative
    flat = [dict(budget=b, mean=m) for b, m in ((10, 2.5), (20, 2.5), (30, 2.5))]
    assert evidence.overtake(s, flat) == 20 and evidence.overtake(flat, s) is None


def test_unpaired_ratio_by_hand():
    """a + 1 = [2, 4], b + 1 = [1, 3, 5]: means 3 and 3; delta-method variances of the log means
    var/n/mean² = 2/2/9 and 4/3/9; Welch-Satterthwaite df = (va+vb)²/(va²/1 + vb²/2) = 2.88 (not
    rounded)."""
    va, vb = 2 / 2 / 9, 4 / 3 / 9
    df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)
    assert df == pytest.approx(49 / 17)
    lo_q, hi_q = 3.0, 5.0  # the 97.5 % point by bisection on the integrated density
    for _ in range(30):
        mid = (lo_q + hi_q) / 2
        lo_q, hi_q = (mid, hi_q) if t_cdf(mid, df, 20001) < 0.975 else (lo_q, mid)
    q = (lo_q + hi_q) / 2
    h = q * math.sqrt(va + vb)
    r, lo, hi = unpaired_ratio([1, 3], [0, 2, 4])
    assert (r, lo, hi) == pytest.approx((1.0, math.exp(-h), math.exp(h)), rel=1e-4)
    # no spread: a zero-width interval at 6/2
    r, lo, hi = unpaired_ratio([5, 5], [1, 1, 1])
    assert r == lo == hi == pytest.approx(3.0)
    r, lo, hi = unpaired_ratio([0, 8], [4, 4, 4])  # all spread on one side: df = 1 exactly
    assert (lo, hi) == pytest.approx((math.exp(-12.706205 * 0.8), math.exp(12.706205 * 0.8)),
                                     rel=1e-6)  # va = 32/2/25
    # equal spreads; spread on the other side only
    for a, b in (([0, 2], [0, 2]), ([4, 4], [0, 2, 4])):
        r, lo, hi = unpaired_ratio(a, b)
        assert lo < r < hi
    with pytest.raises(ValueError):
        unpaired_ratio([1, 2], [3])


def test_paired_ratio_of_one_unit_has_no_interval():
    assert evidence.paired_ratio([3], [1]) == (2.0, None, None)
    with pytest.raises(ValueError):
        evidence.paired_ratio([], [])


def test_a_tie_is_not_overtaking():
    a = [dict(budget=b, mean=m) for b, m in ((10, 1.0), (20, 3.0), (30, 2.0))]
    b = [dict(budget=b, mean=m) for b, m in ((10, 2.0), (20, 2.0), (30, 2.0))]
    assert evidence.overtake(a, b) is None  # equal at the last budget: not above
    assert evidence.overtake(a, [dict(p, mean=1.5) if p["budget"] == 30 else p for p in b]) == 20


# --------------------------------------------------------------------------- pooled claims and Holm


def test_stratified_estimate_by_hand():
    """Two sizes: log-ratios [0, 2] (mean 1, var 2) and [1, 1, 4] (mean 2, var 3). Equal-weight mean
    1.5; v_k = var/n/S² = 2/2/4 and 3/3/4; se = sqrt(0.5); df = 0.5² / (0.25²/1 + 0.25²/2) =
    2.667."""
    e = evidence._stratified([np.array([0.0, 2.0]), np.array([1.0, 1.0, 4.0])])
    assert e.log == pytest.approx(1.5) and e.se == pytest.approx(math.sqrt(0.5)) and e.n == 5
    assert e.df == pytest.approx(0.25 / (0.0625 + 0.0625 / 2))
    one = evidence.paired_log_ratio([1, 3, 7], [1, 1, 1])  # one stratum: the plain paired t
    logs = np.log([1.0, 2.0, 4.0])
    assert (one.log == pytest.approx(logs.mean())
            and one.se == pytest.approx(logs.std(ddof=1) / math.sqrt(3)))
    assert one.df == pytest.approx(2.0)


def test_stratified_interval_covers_the_mean_of_unequal_strata():
    rng = np.random.default_rng(2)
    reps, hit = 3000, 0
    # three sizes with different true log-ratios and spreads, 5 replicates each
    for _ in range(reps):
        groups = [rng.normal(mu, sd, 5) for mu, sd in ((0.2, 0.3), (0.5, 0.1), (-0.1, 0.6))]
        lo, hi = evidence._stratified(groups).interval()
        hit += lo <= math.exp(0.2) <= hi
    assert abs(hit / reps - 0.95) < 0.015


def _est_with_p(p, sign=1, df=10):
    """An Estimate whose two-sided p against ratio 1 is exactly p."""
    return evidence.Estimate(sign * evidence.t_quantile(1 - p / 2, df), 1.0, df, 11)


def test_holm_steps_down_and_stops_at_the_first_undecided():
    claims = evidence.decide([("a", _est_with_p(0.01), 1.0, {}),
                              ("b", _est_with_p(0.02, -1), 1.0, {}),
                              ("c", _est_with_p(0.04), 1.0, {})])
    # 0.01<=.05/3, .02<=.05/2, .04<=.05
    assert [c["status"] for c in claims] == ["holds", "does not hold", "holds"]
    assert [c["corrected"]["level"] for c in claims] == pytest.approx(
        [1 - 0.05 / 3, 1 - 0.05 / 2, 0.95])
    claims = evidence.decide([("a", _est_with_p(0.01), 1.0, {}), ("b", _est_with_p(0.03), 1.0, {}),
                              ("c", _est_with_p(0.04), 1.0, {})])
    # .03 > .05/2: stop there
    assert [c["status"] for c in claims] == ["holds", "undecided", "undecided"]
    assert [c["raw"]["status"] for c in claims] == ["holds"] * 3  # each alone at 95 %: all hold
    # the corrected interval excludes the threshold exactly when Holm decided the claim
    for c in claims:
        assert (c["lo"] > 1.0 or c["hi"] < 1.0) == (c["status"] != "undecided")
        assert c["lo"] <= c["raw"]["lo"] and c["hi"] >= c["raw"]["hi"]


def test_holm_keeps_the_family_wise_error_rate():
    """m = 8 claims whose true ratio is exactly the threshold: Holm decides any of them in <= 5 % of
    runs, while deciding each alone at 95 % errs in about 1 - 0.95^8 = 34 % of runs."""
    rng = np.random.default_rng(3)
    runs, any_corr, any_raw = 500, 0, 0
    for _ in range(runs):
        specs = [(str(i), evidence.paired_log_ratio(rng.poisson(20, 6), rng.poisson(20, 6)),
                  1.0, {})
                 for i in range(8)]
        claims = evidence.decide(specs)
        any_corr += any(c["status"] != "undecided" for c in claims)
        any_raw += any(c["raw"]["status"] != "undecided" for c in claims)
    assert any_corr / runs <= 0.05 + 0.022 and any_raw / runs > 0.2


def test_replicates_needed_by_hand():
    # per-replicate sd 0.5, effect log 2 = 0.693
    e = evidence.Estimate(math.log(2.0), 0.5 / math.sqrt(4), 3, 4)
    n = evidence.replicates_needed(e, 1.0)
    assert (evidence.t975(n - 1) * 0.5 / math.sqrt(n) < math.log(2.0)
            <= evidence.t975(n - 2) * 0.5 / math.sqrt(n - 1))
    assert evidence.replicates_needed(evidence.Estimate(0.0, 0.1, 3, 4), 1.0) is None


@pytest.mark.parametrize("lo,hi,direction,expect", [(-3.0, -1.0, "<", "holds"),
                                                    (1.0, 2.0, "<", "does not hold"),
                                                    (-1.0, 1.0, "<", "undecided"),
                                                    (1.0, 2.0, ">", "holds")])
def test_status_of_a_claim_below_a_threshold(lo, hi, direction, expect):
    assert evidence.status(lo, hi, 0.0, direction) == expect


def test_a_difference_claim_by_hand():
    """Δ = [-3, -5, -4] nats: mean -4, s.e. 1/sqrt(3), df 2; "Δ < 0" holds; the interval is not
    exponentiated."""
    e = evidence.mean_estimate([-3.0, -5.0, -4.0])
    assert (e.log, e.se, e.df, e.n, e.log_scale) == pytest.approx(
        (-4.0, 1 / math.sqrt(3), 2.0, 3, False))
    c = evidence.decide([("lowers M", e, 0.0, dict(direction="<"))])[0]
    h = 4.302653 / math.sqrt(3)
    assert (c["ratio"] == -4.0
            and (c["lo"], c["hi"]) == pytest.approx((-4.0 - h, -4.0 + h), rel=1e-6))
    assert c["status"] == "holds" and c["scale"] == "difference"


def test_student_t_refuses_zero_degrees_of_freedom():
    with pytest.raises(ValueError, match="df > 0"):
        evidence.t_cdf(1.0, 0)


def test_replicates_needed_uses_the_estimates_own_degrees_of_freedom():
    # a stratified estimate: 18 replicates but Welch df 12.6; at n = 18 its own interval must decide
    se, df, n = 0.2, 12.6, 18
    e = evidence.Estimate(math.log(1.45), se, df, n)
    own_half = evidence.t_quantile(0.975, df) * se
    need = evidence.replicates_needed(e, 1.0)
    if own_half >= math.log(1.45):  # undecided with its own interval: more replicates needed
        assert need > n
    assert (evidence.t_quantile(0.975, df / (n - 1) * (need - 1)) * se * math.sqrt(n / need)
            < math.log(1.45))
    before = need - 1
    assert (evidence.t_quantile(0.975, df / (n - 1) * (before - 1)) * se * math.sqrt(n / before)
            >= math.log(1.45))


@pytest.mark.parametrize("p", [0.0, 1.0, 1.5, -0.2])
def test_a_quantile_outside_the_open_unit_interval_is_refused(p):
    with pytest.raises(ValueError, match="0 < p < 1"):
        evidence.t_quantile(p, 5)


def test_p_value_against_the_t_distribution_by_hand():
    e = evidence.Estimate(math.log(2.0), 0.2, 10.0, 11)
    d = math.log(2.0) - math.log(1.5)
    assert e.p_value(1.5) == pytest.approx(2 * (1 - evidence.t_cdf(d / 0.2, 10.0)), rel=1e-12)
    diff = evidence.Estimate(-3.0, 1.0, 5.0, 6, log_scale=False)
    assert diff.p_value(0.0) == pytest.approx(2 * (1 - evidence.t_cdf(3.0, 5.0)), rel=1e-12)
    assert diff.p_value(-3.0) == pytest.approx(1.0)
    assert evidence.Estimate(0.3, None, None, 1).p_value(1.0) == 1.0
    assert evidence.Estimate(0.3, 0.0, 4.0, 5).p_value(1.0) == 0.0
    assert evidence.Estimate(0.0, 0.0, 4.0, 5).p_value(1.0) == 1.0


@pytest.mark.parametrize("x,df", [(0.7, 3.0), (-1.3, 12.6), (0.0, 1.0)])
def test_t_pdf_is_the_derivative_of_t_cdf(x, df):
    h = 1e-5
    numeric = (evidence.t_cdf(x + h, df) - evidence.t_cdf(x - h, df)) / (2 * h)
    assert evidence.t_pdf(x, df) == pytest.approx(numeric, rel=1e-6)


def test_zero_spread_estimates_keep_their_degrees_of_freedom():
    s = evidence._stratified([np.full(3, 2.0), np.full(4, 2.0)])
    assert (s.se, s.df, s.n) == (0.0, 5.0, 7)
    u = evidence.unpaired_log_ratio([2.0, 2.0, 2.0], [1.0, 1.0])
    # (a+1)/(b+1)
    assert u.log == pytest.approx(math.log(3.0 / 2.0)) and (u.se, u.df, u.n) == (0.0, 3.0, 5)
    w = evidence.unpaired_log_ratio([1.0, 3.0, 2.0], [1.0, 2.0])
    assert w.n == 5


def test_replicates_needed_measures_the_distance_to_its_own_threshold():
    e = evidence.Estimate(math.log(2.0), 0.5 / math.sqrt(4), 3, 4)
    n = evidence.replicates_needed(e, 1.5)
    d = math.log(2.0) - math.log(1.5)
    assert (evidence.t975(n - 1) * 0.5 / math.sqrt(n) < d
            <= evidence.t975(n - 2) * 0.5 / math.sqrt(n - 1))


def _needed_by_search(e, threshold, cap=1000):
    """replicates_needed by plain search over n = 2..cap (the definition, no bisection)."""
    d = abs(e.log - (math.log(threshold) if e.log_scale else threshold))
    per = e.df / (e.n - 1) if e.df is not None else 1.0
    sd = e.se * math.sqrt(e.n)
    for n in range(2, cap + 1):
        if evidence.t_quantile(0.975, per * (n - 1)) * sd / math.sqrt(n) < d:
            return n
    return None


@pytest.mark.parametrize("e,threshold", [
    (evidence.Estimate(math.log(1.3), 0.15, None, 6), 1.0),  # no df recorded: n - 1
    (evidence.Estimate(math.log(1.8), 0.3, 8.5, 12), 1.5),  # a Welch df below n - 1
    (evidence.Estimate(math.log(50.0), 0.1, 5.0, 6), 1.0),  # decided already at 2 replicates
    (evidence.Estimate(-2.0, 1.5, 4.0, 5, log_scale=False), 0.0),  # a difference
    (evidence.Estimate(math.log(1.02), 0.5, 5.0, 6), 1.0),  # beyond the cap: None
    (evidence.Estimate(math.log(3.0), 0.2, 0.6, 2), 1.0),  # two replicates, a Welch df below 1
])
def test_replicates_needed_equals_a_plain_search(e, threshold):
    assert evidence.replicates_needed(e, threshold) == _needed_by_search(e, threshold)


def test_replicates_needed_of_a_zero_spread_estimate_is_its_own_count():
    assert evidence.replicates_needed(evidence.Estimate(math.log(2.0), 0.0, 5.0, 6), 1.0) == 6
    assert evidence.replicates_needed(evidence.Estimate(math.log(2.0), None, None, 1), 1.0) is None


def test_holm_records_each_claims_rank_by_p_value():
    claims = evidence.decide([("a", _est_with_p(0.04), 1.0, {}), ("b", _est_with_p(0.01), 1.0, {}),
                              ("c", _est_with_p(0.02), 1.0, {})])
    assert [(c["corrected"]["rank"], c["corrected"]["m"]) for c in claims] == [(3, 3), (1, 3),
                                                                              (2, 3)]


def test_one_replicate_has_an_estimate_but_no_interval():
    e = evidence.mean_estimate([3.0])
    assert (e.log, e.se, e.df, e.n) == (3.0, None, None, 1)
    assert e.interval() == (None, None)
    two = evidence.mean_estimate([1.0, 3.0])  # sd sqrt(2), s.e. 1, df 1
    assert (two.log, two.se, two.df, two.n) == pytest.approx((2.0, 1.0, 1.0, 2))
    with pytest.raises(ValueError, match="at least one replicate"):
        evidence.mean_estimate([])


@pytest.mark.parametrize("lo,hi,expect", [(0.5, 1.0, "undecided"), (1.0, 1.5, "undecided"),
                                          (0.5, 0.99, "does not hold"), (1.01, 1.5, "holds")])
def test_an_interval_touching_the_threshold_is_undecided(lo, hi, expect):
    assert evidence.status(lo, hi, 1.0) == expect
