"""audit.py: repeats of one attack on one model, the leaked-image list, the extrapolation to larger
budgets.

  - seeds: repeat 0 is the single run's, no two repeats share a seed, each depends on
    (seed, syn_seed, r);
  - the extrapolation against hit processes with known per-image probabilities p_i: the closed form
    E[S(m)] = Σ_i 1 - (1 - p_i)^m (the paper's expected-unique formula), the interval's coverage of
    what m generations actually reach, the cap at the training-set size, a heterogeneous population
    (where Chao's estimator is a lower bound), and a planted memorizer whose generations are draws
    from a known prior over training images;
  - the per-generation hits are exactly a brute-force search's, images within the band of several
    training images included;
  - end to end on the planted memorizer: leaked.csv against a brute-force search over every repeat's
    samples, the figures against each repeat's own metrics.json;
  - on a real train.py checkpoint: repeat 0 is the single run, bit for bit; an interrupted run
    resumes to the same audit; a rerun recomputes nothing; a repeat folder from other settings
    and --repeats 0 are refused with one line and exit 2; names of training images from a folder
    and an .npz.
"""
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import audit
import common
import data
import ddpm
import evidence
import extract
import metrics
import side
import train
from test_extract import (Memorizer, brute_force_distinct, counting_sampler, fail_if_called, mtimes,
                          run_cli)

TINY = ["--methods", "uncond,cond,side", "--n-gen", "16", "--batch", "8", "--n-syn", "16",
        "--K", "2", "--tau", "0", "--clf-steps", "5", "--clf-width", "8", "--sample-steps", "5",
        "--lam", "2", "--device", "cpu"]


# ============================================================================ seeds

def test_repeat_seeds_start_with_the_single_run_and_never_share_a_seed():
    s = audit.repeat_seeds(1, 12345, 40, avoid=(2,))
    flat = [v for pair in s for v in pair]
    assert s[0] == (1, 12345) and len(set(flat)) == len(flat) and 2 not in flat
    assert all(0 <= v < 2 ** 31 for v in flat)
    # R does not change the earlier repeats
    assert audit.repeat_seeds(1, 12345, 3, avoid=(2,)) == s[:3]
    assert audit.repeat_seeds(7, 12345, 2)[1] != s[1] and audit.repeat_seeds(1, 7, 2)[1] != s[1]
    # the first draws taken: the next ones of the sequence
    forced = audit.repeat_seeds(1, 12345, 2, avoid=s[1])
    assert not set(forced[1]) & set(s[1]) and len(set(forced[1]) | {1, 12345}) == 4


def test_repeat_configs_fix_the_chosen_settings_and_drop_the_sweeps():
    cfg = extract.ExtractConfig(repeats=3, sweep_lambda=(1.0, 3.0), lam=3.0)
    cfgs = audit.repeat_configs(cfg, "/o", dict(lam=10.0, K=4, cond_scale=None))
    assert cfgs[0] is cfg and [c.out for c in cfgs[1:]] == ["/o/repeat-1", "/o/repeat-2"]
    assert [(c.seed, c.syn_seed) for c in cfgs] == audit.repeat_seeds(1, 12345, 3,
                                                                      avoid=(cfg.sweep_seed,))
    assert all(c.lam == 10.0 and c.K == 4 and c.cond_scale == -1 and c.sweep_lambda == ()
               and c.repeats == 1 for c in cfgs[1:])


# ====================================================== the extrapolation, where the truth is known

def expected_reach(p, m):
    """The paper's expected-unique formula:
    E[distinct images reached by m generations] = Σ_i 1 - (1 - p_i)^m."""
    return float((1 - (1 - p) ** m).sum())


def simulate(p, T, factor, reps, seed, interval=False):
    """reps reference runs of T generations (each reaches image i with probability p_i), each
    extended to factor * T: (estimates, reached by the reference run, reached at factor * T,
    intervals)."""
    rng = np.random.default_rng(seed)
    est, s_obs, reached, iv = [], [], [], []
    for _ in range(reps):
        hits = rng.random((factor * T, len(p))) < p
        Y = hits[:T].sum(0)
        if interval:
            e, lo, hi = audit.extrapolate_interval(Y, T, len(p), [factor * T], rng, B=100)
            iv.append((lo[0], hi[0]))
        else:
            e = audit.extrapolate(Y, T, len(p), [factor * T])
        est.append(e[0])
        s_obs.append((Y > 0).sum())
        reached.append(hits.any(0).sum())
    return np.array(est), np.array(s_obs), np.array(reached), iv


