"""The claim family of evidence.py against hand-computed verdicts: every paper claim on both
metrics (hits = AMS x N_G / 100, distinct = UMS x N_G / 100), any and high band, > 1 and > 1.5;
pooled over sizes as the mean of the per-size paired log-ratios; the controls, the weak arm, the
sizes and SIDE Definition 1 in the same Holm family; and the README's tables as report.py prints
them."""
import math
import os

import numpy as np
import pytest

import evidence
import report


def _row(n, method, r, hits, distinct, arm="table", high=None):
    high = high if high is not None else (hits // 2, distinct // 2)
    return dict(n_train=n, method=method, arm=arm, replicate=r, hits_any=hits,
                distinct_any=distinct, hits={"low": hits - high[0], "high": high[0]},
                distinct={"low": distinct - high[1], "high": high[1]})


def _table():
    rows = []
    for n, base in ((32, [10, 11, 12]), (128, [2, 3, 2])):
        for r, b in enumerate(base):
            rows += [_row(n, "uncond", r, b, b), _row(n, "side", r, 2 * b + 1, 2 * b + 1),
                     _row(n, "cond", r, b, b), _row(n, "side_random", r, b, b),
                     _row(n, "uncond_budget", r, b, b + 1)]
    return rows


def test_every_paper_claim_is_made_on_both_metrics_and_both_thresholds():
    specs = evidence.family(_table(), [], [32, 128])
    paper = [s for s in specs if s[3]["group"] == "paper"]
    keys = {(s[3]["baseline"], s[3]["metric"], s[3]["band"], s[2]) for s in paper}
    assert keys == {(b, m, band, t) for b in ("uncond", "cond") for m in ("hits", "distinct")
                    for band in ("any", "high") for t in (1.0, 1.5)}


def test_a_pooled_ratio_is_the_mean_of_the_per_size_means():
    specs = {s[0]: s for s in evidence.family(_table(), [], [32, 128])}
    est = specs["SIDE more than Carlini UnCond: hit rate (AMS), any band"][1]
    n32 = np.log([2.0, 2.0, 2.0])  # (2b + 1 + 1) / (b + 1) = 2 at every replicate of both sizes
    assert (est.log == pytest.approx(math.log(2.0)) and est.se == pytest.approx(0, abs=1e-12)
            and est.n == 6)
    assert n32.mean() == pytest.approx(est.log)
    high = specs["SIDE more than Carlini UnCond: hit rate (AMS), high band"][1]
    by_size = [np.log([(2 * b + 1) // 2 + 1 for b in base]) - np.log([b // 2 + 1 for b in base])
               for base in ([10, 11, 12], [2, 3, 2])]
    assert high.log == pytest.approx(np.mean([g.mean() for g in by_size]))
    se = math.sqrt(sum(g.var(ddof=1) / len(g) for g in by_size)) / 2
    assert high.se == pytest.approx(se)


def test_the_family_is_decided_together_and_keeps_both_intervals():
    rows = _table() + [_row(32, "side", r, 9, 9, arm="weak") for r in range(3)] \
        + [_row(32, m, r, 1, 1, arm="weak") for m in ("uncond", "cond") for r in range(3)]
    cond = [dict(labelling="informative", delta=dict(per_replicate=[-15.0, -12.0, -18.0])),
            dict(labelling="permuted", delta=dict(per_replicate=[-14.0, -13.0, -15.0]))]
    v = evidence.verdict(rows, {}, cond, [32, 128], weak_size=32)
    cs = v["claims"]
    assert v["family"]["size"] == len(cs) and len({c["corrected"]["m"] for c in cs}) == 1
    ranks = sorted(c["corrected"]["rank"] for c in cs)
    assert ranks == list(range(1, len(cs) + 1))
    weak = [c for c in cs if c["group"] == "weak"]
    # (9 + 1) / (1 + 1)
    assert len(weak) == 4 and all(c["ratio"] == pytest.approx(5.0) for c in weak)
    d = next(c for c in cs if c["group"] == "conditional")
    assert (d["direction"] == "<" and d["ratio"] == pytest.approx(-15.0)
            and d["scale"] == "difference")
    diff = next(c for c in cs if c["claim"].startswith("informative labels lower it more"))
    # mean of (-1, 1, -3), paired
    assert diff["ratio"] == pytest.approx(-1.0) and diff["replicates"] == 3
    for c in cs:
        assert c["corrected"]["lo"] is None or c["corrected"]["lo"] <= c["raw"]["lo"] + 1e-12
    sizes = next(c for c in cs
                 if c["claim"].startswith("smaller sets leak more: UnCond's hit rate"))
    # unpaired: mean(a + 1) / mean(b + 1)
    assert sizes["ratio"] == pytest.approx((11 + 1) / (7 / 3 + 1))


def test_descriptive_lines_carry_intervals_and_the_ums_ceiling():
    d = evidence.descriptive(_table(), {}, [32, 128])
    ceiling = next(x for x in d if x["kind"] == "ceiling" and x["n"] == 32)
    # (32 + 1) / (11 + 1)
    assert ceiling["mean"] == pytest.approx(11.0) and "cannot exceed 2.75" in ceiling["text"]
    assert ceiling["share"] == pytest.approx(11.0 / 32) and "(34 %)" in ceiling["text"]
    per = [x for x in d if x["kind"] == "per size"]
    assert len(per) == 4 and all("status" not in x for x in per)


def test_shared_seeds_are_refused():
    plan = [dict(name="a", seeds=dict(data=1, train=2)),
            dict(name="b", seeds=dict(data=3, train=2))]
    with pytest.raises(ValueError, match="shared by a and b"):
        evidence.check_independent(plan)


def test_a_cond_tuned_to_scale_zero_is_not_tested_twice():
    full = evidence.family(_table(), [], [32, 128])
    once = evidence.family(_table(), [], [32, 128], cond_is_uncond=True)
    assert len(full) - len(once) == 8 and not any(s[3].get("baseline") == "cond" for s in once)


def _summary(status, ratio, lo, hi, seed):
    c = {"claim": "SIDE more than UnCond", "status": status, "ratio": ratio, "scale": "ratio",
         "corrected": {"lo": lo, "hi": hi}}
    return {"data": "faces", "base_seed": seed, "verdict": {"claims": [c]}}


def test_compare_verdicts_counts_only_holds_against_does_not_hold_as_a_contradiction():
    same = report.compare_verdicts([_summary("holds", 1.6, 1.1, 2.3, 0),
                                    _summary("undecided", 1.3, 0.9, 1.8, 1)], ["s0", "s1"])
    assert "| SIDE more than UnCond | **holds** 1.60x [1.10, 2.30] | **undecided** 1.30x " \
           "[0.90, 1.80] |" in same
    assert same.endswith("contradicting verdicts between runs: 0.")
    clash = report.compare_verdicts([_summary("holds", 1.6, 1.1, 2.3, 0),
                                     _summary("does not hold", 0.5, 0.3, 0.9, 1)], ["s0", "s1"])
    assert clash.endswith("contradicting verdicts between runs: 1 (SIDE more than UnCond).")


def test_a_ratio_needs_two_replicates_and_something_found_by_either_method():
    one = [_row(32, "uncond", 0, 0, 0), _row(32, "side", 0, 3, 3)]
    assert evidence._ratio(one, "side", "uncond", "distinct", "any") is None  # one replicate
    none = one + [_row(32, "uncond", 1, 0, 0), _row(32, "side", 1, 0, 0)]
    none[1] = _row(32, "side", 0, 0, 0)
    assert evidence._ratio(none, "side", "uncond", "distinct", "any") is None  # nothing anywhere
    # SIDE finds nothing, UnCond finds 3 and 1: (0+1)/(3+1) and (0+1)/(1+1), geometric mean
    only_b = [_row(32, "uncond", 0, 3, 3), _row(32, "side", 0, 0, 0),
              _row(32, "uncond", 1, 1, 1), _row(32, "side", 1, 0, 0)]
    est = evidence._ratio(only_b, "side", "uncond", "distinct", "any")
    assert est.value() == pytest.approx(math.sqrt(1 / 4 * 1 / 2))
    two = [_row(32, "uncond", 0, 1, 1), _row(32, "side", 0, 3, 3),
           _row(32, "uncond", 1, 1, 1), _row(32, "side", 1, 3, 3)]
    assert evidence._ratio(two, "side", "uncond", "distinct", "any") is not None


def test_a_size_value_is_the_hits_or_the_percentage_of_the_training_set_reached():
    row = _row(16, "uncond", 0, hits=7, distinct=4)
    assert evidence._size_value(row, "hits") == 7
    assert evidence._size_value(row, "distinct") == pytest.approx(25.0)


def test_calibration_summary_gives_each_size_its_share_per_budget():
    rows = [dict(n_train=16, epochs=800, distinct_any=4, share_any=0.25),
            dict(n_train=32, epochs=800, distinct_any=8, share_any=0.25),
            dict(n_train=16, epochs=700, distinct_any=1, share_any=1 / 16)]
    t = report.calibration_summary(rows).splitlines()
    assert t[2] == "| 700 | 6 % (1) | – |" and t[3] == "| 800 | 25 % (4) | 25 % (8) |"


def test_table1_summary_puts_each_run_in_its_own_columns():
    st = {"distinct_any": {"mean": 4.0, "lo": 2.0, "hi": 6.0}, "ams_any": {"mean": 1.5, "lo": None}}
    a = {"stats": {"table": {"16/uncond": st}, "weak": {}}}
    b = {"stats": {"table": {"16/uncond": st, "16/side": st}, "weak": {"32/side": st}}}
    t = report.table1_summary([a, b], ["A", "B"]).splitlines()
    assert t[2] == "| 16 | Carlini UnCond | 4.0 [2.0, 6.0] | 1.5 | 4.0 [2.0, 6.0] | 1.5 |"
    assert t[3] == "| 16 | SIDE | – | – | 4.0 [2.0, 6.0] | 1.5 |"
    assert t[4].startswith("| 32, weak | SIDE | – | – |")


COMMITTED = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@pytest.mark.parametrize("argv", [
    ["--compare", "reports/faces-seed0/summary.json", "reports/faces-seed1/summary.json",
     "reports/fashion-mnist-seed0/summary.json"],
    ["--compare", "reports/faces-seed0/summary.json", "reports/fashion-mnist-seed0/summary.json",
     "--table1"],
    ["--calibration", "reports/calibrate-faces/calibration.json"],
    ["--calibration", "reports/calibrate-fashion-mnist/calibration.json"]])
def test_the_readme_tables_are_what_report_prints_from_the_committed_runs(argv, capsys):
    """The README quotes what `python report.py ...` prints from reports/ as one whole block of
    whole lines, with no table row of its own before or after it: a README number that no command
    prints, or a changed report.py, turns this red."""
    report.main([a if a.startswith("--") else os.path.join(COMMITTED, a) for a in argv])
    block = capsys.readouterr().out.strip()
    readme = open(os.path.join(COMMITTED, "README.md")).read()
    assert block.count("\n") >= 7 and "\n" + block + "\n" in readme
    i = readme.index("\n" + block + "\n")
    before, after = readme[:i].rsplit("\n", 1)[-1], readme[i + len(block) + 2:].split("\n", 1)[0]
    assert not before.startswith("|") and not after.startswith("|")


def test_report_refuses_a_missing_summary_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--compare", str(tmp_path / "none.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --compare: cannot read")
    assert err.count("\n") == 1
