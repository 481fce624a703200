"""reproduce.py: independent replicates (no shared seed, sample or initial weights), and `make
smoke`'s pipeline end to end (reproduce.py --profile smoke): the summary's structure and the
report."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import data
import ddpm
import evidence
import reproduce
from common import UserError

ROW_FIELDS = {"n_train", "method", "arm", "replicate", "n_gen", "ams", "ums", "hits", "hits_any",
              "distinct", "distinct_any", "p95", "carlini_extracted", "yoon_extracted"}


def _cfg(**kw):
    return reproduce.ReproduceConfig(**kw)


def test_replicates_share_no_seed_sample_or_initial_weights():
    cfg, p = _cfg(out="unused"), reproduce.PROFILES["cpu"]
    reps = reproduce.plan(cfg, p, labelled=True)
    assert len([r for r in reps if r["role"] == "table"]) == len(p["sizes"]) * p["replicates"]
    # every seed of every replicate is its own
    assert evidence.check_independent(reps) == 4 * len(reps)
    # another base seed: other seeds again
    other = reproduce.plan(_cfg(out="unused", seed=1), p, labelled=True)
    assert not ({s for r in reps for s in r["seeds"].values()}
                & {s for r in other for s in r["seeds"].values()})
    small = [r for r in reps if r["n"] == 16 and r["role"] == "table"]
    faces = [data.load_data("faces", 8, n=16, seed=r["seeds"]["data"]).images for r in small]
    flat = np.concatenate(faces).reshape(len(faces) * 16, -1)
    assert len(np.unique(flat, axis=0)) == len(flat)  # no training image in two replicates
    first = []
    for r in small:  # initial weights: train.py seeds the UNet with the replicate's training seed
        torch.manual_seed(r["seeds"]["train"])
        first.append(ddpm.UNet(image_size=8, base=32, mults=(1, 2),
                               attn_res=(4,)).inp.weight.detach().clone())
    assert all(not torch.equal(a, b) for i, a in enumerate(first) for b in first[i + 1:])


def test_labelled_models_pair_with_their_replicate_and_the_weak_arm_is_a_kept_checkpoint():
    cfg, p = _cfg(out="o"), reproduce.PROFILES["cpu"]
    reps = reproduce.plan(cfg, p, labelled=True)
    small, mid = min(p["sizes"]), sorted(p["sizes"])[1]
    for r in reps:
        assert bool(r["labelled"]) == (r["role"] == "table" and r["n"] == small)
        assert (r["weak"] is not None) == (r["role"] == "table" and r["n"] == mid)
    rep = next(r for r in reps if r["weak"])
    assert (rep["weak"] == reproduce.steps_of(p, mid, p["weak_epochs"])
            < reproduce.steps_of(p, mid, rep["epochs"]))
    args = reproduce.train_args(cfg, p, rep)
    assert f"--keep={rep['weak']}" in args and f"--seed={rep['seeds']['train']}" in args
    tune = next(r for r in reps if r["role"] == "tune")
    assert not set(tune["seeds"].values()) & {s for r in reps if r["role"] == "table"
                                              for s in r["seeds"].values()}


def test_train_jobs_group_models_of_one_shape(tmp_path):
    cfg, p = _cfg(out=str(tmp_path)), reproduce.PROFILES["smoke"]
    reps = reproduce.plan(cfg, p, labelled=True)
    jobs = reproduce.train_jobs(cfg, p, reps)
    members = {name: json.load(open(argv[1].split("=", 1)[1])) for name, argv in jobs}
    # + informative, permuted
    assert sum(len(m) for m in members.values()) == len(reps) + 2 * p["replicates"]
    for m in members.values():
        shapes = {tuple(a for a in argv if a.split("=")[0] in ("--n-train", "--batch", "--steps"))
                  for argv in m}
        assert len(shapes) == 1


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    reproduce.main(["--profile", "smoke", "--out", str(out)])
    return out


def test_summary_has_every_required_field(smoke):
    s, p = json.load(open(smoke / "summary.json")), reproduce.PROFILES["smoke"]
    assert s["total_seconds"] > 0 and s["device"] in ("cpu", "cuda")
    table = [r for r in s["rows"] if r["arm"] == "table"]
    sizes = sorted({r["n_train"] for r in table})
    assert sizes == sorted(p["sizes"])
    for r in s["rows"]:
        # distinct images of SIDE's synthetic set + guided generations
        if r["method"] == "side_union":
            side_ = next(q for q in table if q["method"] == "side"
                         and (q["n_train"], q["replicate"]) == (r["n_train"], r["replicate"]))
            assert (r["n_gen"] == p["n_syn"] + p["n_gen"]
                    and r["distinct_any"] >= side_["distinct_any"])  # a superset
            continue
        assert ROW_FIELDS <= set(r), r.keys()
        assert r["hits_any"] == sum(r["hits"].values()) and sum(r["ams"].values()) <= 100.0 + 1e-9
    for n in sizes:  # every method at every size, at the same N_G, once per replicate
        for m in ("uncond", "cond", "side", "side_random", "uncond_budget", "side_union"):
            reps = [r["replicate"] for r in table if r["n_train"] == n and r["method"] == m]
            assert sorted(reps) == list(range(p["replicates"])), (n, m)
        got = {r["method"]: r["n_gen"] for r in table if r["n_train"] == n}
        assert got["uncond"] == got["cond"] == got["side"] == p["n_gen"]
        assert got["uncond_budget"] == got["side"] + p["n_syn"]
    weak = [r for r in s["rows"] if r["arm"] == "weak"]
    assert ({r["method"] for r in weak} == {"uncond", "cond", "side"}
            and len(weak) == 3 * p["replicates"])
    v = s["verdict"]
    assert v["family"]["size"] == len(v["claims"]) and v["family"]["method"] == "Holm-Bonferroni"
    for c in v["claims"]:
        assert (c["status"] in ("holds", "does not hold", "undecided")
                and c["status"] == c["corrected"]["status"])
        assert {"lo", "hi", "status"} <= set(c["raw"]) and c["replicates"] >= 2
    assert [c["labelling"] for c in s["conditional"]] == ["none", "informative", "permuted"]
    # Δ in every replicate (its own data and models), then a t interval
    for c in s["conditional"][1:]:
        d, per = c["delta"], c["delta"]["per_replicate"]
        assert d["n_units"] == len(per) == p["replicates"] and len(set(per)) == len(per)
        # Student-t, by hand
        h = evidence.t975(len(per) - 1) * np.std(per, ddof=1) / np.sqrt(len(per))
        assert d["ci95"] == pytest.approx([np.mean(per) - h, np.mean(per) + h])
        assert sum(b["subsets"] for b in d["by_size"]) == sum(len(u["subsets"]) for u in d["units"])
    b = s["bands"]
    assert b["n"] == reproduce.BAND_REFERENCE and set(b["bands"]) == {"low", "mid", "high"}
    # every band closer than two distinct images
    assert max(hi for _, hi in b["bands"].values()) <= b["distinct_nn_min"]
    assert len(b["closest_training_pairs"]) == len(sizes) * p["replicates"]


def test_report_and_pictures_are_written(smoke):
    text = open(smoke / "REPORT.md").read()
    for heading in ("## Methods", "## Verdict", "## Table 1 in miniature", "Weakly memorized",
                    "## Extraction versus budget", "## Conditional memorization", "Theorem 1",
                    "## Stage times", "corrected interval"):
        assert heading in text
    for png in (["sweep_lambda.png", "sweep_cond_scale.png"]
                + [f"curve_n{n}.png" for n in reproduce.PROFILES["smoke"]["sizes"]]):
        assert os.path.getsize(smoke / png) > 0
    assert len(os.listdir(smoke / "grids")) >= 2 * 3


def test_a_rerun_reuses_every_stage(smoke):
    """Models, classifiers, features and generations are not recomputed: their files stay
    untouched."""
    def stamps():
        out = {}
        for root, _, files in os.walk(smoke):
            for f in files:
                p = os.path.join(root, f)
                if f.startswith("ckpt") or f"{os.sep}cache{os.sep}" in p:
                    out[p] = os.stat(p).st_mtime_ns
        return out
    p = reproduce.PROFILES["smoke"]
    before, first = stamps(), json.load(open(smoke / "summary.json"))
    # table, tuning, informative + permuted
    models = len(p["sizes"]) * p["replicates"] + 1 + 2 * p["replicates"]
    assert sum(os.path.basename(q) == "ckpt.pt" for q in before) == models
    assert sum(q.endswith(".npy") for q in before) > 10
    again = reproduce.main(["--profile", "smoke", "--out", str(smoke)])
    assert stamps() == before
    assert ([r.get("ams", r["distinct_any"]) for r in again["rows"]]
            == [r.get("ams", r["distinct_any"]) for r in first["rows"]])


def test_train_flags_are_checked_by_train_py_itself_before_any_work(tmp_path):
    """reproduce.py does not import the trainer: train.py --dry-run checks a job's flags and writes
    nothing."""
    out = tmp_path / "m"
    with pytest.raises(UserError, match=r"^train\.py --base 12 must be a positive multiple of 8"):
        reproduce.check_train_flags(["--base", "12", "--out", str(out)])
    reproduce.check_train_flags(["--out", str(out)])  # a valid job passes
    assert not out.exists()


def test_a_profile_needs_replicates_and_matching_epochs():
    with pytest.raises(UserError, match="one value per size"):
        reproduce.profile_of(dataclasses.replace(_cfg(), sizes=(8, 16), epochs=(10.0,)))


def test_calibrate_samples_each_budget_from_its_kept_checkpoint_and_reruns_safely(tmp_path):
    """`make calibrate` at toy size: every (size, budget) of the profile sampled once from the
    checkpoint kept at that budget's step, shares that are the distinct count over the training-set
    size; a rerun recomputes nothing, and a rerun with another seed is refused, not mixed in."""
    out = str(tmp_path / "cal")
    reproduce.main(["--profile", "smoke", "--calibrate", "--out", out])
    p = reproduce.PROFILES["smoke"]
    cal = json.load(open(os.path.join(out, "calibration.json")))
    assert [(r["n_train"], r["epochs"]) for r in cal["rows"]] == [
        (n, e) for e in p["calib_epochs"] for n in p["sizes"]]
    for r in cal["rows"]:
        assert 0 <= r["distinct_any"] <= r["n_train"] and r["n_gen"] == p["n_gen"]
        assert r["share_any"] == pytest.approx(r["distinct_any"] / r["n_train"])
        assert max(r["share"].values()) <= r["share_any"] + 1e-12
        steps = reproduce.steps_of(p, r["n_train"], r["epochs"])
        run = os.path.join(out, "extract", f"n{r['n_train']}-e{r['epochs']:g}")
        ckpt = json.load(open(os.path.join(run, "metrics.json")))["config"]["ckpt"]
        assert ckpt.endswith(os.path.join(f"n{r['n_train']}", f"ckpt-{steps}.pt"))
        assert os.path.exists(ckpt)
    md = open(os.path.join(out, "CALIBRATION.md")).read()
    assert md.count("\n| ") == 1 + len(cal["rows"])  # the header row and one row per budget
    before = os.path.getmtime(os.path.join(out, "calibration.json"))
    reproduce.main(["--profile", "smoke", "--calibrate", "--out", out])
    assert json.load(open(os.path.join(out, "calibration.json")))["rows"] == cal["rows"]
    assert os.path.getmtime(os.path.join(out, "models", "n8", "ckpt.pt")) < before
    with pytest.raises(UserError, match="different config"):
        reproduce.main(["--profile", "smoke", "--calibrate", "--out", out, "--seed", "7"])
    assert json.load(open(os.path.join(out, "calibration.json")))["rows"] == cal["rows"]