def test_extrapolation_matches_the_expected_unique_formula_for_equal_hit_probabilities():
    p = np.full(200, 0.005)  # 200 training images, each reached by 0.5 % of the generations
    est, s_obs, reached, iv = simulate(p, 64, 8, 150, seed=0, interval=True)
    truth = expected_reach(p, 8 * 64)  # 184.6: the closed form at 8x
    assert abs(reached.mean() - truth) < 2  # the simulation is the process the formula describes
    # the estimate from 64 generations, within 10 % on average
    assert abs(est.mean() - truth) < 0.1 * truth
    # what 64 generations found: the unseen part is most of the answer
    assert s_obs.mean() < 0.35 * truth
    inside = np.mean([lo <= r <= hi for (lo, hi), r in zip(iv, reached)])
    assert inside >= 0.85, inside  # a 95 % prediction interval for what 8x the generations reach


def test_extrapolation_is_a_lower_bound_when_hit_probabilities_vary():
    """30 images at 2 %, 70 at 0.2 %, 100 never reached: Chao's estimator is a lower bound under
    heterogeneity (Chao 1987), yet far closer than the count already found, and never counts the
    unreachable."""
    p = np.r_[np.full(30, 0.02), np.full(70, 0.002), np.zeros(100)]
    for factor, T in ((8, 64), (100, 64)):
        est, s_obs, reached, _ = simulate(p, T, factor, 100, seed=1)
        truth = expected_reach(p, factor * T)
        assert s_obs.mean() < est.mean() <= truth * 1.02, (factor, est.mean(), truth)
        assert np.abs(est - reached).mean() < np.abs(s_obs - reached).mean()
        assert est.max() <= 200 and audit.extrapolate(np.r_[np.ones(50, int), np.zeros(150, int)],
                                                      T, 200, [math.inf])[0] == 200


def test_the_training_set_caps_the_estimate_and_nothing_new_means_no_more():
    # 10 singletons, no doubletons: Q̂0 = (T-1)/T * 45 > 3 left
    Y = np.r_[np.ones(10, int), np.zeros(3, int)]
    assert audit.extrapolate(Y, 20, 13, [math.inf])[0] == 13
    est, lo, hi = audit.extrapolate_interval(Y, 20, 13, [20, 200, math.inf],
                                             np.random.default_rng(0))
    assert (est[0] == 10 and (lo <= est).all() and (est <= hi).all() and hi.max() <= 13
            and lo.min() >= 10)
    # every image found 4 times: no singletons, Chao sees nothing unseen
    Y = np.r_[np.full(5, 4), np.zeros(5, int)]
    est, lo, hi = audit.extrapolate_interval(Y, 40, 10, [400, math.inf], np.random.default_rng(0))
    assert est.tolist() == [5, 5] and lo.tolist() == [5, 5]
    # no singleton: the unseen hit mass is at most -ln(0.025) / T (Poisson, k = 0)
    m0 = -math.log(audit.Z_TAIL) / 40
    # spread over the 5 unseen; total: all
    assert hi.tolist() == pytest.approx([5 + 5 * (1 - (1 - m0 / 5) ** 360), 10])
    s, q1, q0 = audit.unseen(np.r_[np.full(6, 1), np.full(3, 2), np.full(4, 7)], 10, 100)
    assert (s, q1) == (13, 6) and q0 == pytest.approx(0.9 * 36 / 6)  # Chao2 by hand


