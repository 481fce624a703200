"""evidence.py against independent references: the Student-t distribution integrated numerically,
hand-computed intervals, coverage by simulation, and hand-built verdicts."""
import math

import numpy as np
import pytest

import evidence
import reproduce


def t_cdf(x, df, n=200001):
    """P(T <= x) for Student's t by the trapezoid rule on its density (independent of the table)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    u = np.linspace(0.0, x, n)
    pdf = c * (1 + u ** 2 / df) ** (-(df + 1) / 2)
    return 0.5 + float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(u)))


@pytest.mark.parametrize("df,tol", [(1, 2e-4), (2, 2e-4), (3, 2e-4), (5, 2e-4), (10, 2e-4), (20, 2e-4), (30, 2e-4),
                                    (200, 1e-3)])  # beyond the table: the normal quantile, 7e-4 off at df 200
def test_t_quantiles_are_the_975_points_of_student_t(df, tol):
    assert t_cdf(evidence.t975(df), df) == pytest.approx(0.975, abs=tol)


def test_mean_interval_by_hand():
    m, lo, hi = evidence.mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: half-width t_{.975,2} / sqrt(3)
    assert m == 2.0 and hi - m == pytest.approx(4.303 / math.sqrt(3)) and m - lo == pytest.approx(4.303 / math.sqrt(3))
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
    h = 4.303 * logs.std(ddof=1) / math.sqrt(3)
    r, lo, hi = evidence.paired_ratio(a, b)
    assert r == pytest.approx(2.0) and lo == pytest.approx(math.exp(logs.mean() - h))
    assert hi == pytest.approx(math.exp(logs.mean() + h))


def test_unpaired_ratio_covers_the_true_ratio():
    rng = np.random.default_rng(1)
    reps, hit = 2000, 0
    for _ in range(reps):  # Poisson counts with means 30 and 15: (30 + 1) / (15 + 1)
        _, lo, hi = evidence.unpaired_ratio(rng.poisson(30, 8), rng.poisson(15, 8))
        hit += lo <= 31 / 16 <= hi
    assert 0.93 <= hit / reps <= 0.97


@pytest.mark.parametrize("lo,hi,expect", [(1.1, 2.0, "holds"), (0.5, 0.9, "does not hold"), (0.9, 1.2, "undecided"),
                                          (None, None, "undecided"), (1.0, 1.3, "undecided")])
def test_status_of_an_interval(lo, hi, expect):
    assert evidence.status(lo, hi, 1.0) == expect


def test_curve_summary_and_overtaking_by_hand():
    c1 = [dict(budget=b, distinct_any=v, distinct={"high": v}) for b, v in ((10, 1), (20, 2), (30, 3))]
    c2 = [dict(budget=b, distinct_any=v, distinct={"high": v}) for b, v in ((10, 3), (20, 4), (30, 5))]
    s = evidence.curve_summary([c1, c2])
    assert [p["mean"] for p in s] == [2.0, 3.0, 4.0] and s[0]["hi"] - 2.0 == pytest.approx(12.706 * 1.0 / 1.0)
    assert s[0]["lo"] == 0.0  # 2 - 12.7 clipped: a count is never negative
    flat = [dict(budget=b, mean=m) for b, m in ((10, 2.5), (20, 2.5), (30, 2.5))]
    assert evidence.overtake(s, flat) == 20 and evidence.overtake(flat, s) is None


def _rows(n, method, values, **kw):
    return [dict(n_train=n, method=method, train_seed=0, unit=i, distinct_any=v, hits_any=2 * v, **kw)
            for i, v in enumerate(values)]


def test_verdict_claims_are_computed_from_the_numbers():
    table = (_rows(32, "uncond", [10, 11, 12]) + _rows(32, "side", [21, 23, 25])
             + _rows(128, "uncond", [2, 3, 2]) + _rows(128, "side", [1, 2, 1]) + _rows(32, "side_random", [21, 23, 25]))
    v = {c["claim"].split(":")[0]: c for c in reproduce.verdict_claims(table, {}, [32, 128])}
    n32 = v["n=32"]
    assert n32["status"] == "holds" and n32["ratio"] == pytest.approx(2.0)  # (2v+1+1)/(v+1) = 2
    assert v["n=128"]["status"] == "does not hold"  # (1+1)/(2+1), (2+1)/(3+1), 2/3: all below 1
    control = next(c for c in v.values() if "random surrogate" in c["claim"])
    assert control["ratio"] == pytest.approx(1.0) and control["status"] == "undecided"
    leak = next(c for c in v.values() if c["claim"].startswith("smaller sets"))
    assert leak["status"] == "holds" and leak["ratio"] == pytest.approx((22 + 1) / (14 / 3 + 1))


def test_unpaired_ratio_by_hand():
    """a + 1 = [2, 4], b + 1 = [1, 3, 5]: means 3 and 3; delta-method variances of the log means
    var/n/mean² = 2/2/9 and 4/3/9; Welch-Satterthwaite df = (va+vb)²/(va²/1 + vb²/2) = 2.88 -> 2."""
    va, vb = 2 / 2 / 9, 4 / 3 / 9
    df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)
    assert int(df) == 2
    h = 4.302653 * math.sqrt(va + vb)  # t_{0.975, 2}
    r, lo, hi = evidence.unpaired_ratio([1, 3], [0, 2, 4])
    assert (r, lo, hi) == pytest.approx((1.0, math.exp(-h), math.exp(h)), rel=5e-4)  # the t table has 3 decimals
    r, lo, hi = evidence.unpaired_ratio([5, 5], [1, 1, 1])  # no spread: a zero-width interval at 6/2
    assert r == lo == hi == pytest.approx(3.0)
    r, lo, hi = evidence.unpaired_ratio([0, 8], [4, 4, 4])  # all spread on one side: df = 1 exactly
    assert (lo, hi) == pytest.approx((math.exp(-12.706 * 0.8), math.exp(12.706 * 0.8)), rel=5e-4)  # va = 32/2/25
    for a, b in (([0, 2], [0, 2]), ([4, 4], [0, 2, 4])):  # equal spreads; spread on the other side only
        r, lo, hi = evidence.unpaired_ratio(a, b)
        assert lo < r < hi
    with pytest.raises(ValueError):
        evidence.unpaired_ratio([1, 2], [3])


def test_paired_ratio_of_one_unit_has_no_interval():
    assert evidence.paired_ratio([3], [1]) == (2.0, None, None)
    with pytest.raises(ValueError):
        evidence.paired_ratio([], [])


def test_a_tie_is_not_overtaking():
    a = [dict(budget=b, mean=m) for b, m in ((10, 1.0), (20, 3.0), (30, 2.0))]
    b = [dict(budget=b, mean=m) for b, m in ((10, 2.0), (20, 2.0), (30, 2.0))]
    assert evidence.overtake(a, b) is None  # equal at the last budget: not above
    assert evidence.overtake(a, [dict(p, mean=1.5) if p["budget"] == 30 else p for p in b]) == 20
