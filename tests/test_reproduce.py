"""`make smoke`'s pipeline end to end (reproduce.py --profile smoke): the report's structure."""
import json
import os

import numpy as np
import pytest

import evidence
import reproduce
from common import UserError

ROW_FIELDS = {"n_train", "method", "n_gen", "ams", "ums", "p95", "carlini_extracted", "yoon_extracted"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    reproduce.main(["--profile", "smoke", "--out", str(out)])
    return out


def test_summary_has_every_required_field(smoke):
    s, p = json.load(open(smoke / "summary.json")), reproduce.PROFILES["smoke"]
    assert s["total_seconds"] > 0 and s["device"] in ("cpu", "cuda")
    table = [r for r in s["rows"] if "labelling" not in r]
    sizes = sorted({r["n_train"] for r in table})
    assert sizes == sorted(p["sizes"])
    bands = None
    for r in s["rows"]:
        if r["method"] == "side_union":  # distinct images of SIDE's synthetic set + guided generations
            side_ = next(q for q in s["rows"] if q["method"] == "side" and "labelling" not in q
                         and (q["n_train"], q["train_seed"], q["unit"]) == (r["n_train"], r["train_seed"], r["unit"]))
            assert r["n_gen"] == p["n_syn"] + p["n_gen"] and r["distinct_any"] >= side_["distinct_any"]  # a superset
            continue
        assert ROW_FIELDS <= set(r), r.keys()
        assert set(r["ams"]) == set(r["ums"])
        bands = bands or set(r["ams"])
        assert set(r["ams"]) == bands  # the same band names in every row
        assert all(0.0 <= v <= 100.0 for v in r["ams"].values())
        assert sum(r["ams"].values()) <= 100.0 + 1e-9  # bands are disjoint
    tune = sizes[len(sizes) // 2]
    for n in sizes:  # every method at every size, at the same N_G, once per unit
        for m in ("uncond", "cond", "side", "side_random", "uncond_budget", "side_union"):
            units = [(r["train_seed"], r["unit"]) for r in table if r["n_train"] == n and r["method"] == m]
            assert len(set(units)) == len(units) == p["seeds"], (n, m)
            assert m == "side_union" or s["stats"]["table"][f"{n}/{m}"]["distinct_any"]["n"] == len(units)
        got = {r["method"]: r["n_gen"] for r in table if r["n_train"] == n}
        assert got["uncond"] == got["cond"] == got["side"] == p["n_gen"]
        assert got["uncond_budget"] == got["side"] + p["n_syn"]
        for m in ("uncond_budget", "cond", "side", "side_union"):  # curves with intervals at shared budgets
            c = s["stats"]["curves"][f"{n}/{m}"]
            assert c and all(q["lo"] <= q["mean"] <= q["hi"] for q in c)
            assert min(q["budget"] for q in c) >= (p["n_syn"] if m == "side" else 1)
    assert len([r for r in s["rows"] if r["method"] == "cond_ddpm"]) == p["seeds"]
    claims = [v for v in s["verdict"] if "status" in v]
    assert claims and all(v["status"] in ("holds", "does not hold", "undecided") for v in claims)
    assert all({"claim", "ratio", "lo", "hi"} <= set(v) for v in claims)
    labellings = [c["labelling"] for c in s["conditional"]]
    assert labellings == ["none", "informative", "random"]
    for c in s["conditional"][1:]:  # Δ in every unit (its own data and models), then a t interval over units
        d, per = c["delta"], [u["delta"] for u in c["delta"]["units"]]
        assert d["n_units"] == len(per) == p["seeds"] and len(set(per)) == len(per)
        assert d["delta"] == pytest.approx(np.mean(per))
        h = evidence.t975(len(per) - 1) * np.std(per, ddof=1) / np.sqrt(len(per))  # Student-t, by hand
        assert d["ci95"] == pytest.approx([np.mean(per) - h, np.mean(per) + h])


def test_report_and_pictures_are_written(smoke):
    text = open(smoke / "REPORT.md").read()
    for heading in ("## Verdict", "## Table 1 in miniature", "## Extraction versus budget", "## Conditional memorization",
                    "Theorem 1", "## Stage times"):
        assert heading in text
    for png in ["sweep_lambda.png", "sweep_cond_scale.png"] + [f"curve_n{n}.png" for n in reproduce.PROFILES["smoke"]["sizes"]]:
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
    assert sum("ckpt.pt" in p for p in before) == 4 * reproduce.PROFILES["smoke"]["seeds"] and sum(p.endswith(".npy") for p in before) > 10
    again = reproduce.main(["--profile", "smoke", "--out", str(smoke)])
    assert stamps() == before
    assert [r.get("ams", r["distinct_any"]) for r in again["rows"]] == [r.get("ams", r["distinct_any"]) for r in first["rows"]]


def test_train_flags_are_checked_by_train_py_itself_before_any_work(tmp_path):
    """reproduce.py does not import the trainer: train.py --dry-run checks a job's flags and writes nothing."""
    out = tmp_path / "m"
    with pytest.raises(UserError, match=r"^train\.py --base 12 must be a positive multiple of 8"):
        reproduce.check_train_flags(["train.py", "--base", "12", "--out", str(out)])
    reproduce.check_train_flags(["train.py", "--out", str(out)])  # a valid job passes
    assert not out.exists()