def test_poisson_upper_is_garwoods_limit():
    assert audit.poisson_upper(0) == pytest.approx(-math.log(0.025), rel=1e-9)  # P(X = 0) = e^-λ
    # Garwood's table, 97.5 %, k = 5
    assert audit.poisson_upper(5) == pytest.approx(11.668, abs=1e-3)
    for k in (1, 20, 300):
        lam = audit.poisson_upper(k)
        cdf = sum(math.exp(-lam + j * math.log(lam) - math.lgamma(j + 1)) for j in range(k + 1))
        assert cdf == pytest.approx(0.025, rel=1e-6)


@pytest.mark.parametrize("p,T", [
    (np.full(16, 0.002), 64),  # 16 images, a couple of hits in 64: too few to tell
    (np.r_[np.full(30, 0.02), np.full(70, 0.002), np.zeros(100)], 64),
    (1 / np.arange(1, 33) ** 2 / 1.61, 32)])  # Zipf: a few images take most hits
def test_the_spread_bound_holds_the_expected_reach_whatever_the_hit_probabilities(p, T):
    """Against the exact conditional expectation
    E[S(m) | first T] = S_obs + Σ_unseen 1 - (1 - p_i)^(m - T), computed here from the known p_i:
    the bound holds it in 97.5 % of runs (its one-sided level), at 8x and 100x."""
    rng, held, n = np.random.default_rng(3), [], len(p)
    for _ in range(200):
        Y = rng.binomial(1, np.broadcast_to(p, (T, n))).sum(0)
        budgets = [8 * T, 100 * T]
        exact = [(Y > 0).sum() + (1 - (1 - p[Y == 0]) ** (m - T)).sum() for m in budgets]
        held.append(np.all(audit.spread_bound(Y, T, n, budgets) >= np.array(exact) - 1e-9))
    assert np.mean(held) >= 0.975, np.mean(held)


PLANT_N, PLANT_PX, PLANT_REACHABLE, PLANT_T, PLANT_RUNS = 32, 8, 24, 16, 8


def test_the_planted_memorizer_reach_at_8x_is_predicted_from_its_first_generations():
    """A memorizer that returns one of 24 of its 32 training images, uniformly (the other 8 have
    prior ~0), sampled by the full ancestral chain, so generations are draws from a known prior: 24
    images are reachable and m generations reach E[S(m)] = 24 (1 - (23/24)^m) (the paper's
    expected-unique formula). In 8 disjoint runs of 128 generations, the estimate from each run's
    first 16 must predict what all 128 reach (and the closed form) far better than the 16 alone do,
    its interval must hold it, and the estimated total must be about 24, not the 32 training
    images."""
    ds = data.load_data("faces", PLANT_PX, n=PLANT_N, seed=0)
    diffusion = ddpm.Diffusion(100, "cosine", "eps")
    log_prior = np.where(np.arange(PLANT_N) < PLANT_REACHABLE, 0.0, -1e4)
    model = Memorizer(ds.images, diffusion, log_prior).eval()
    n_all = PLANT_RUNS * 8 * PLANT_T
    x = data.to_uint8(diffusion.sample(model, n_all, ddpm.sample_generators(0, range(n_all)),
                                       steps=100, sampler="ddpm"))
    g, j, _ = audit.incidence(x, ds.images, metrics.parse_bands(None, "l2"), "l2")
    # one image each, never the 8
    assert len(g) == n_all and len(np.unique(g)) == n_all and j.max() < PLANT_REACHABLE
    truth = expected_reach(np.full(PLANT_REACHABLE, 1 / PLANT_REACHABLE), 8 * PLANT_T)
    est, s_obs, reached, inside, total = [], [], [], 0, []
    for start in range(0, n_all, 8 * PLANT_T):
        Y = np.bincount(j[(g >= start) & (g < start + PLANT_T)], minlength=PLANT_N)
        e, lo, hi = audit.extrapolate_interval(Y, PLANT_T, PLANT_N, [8 * PLANT_T, math.inf],
                                               np.random.default_rng(0))
        est.append(e[0])
        s_obs.append((Y > 0).sum())
        reached.append(len(np.unique(j[(g >= start) & (g < start + 8 * PLANT_T)])))
        inside += lo[0] <= reached[-1] <= hi[0]
        total.append(e[1])
    est, s_obs, reached = map(np.array, (est, s_obs, reached))
    assert abs(est.mean() - truth) < 0.15 * truth and s_obs.mean() < 0.6 * truth
    assert np.abs(est - reached).mean() < 0.7 * np.abs(s_obs - reached).mean()
    assert inside >= PLANT_RUNS - 1, inside
    # 24 reachable, not the 32 images
    assert abs(np.mean(total) - PLANT_REACHABLE) < 0.25 * PLANT_REACHABLE


