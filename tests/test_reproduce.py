"""`make smoke`'s pipeline end to end (reproduce.py --profile smoke): the report's structure."""
import json
import os

import pytest

import reproduce

ROW_FIELDS = {"n_train", "method", "n_gen", "ams", "ums", "p95", "carlini_extracted", "yoon_extracted"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    reproduce.main(["--profile", "smoke", "--out", str(out)])
    return out


def test_summary_has_every_required_field(smoke):
    s = json.load(open(smoke / "summary.json"))
    assert s["total_seconds"] > 0 and s["device"] in ("cpu", "cuda")
    sizes = sorted({r["n_train"] for r in s["rows"]})
    assert sizes == sorted(reproduce.PROFILES["smoke"]["sizes"])
    bands = None
    for r in s["rows"]:
        assert ROW_FIELDS <= set(r), r.keys()
        assert set(r["ams"]) == set(r["ums"])
        bands = bands or set(r["ams"])
        assert set(r["ams"]) == bands  # the same band names in every row
        assert all(0.0 <= v <= 100.0 for v in r["ams"].values())
        assert sum(r["ams"].values()) <= 100.0 + 1e-9  # bands are disjoint
    for n in sizes:  # every method at every size, at the same N_G
        got = {r["method"]: r["n_gen"] for r in s["rows"] if r["n_train"] == n}
        assert {"uncond", "cond", "side"} <= set(got)
        assert got["uncond"] == got["cond"] == got["side"]
        assert got["uncond_budget"] == got["side"] + reproduce.PROFILES["smoke"]["n_syn"]
    labellings = [c["labelling"] for c in s["conditional"]]
    assert labellings == ["none", "informative", "random"]
    for c in s["conditional"]:
        assert ROW_FIELDS <= set(c)  # (no `stderr >= 0` / `upper_bound is True`: they could not fail)


def test_report_and_pictures_are_written(smoke):
    text = open(smoke / "REPORT.md").read()
    for heading in ("## Verdict", "## Table 1 in miniature", "## Conditional memorization", "Theorem 1", "## Stage times"):
        assert heading in text
    for png in ("sweep_lambda.png", "sweep_K.png"):
        assert os.path.getsize(smoke / png) > 0
    assert len(os.listdir(smoke / "grids")) >= 2 * 3


def test_a_rerun_reuses_every_stage(smoke):
    """Models, classifiers, features and generations are not recomputed: their files stay untouched."""
    def stamps():
        out = {}
        for root, _, files in os.walk(smoke):
            for f in files:
                p = os.path.join(root, f)
                if f == "ckpt.pt" or f"{os.sep}cache{os.sep}" in p:
                    out[p] = os.stat(p).st_mtime_ns
        return out
    before, first = stamps(), json.load(open(smoke / "summary.json"))
    assert sum("ckpt.pt" in p for p in before) == 4 and sum(p.endswith(".npy") for p in before) > 10
    again = reproduce.main(["--profile", "smoke", "--out", str(smoke)])
    assert stamps() == before
    assert [r["ams"] for r in again["rows"]] == [r["ams"] for r in first["rows"]]


def _row(n, method, distinct, ams):
    return dict(n_train=n, method=method, n_gen=100, distinct_any=distinct, ams_any=ams)


def test_verdict_is_computed_from_the_numbers():
    import report
    rows = [_row(16, "uncond", 5, 10.0), _row(16, "cond", 4, 10.0), _row(16, "side", 10, 30.0),
            _row(32, "uncond", 2, 4.0), _row(32, "cond", 0, 0.0), _row(32, "side", 3, 4.0),
            _row(16, "uncond_budget", 12, 9.0), _row(16, "side_random", 5, 11.0)]
    text = report.verdict(rows)
    assert "SIDE / Carlini UnCond, distinct images (UMS), mean over the sizes where Carlini UnCond extracted any: 1.75x (meets" in text
    assert "SIDE / Carlini Cond, distinct images (UMS), mean over the sizes where Carlini Cond extracted any: 2.50x" in text
    assert "SIDE / Carlini UnCond, hit rate (AMS), mean over the sizes where Carlini UnCond extracted any: 2.00x" in text
    assert "reaches 12 distinct images vs SIDE's 10 (SIDE not ahead)" in text
    assert "informative clusters help" in text
    assert "10.0%, 4.0%): yes" in text
    flat = [_row(16, "uncond", 0, 0.0), _row(16, "cond", 0, 0.0), _row(16, "side", 0, 0.0)]
    assert "no method extracted anything" in report.verdict(flat)
