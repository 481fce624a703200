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
        assert ROW_FIELDS <= set(c) and c["divergence"]["stderr"] >= 0
        assert c["divergence"]["upper_bound"] is True


def test_report_and_pictures_are_written(smoke):
    text = open(smoke / "REPORT.md").read()
    for heading in ("## Verdict", "## Table 1 in miniature", "## Conditional memorization", "Theorem 1", "## Stage times"):
        assert heading in text
    for png in ("sweep_lambda.png", "sweep_K.png"):
        assert os.path.getsize(smoke / png) > 0
    assert len(os.listdir(smoke / "grids")) >= 2 * 3


def test_a_rerun_reuses_every_stage(smoke):
    before = json.load(open(smoke / "summary.json"))
    again = reproduce.main(["--profile", "smoke", "--out", str(smoke)])
    assert again["total_seconds"] < 0.5 * before["total_seconds"]  # models, classifiers, generations cached
    assert [r["ams"] for r in again["rows"]] == [r["ams"] for r in before["rows"]]