def test_incidence_is_a_brute_force_search_with_images_near_several_training_images(monkeypatch):
    monkeypatch.setattr(audit, "FIRST_K", 1)  # force the k-growing search
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    # 0 and 1 near
    train_x[1] = np.clip(train_x[0].astype(int) + rng.integers(-3, 4, train_x[0].shape), 0, 255)
    train_x[2] = np.clip(train_x[0].astype(int) + rng.integers(-3, 4, train_x[0].shape), 0, 255)
    noisy = lambda i, s: np.clip(  # noqa: E731
        train_x[i].astype(int) + rng.normal(0, s, train_x[i].shape), 0, 255).astype(np.uint8)
    gen = np.stack([noisy(0, 3), noisy(5, 2), noisy(5, 8), noisy(7, 12),
                    rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)])
    bands = metrics.parse_bands(None, "l2")
    g, j, v = audit.incidence(gen, train_x, bands, "l2")
    flat = lambda a: torch.from_numpy(  # noqa: E731  the [-1, 1] scale
        a.reshape(len(a), -1).astype(np.float64) / 127.5)
    d = (torch.cdist(flat(gen), flat(train_x)) / math.sqrt(8 * 8 * 3)).numpy()
    inside = np.any([metrics.in_band(d, lo, hi, "l2") for lo, hi in bands.values()], axis=0)
    assert sorted(zip(g.tolist(), j.tolist())) == sorted(zip(*np.nonzero(inside)))
    # one generation in the band of three training images
    assert {0, 1, 2} <= set(j[g == 0].tolist())
    np.testing.assert_allclose(v, d[g, j], rtol=1e-9)


def test_the_grid_takes_grey_images_too(tmp_path):
    grey = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    rows = [dict(index=1, best_value=0.05, repeats=2)]
    audit.leaked_grid(str(tmp_path / "g.png"), rows, grey, dict(image={1: grey[0]}), top=4, R=3)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    s = audit.GRID_PX // 8
    ys, xs = np.nonzero((img[..., 0] != 255))
    y0, x0 = ys.min(), xs.min()  # the first tile's corner
    # the training image, left
    np.testing.assert_array_equal(img[y0:y0 + 8 * s:s, x0:x0 + 8 * s:s, 0], grey[1, ..., 0])
    # its match
    np.testing.assert_array_equal(img[y0:y0 + 8 * s:s, x0 + 8 * s + 2:x0 + 16 * s + 2:s, 0],
                                  grey[0, ..., 0])
    audit.leaked_grid(str(tmp_path / "g.png"), [], grey, {}, top=4, R=3)
    assert not os.path.exists(tmp_path / "g.png")  # nothing leaked: no stale picture


# ================================================================ end to end: the planted memorizer

PLANTED = ["--methods", "uncond,side", "--n-gen", "32", "--batch", "32", "--n-syn", "64",
           "--K", "8", "--clf-steps", "150", "--clf-width", "8", "--sample-steps", "10",
           "--lam", "10", "--device", "cpu", "--repeats", "3"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """extract.run and audit.run_repeats on test_extract's planted memorizer (32 faces, Zipf prior):
    3 repeats."""
    ds = data.load_data("faces", 16, n=32, seed=0)
    tcfg = train.TrainConfig(n_train=32, image_size=16)
    diffusion = ddpm.Diffusion(tcfg.T, tcfg.schedule, tcfg.prediction)
    model = Memorizer(ds.images, diffusion, -2.0 * np.log(np.arange(1, 33))).eval()
    out = str(tmp_path_factory.mktemp("planted") / "audit")
    cfg = common.parse_config(extract.ExtractConfig,
                              ["--ckpt", "memorizer", "--out", out] + PLANTED, "")
    target = extract.Target(model, diffusion, ds, torch.device("cpu"), ident="memorizer")
    # no checkpoint to read the names of the training images from
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit, "training_names", lambda cfg, n: [f"face{i}.png" for i in range(n)])
        extract.run(cfg, target)
        a = audit.run_repeats(cfg, out, target, extract.Ranks(), extract.run,
                              extract.check_previous)
    return out, a, ds, cfg


def folders_of(out, R=3):
    return [out] + [os.path.join(out, f"repeat-{r}") for r in range(1, R)]


def test_leaked_images_are_what_a_brute_force_search_of_every_repeat_finds(planted):
    out, a, ds, _ = planted
    edge = max(hi for _, hi in a["bands"].values())  # the L2 bands tile [0, edge]
    flat = lambda x: torch.from_numpy(  # noqa: E731
        x.reshape(len(x), -1).astype(np.float64) / 127.5)
    found, best, hits = {}, np.full(32, np.inf), np.zeros(32, int)
    for r, folder in enumerate(folders_of(out)):
        with np.load(os.path.join(folder, "samples.npz")) as z:
            for m in ("uncond", "side"):
                diff = flat(z["images"][z["method"] == m])[:, None] - flat(ds.images)[None]
                # exact, even at a copy
                d = (diff.pow(2).sum(-1).sqrt() / math.sqrt(16 * 16 * 3)).numpy()
                within = d <= edge
                for j in np.flatnonzero(within.any(0)):
                    found.setdefault(int(j), set()).add((r, m))
                hits += within.sum(0)
                best = np.minimum(best, d.min(0))
    rows = a["leaked"]
    assert 0 < len(rows) < 32 and {r["index"] for r in rows} == set(found)
    for r in rows:
        j = r["index"]
        assert (r["repeats"] == len({rep for rep, _ in found[j]}) and r["attacks"] == len(found[j])
                and r["hits"] == hits[j])
        assert r["best_value"] == pytest.approx(best[j], abs=1e-9) and r["image"] == f"face{j}.png"
    keys = [(-r["repeats"], -r["attacks"], -r["hits"]) for r in rows]
    assert keys == sorted(keys) and [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    with open(os.path.join(out, "leaked.csv")) as fh:
        table = list(csv.DictReader(fh))
    assert [int(t["index"]) for t in table] == [r["index"] for r in rows]
    assert [float(t["best_value"]) for t in table] == pytest.approx([r["best_value"] for r in rows])
    assert json.load(open(os.path.join(out, "metrics.json")))["audit"]["leaked"] == rows
    with Image.open(os.path.join(out, "leaked.png")) as im:
        assert im.format == "PNG"


def test_the_figures_are_each_repeats_own_with_intervals_over_repeats(planted):
    out, a, _, cfg = planted
    recs = [json.load(open(os.path.join(f, "metrics.json"))) for f in folders_of(out)]
    seeds = [(r["config"]["seed"], r["config"]["syn_seed"]) for r in recs]
    assert seeds == audit.repeat_seeds(cfg.seed, cfg.syn_seed, 3, avoid=(cfg.sweep_seed,)) == [
        (r["seed"], r["syn_seed"]) for r in a["repeats"]]
    for m in ("uncond", "side"):
        per = dict(distinct_any=[r["methods"][m]["distinct_any"] for r in recs],
                   hit_rate_high=[r["methods"][m]["ams"]["high"] for r in recs])
        for f, values in per.items():
            s = a["stats"][m][f]
            assert (s["values"] == values
                    and (s["mean"], s["lo"], s["hi"]) == pytest.approx(evidence.count_ci(values)))
        at_ng = [e["estimate"][0] for e in a["extrapolation"]["per_repeat"][m]["any"]]
        # every generation's hits, united, are UMS's distinct images
        assert at_ng == per["distinct_any"]
    side_d, unc_d = ([r["methods"][m]["distinct_any"] for r in recs] for m in ("side", "uncond"))
    claim = next(v for v in a["verdict"] if "UnCond" in v["claim"] and "distinct" in v["claim"])
    assert claim["ratio"] == pytest.approx(
        math.exp(np.mean(np.log((np.array(side_d) + 1) / (np.array(unc_d) + 1)))))
    # one family: distinct and hits
    assert claim["corrected"]["m"] == 2 and claim["replicates"] == 3
    with np.load(os.path.join(out, "samples.npz")) as z0, \
            np.load(os.path.join(out, "repeat-1", "samples.npz")) as z1:
        # another synthetic set, classifier and noise
        assert not np.array_equal(z0["images"], z1["images"])


def test_the_built_in_check_counts_what_the_larger_run_reached(planted):
    out, a, ds, _ = planted
    edge = max(hi for _, hi in a["bands"].values())
    for m, checks in a["extrapolation"]["check"].items():
        assert [c["repeat"] for c in checks] == [0, 1, 2]
        for c, folder in zip(checks, folders_of(out)):
            with np.load(os.path.join(folder, "samples.npz")) as z:
                x = z["images"][z["method"] == m]
            assert (c["n_small"], c["n_large"]) == (32 // audit.CHECK, 32)
            assert c["reached"] == brute_force_distinct(x[:c["n_large"]], ds.images, edge)[0]
            assert c["lo"] <= c["estimate"] <= c["hi"]
    text = open(os.path.join(out, "AUDIT_REPORT.md")).read()
    for needle in ("## Verdict",
                   "measure the attack's own randomness on this model, "
                   "not model-to-model variation",
                   "## Leaked training images", "leaked.png",
                   "## How many a larger budget would reach", "**Check on this model:**",
                   "## Reproduce", "--repeats=3"):
        assert needle in text, needle



# ================================================================ end to end: a train.py checkpoint

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real (barely trained) 8-px checkpoint written by the train.py CLI."""
    out = tmp_path_factory.mktemp("model")
    r = run_cli("train.py", "--out", str(out), "--steps", "2", "--n-train", "8",
                "--image-size", "8", "--base", "16", "--attn-res", "4", "--T", "50",
                "--sample-n", "0", "--batch", "8")
    assert r.returncode == 0, r.stderr
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def runs(ckpt, tmp_path_factory):
    """The same tiny attack as a single run and with --repeats 3; returns (single, repeated,
    flags)."""
    root = tmp_path_factory.mktemp("runs")
    flags = lambda o, *extra: ["--ckpt", ckpt, "--out", str(o)] + TINY + list(extra)  # noqa: E731
    extract.main(flags(root / "single"))
    extract.main(flags(root / "three", "--repeats", "3"))
    return root / "single", root / "three", flags


def outputs(out):
    """Every repeat's samples and figures, and the audit, of a --repeats 3 folder."""
    res = {}
    for f in folders_of(str(out)):
        name = os.path.relpath(f, out)
        with np.load(os.path.join(f, "samples.npz")) as z:
            res[name + ":samples"] = {k: z[k] for k in z.files}
        res[name + ":methods"] = json.load(open(os.path.join(f, "metrics.json")))["methods"]
    rec = json.load(open(os.path.join(out, "metrics.json")))["audit"]
    # they name the folder
    res["audit"] = {k: v for k, v in rec.items() if k not in ("repeats", "command")}
    res["csv"] = open(os.path.join(out, "leaked.csv")).read()
    return res


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(":samples"):
            assert all(np.array_equal(a[k][c], b[k][c]) for c in a[k]), k
        else:
            assert a[k] == b[k], k


def test_repeat_0_is_the_single_run_and_a_single_run_writes_no_audit(runs):
    single, three, _ = runs
    with np.load(single / "samples.npz") as a, np.load(three / "samples.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert (json.load(open(single / "metrics.json"))["methods"]
            == json.load(open(three / "metrics.json"))["methods"])
    assert not any(os.path.exists(single / f) for f in audit.OUTPUTS + ("repeat-1",))
    assert all(os.path.exists(three / f) for f in ("AUDIT_REPORT.md", "leaked.csv",
                                                   "repeat-1/samples.npz", "repeat-2/REPORT.md"))
    assert not os.path.exists(three / "repeat-3")
    rec = json.load(open(three / "metrics.json"))["audit"]
    # vs UnCond and Cond
    assert ([r["folder"] for r in rec["repeats"]] == folders_of(str(three))
            and len(rec["verdict"]) == 4)


def test_an_interrupted_audit_resumes_to_the_same_result_and_a_rerun_recomputes_nothing(
        runs, tmp_path, monkeypatch):
    _, three, flags = runs
    out = tmp_path / "run"
    # repeat 0 (8 sampling calls), repeat 1 (8), then killed in repeat 2
    counting_sampler(monkeypatch, interrupt_at=18)
    with pytest.raises(KeyboardInterrupt):
        extract.main(flags(out, "--repeats", "3"))
    assert (os.path.exists(out / "repeat-1" / "samples.npz")
            and not os.path.exists(out / "AUDIT_REPORT.md"))
    monkeypatch.undo()
    calls = counting_sampler(monkeypatch)
    extract.main(flags(out, "--repeats", "3"))
    assert len(calls) == 7  # only what repeat 2 had left: its first batch was done
    same(outputs(out), outputs(three))
    before = (mtimes(out / "cache") | mtimes(out / "repeat-1" / "cache")
              | mtimes(out / "repeat-2" / "cache"))
    for name in ("sample", "train_classifier", "extract_features"):
        monkeypatch.setattr(ddpm.Diffusion if name == "sample" else side, name, fail_if_called)
    extract.main(flags(out, "--repeats", "3"))
    assert (mtimes(out / "cache") | mtimes(out / "repeat-1" / "cache")
            | mtimes(out / "repeat-2" / "cache")) == before
    same(outputs(out), outputs(three))


def test_a_repeat_folder_from_other_settings_is_refused_before_any_work(runs, tmp_path):
    single, _, flags = runs
    out = tmp_path / "run"
    shutil.copytree(single, out)  # repeat 0 is done; repeat-1 holds a run with another N_syn
    extract.main(flags(out / "repeat-1", "--n-syn", "8"))
    before = mtimes(out)
    r = run_cli("extract.py", *flags(out, "--repeats", "2"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "repeat-1" in lines[0] and "n_syn=8" in lines[0] and "--overwrite" in lines[0]
    assert mtimes(out) == before  # nothing written
    extract.main(flags(out, "--repeats", "2", "--overwrite"))
    assert json.load(open(out / "repeat-1" / "metrics.json"))["config"]["n_syn"] == 16


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_a_bad_repeats_value_gives_one_error_line_and_exit_2(ckpt, tmp_path, value):
    r = run_cli("extract.py", "--ckpt", ckpt, "--out", str(tmp_path / "x"), "--repeats", value)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert (r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
            and "--repeats" in lines[0]), r.stderr
    assert not os.path.exists(tmp_path / "x")


def test_training_images_are_named_by_their_files(tmp_path):
    """A train.py model of a seeded sample of 6 of 10 files: every name opens to the image audited
    under it."""
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "imgs" / "a")
    os.makedirs(tmp_path / "imgs" / "b")
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / "ab"[i % 2] / f"{i}.png")
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    for spec in (str(tmp_path / "imgs"), str(tmp_path / "train.npz")):
        tcfg = train.TrainConfig(out=str(tmp_path / "m"), data=spec, n_train=6, data_seed=3,
                                 image_size=8, base=16, attn_res=(4,), T=50, steps=1, batch=6,
                                 sample_n=0, log_every=1e9)
        train.train(tcfg)
        ds = data.load_data(spec, 8, n=6, seed=3)
        names = audit.training_names(extract.ExtractConfig(ckpt=str(tmp_path / "m" / "ckpt.pt")), 6)
        for j, name in enumerate(names):
            if spec.endswith(".npz"):
                file, k = name.split("#")
                assert file == "train.npz" and np.array_equal(np.load(spec)["images"][int(k)],
                                                              ds.images[j])
            else:
                assert np.array_equal(np.asarray(Image.open(os.path.join(spec, name))),
                                      ds.images[j]), name
        shutil.rmtree(tmp_path / "m")
