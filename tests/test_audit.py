"""audit.py: repeats of one attack on one model, the leaked-image list, the extrapolation to larger budgets.

  - seeds: repeat 0 is the single run's, no two repeats share a seed, each depends on (seed, syn_seed, r);
  - the extrapolation against hit processes with known per-image probabilities p_i: the closed form
    E[S(m)] = Σ_i 1 - (1 - p_i)^m (the paper's expected-unique formula), the interval's coverage of
    what m generations actually reach, the cap at the training-set size, a heterogeneous population
    (where Chao's estimator is a lower bound), and a planted memorizer whose generations are draws from
    a known prior over training images;
  - the per-generation hits are exactly a brute-force search's, images within the band of several
    training images included;
  - end to end on the planted memorizer: leaked.csv against a brute-force search over every repeat's
    samples, the figures against each repeat's own metrics.json;
  - on a real train.py checkpoint: repeat 0 is the single run, bit for bit; an interrupted run resumes to
    the same audit; a rerun recomputes nothing; a repeat folder from other settings and --repeats 0 are
    refused with one line and exit 2; names of training images from a folder and an .npz.
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
from test_extract import Memorizer, brute_force_distinct, counting_sampler, fail_if_called, mtimes, run_cli

TINY = ["--methods", "uncond,cond,side", "--n-gen", "16", "--batch", "8", "--n-syn", "16", "--K", "2", "--tau", "0",
        "--clf-steps", "5", "--clf-width", "8", "--sample-steps", "5", "--lam", "2", "--device", "cpu"]


# ============================================================================ seeds

def test_repeat_seeds_start_with_the_single_run_and_never_share_a_seed():
    s = audit.repeat_seeds(1, 12345, 40, avoid=(2,))
    flat = [v for pair in s for v in pair]
    assert s[0] == (1, 12345) and len(set(flat)) == len(flat) and 2 not in flat
    assert all(0 <= v < 2 ** 31 for v in flat)
    assert audit.repeat_seeds(1, 12345, 3, avoid=(2,)) == s[:3]  # R does not change the earlier repeats
    assert audit.repeat_seeds(7, 12345, 2)[1] != s[1] and audit.repeat_seeds(1, 7, 2)[1] != s[1]
    forced = audit.repeat_seeds(1, 12345, 2, avoid=s[1])  # the first draws taken: the next ones of the sequence
    assert not set(forced[1]) & set(s[1]) and len(set(forced[1]) | {1, 12345}) == 4


def test_repeat_configs_fix_the_chosen_settings_and_drop_the_sweeps():
    cfg = extract.ExtractConfig(repeats=3, sweep_lambda=(1.0, 3.0), lam=3.0)
    cfgs = audit.repeat_configs(cfg, "/o", dict(lam=10.0, K=4, cond_scale=None))
    assert cfgs[0] is cfg and [c.out for c in cfgs[1:]] == ["/o/repeat-1", "/o/repeat-2"]
    assert [(c.seed, c.syn_seed) for c in cfgs] == audit.repeat_seeds(1, 12345, 3, avoid=(cfg.sweep_seed,))
    assert all(c.lam == 10.0 and c.K == 4 and c.cond_scale == -1 and c.sweep_lambda == () and c.repeats == 1 for c in cfgs[1:])


# ============================================================================ the extrapolation, where the truth is known

def expected_reach(p, m):
    """The paper's expected-unique formula: E[distinct images reached by m generations] = Σ_i 1 - (1 - p_i)^m."""
    return float((1 - (1 - p) ** m).sum())


def simulate(p, T, factor, reps, seed, interval=False):
    """reps reference runs of T generations (each reaches image i with probability p_i), each extended to
    factor * T: (estimates, reached by the reference run, reached at factor * T, intervals)."""
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
    assert abs(est.mean() - truth) < 0.1 * truth  # the estimate from 64 generations, within 10 % on average
    assert s_obs.mean() < 0.35 * truth  # what 64 generations found: the unseen part is most of the answer
    inside = np.mean([lo <= r <= hi for (lo, hi), r in zip(iv, reached)])
    assert inside >= 0.85, inside  # a 95 % prediction interval for what 8x the generations reach


def test_extrapolation_is_a_lower_bound_when_hit_probabilities_vary():
    """30 images at 2 %, 70 at 0.2 %, 100 never reached: Chao's estimator is a lower bound under
    heterogeneity (Chao 1987), yet far closer than the count already found, and never counts the unreachable."""
    p = np.r_[np.full(30, 0.02), np.full(70, 0.002), np.zeros(100)]
    for factor, T in ((8, 64), (100, 64)):
        est, s_obs, reached, _ = simulate(p, T, factor, 100, seed=1)
        truth = expected_reach(p, factor * T)
        assert s_obs.mean() < est.mean() <= truth * 1.02, (factor, est.mean(), truth)
        assert np.abs(est - reached).mean() < np.abs(s_obs - reached).mean()
        assert est.max() <= 200 and audit.extrapolate(np.r_[np.ones(50, int), np.zeros(150, int)], T, 200, [math.inf])[0] == 200


def test_the_training_set_caps_the_estimate_and_nothing_new_means_no_more():
    Y = np.r_[np.ones(10, int), np.zeros(3, int)]  # 10 singletons, no doubletons: Q̂0 = (T-1)/T * 45 > 3 left
    assert audit.extrapolate(Y, 20, 13, [math.inf])[0] == 13
    est, lo, hi = audit.extrapolate_interval(Y, 20, 13, [20, 200, math.inf], np.random.default_rng(0))
    assert est[0] == 10 and (lo <= est).all() and (est <= hi).all() and hi.max() <= 13 and lo.min() >= 10
    Y = np.r_[np.full(5, 4), np.zeros(5, int)]  # every image found 4 times: no singletons, nothing unseen
    est, lo, hi = audit.extrapolate_interval(Y, 40, 10, [400, math.inf], np.random.default_rng(0))
    assert est.tolist() == [5, 5] and lo.tolist() == [5, 5] and hi.max() < 7  # the bootstrap's own draws may have singletons
    s, q1, q0 = audit.unseen(np.r_[np.full(6, 1), np.full(3, 2), np.full(4, 7)], 10, 100)
    assert (s, q1) == (13, 6) and q0 == pytest.approx(0.9 * 36 / 6)  # Chao2 by hand


PLANT_N, PLANT_PX, PLANT_REACHABLE, PLANT_T, PLANT_RUNS = 32, 8, 24, 16, 8


def test_the_planted_memorizer_reach_at_8x_is_predicted_from_its_first_generations():
    """A memorizer that returns one of 24 of its 32 training images, uniformly (the other 8 have prior
    ~0), sampled by the full ancestral chain, so generations are draws from a known prior: 24 images are
    reachable and m generations reach E[S(m)] = 24 (1 - (23/24)^m) (the paper's expected-unique formula).
    In 8 disjoint runs of 128 generations, the estimate from each run's first 16 must predict what all 128
    reach (and the closed form) far better than the 16 alone do, its interval must hold it, and the
    estimated total must hold 24, not the 32 training images."""
    ds = data.load_data("faces", PLANT_PX, n=PLANT_N, seed=0)
    diffusion = ddpm.Diffusion(100, "cosine", "eps")
    log_prior = np.where(np.arange(PLANT_N) < PLANT_REACHABLE, 0.0, -1e4)
    model = Memorizer(ds.images, diffusion, log_prior).eval()
    n_all = PLANT_RUNS * 8 * PLANT_T
    x = data.to_uint8(diffusion.sample(model, n_all, ddpm.sample_generators(0, range(n_all)), steps=100, sampler="ddpm"))
    g, j, _ = audit.incidence(x, ds.images, metrics.parse_bands(None, "l2"), "l2")
    assert len(g) == n_all and len(np.unique(g)) == n_all and j.max() < PLANT_REACHABLE  # one image each, never the 8
    truth = expected_reach(np.full(PLANT_REACHABLE, 1 / PLANT_REACHABLE), 8 * PLANT_T)
    est, s_obs, reached, inside, total = [], [], [], 0, 0
    for start in range(0, n_all, 8 * PLANT_T):
        Y = np.bincount(j[(g >= start) & (g < start + PLANT_T)], minlength=PLANT_N)
        e, lo, hi = audit.extrapolate_interval(Y, PLANT_T, PLANT_N, [8 * PLANT_T, math.inf], np.random.default_rng(0))
        est.append(e[0])
        s_obs.append((Y > 0).sum())
        reached.append(len(np.unique(j[(g >= start) & (g < start + 8 * PLANT_T)])))
        inside += lo[0] <= reached[-1] <= hi[0]
        total += lo[1] <= PLANT_REACHABLE <= hi[1]
    est, s_obs, reached = map(np.array, (est, s_obs, reached))
    assert abs(est.mean() - truth) < 0.15 * truth and s_obs.mean() < 0.6 * truth
    assert np.abs(est - reached).mean() < 0.7 * np.abs(s_obs - reached).mean()
    assert inside >= PLANT_RUNS - 2 and total >= PLANT_RUNS - 2, (inside, total)


def test_incidence_is_a_brute_force_search_with_images_near_several_training_images(monkeypatch):
    monkeypatch.setattr(audit, "FIRST_K", 1)  # force the k-growing search
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    train_x[1] = np.clip(train_x[0].astype(int) + rng.integers(-3, 4, train_x[0].shape), 0, 255)  # 0 and 1 near
    train_x[2] = np.clip(train_x[0].astype(int) + rng.integers(-3, 4, train_x[0].shape), 0, 255)
    noisy = lambda i, s: np.clip(train_x[i].astype(int) + rng.normal(0, s, train_x[i].shape), 0, 255).astype(np.uint8)  # noqa: E731
    gen = np.stack([noisy(0, 3), noisy(5, 2), noisy(5, 8), noisy(7, 12), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)])
    bands = metrics.parse_bands(None, "l2")
    g, j, v = audit.incidence(gen, train_x, bands, "l2")
    flat = lambda a: torch.from_numpy(a.reshape(len(a), -1).astype(np.float64) / 127.5)  # noqa: E731  the [-1, 1] scale
    d = (torch.cdist(flat(gen), flat(train_x)) / math.sqrt(8 * 8 * 3)).numpy()
    inside = np.any([metrics.in_band(d, lo, hi, "l2") for lo, hi in bands.values()], axis=0)
    assert sorted(zip(g.tolist(), j.tolist())) == sorted(zip(*np.nonzero(inside)))
    assert {0, 1, 2} <= set(j[g == 0].tolist())  # one generation in the band of three training images
    np.testing.assert_allclose(v, d[g, j], rtol=1e-9)


def test_the_grid_takes_grey_images_too(tmp_path):
    grey = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    rows = [dict(index=1, best_value=0.05, repeats=2)]
    audit.leaked_grid(str(tmp_path / "g.png"), rows, grey, dict(image={1: grey[0]}), top=4)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    s = audit.GRID_SCALE
    np.testing.assert_array_equal(img[6:6 + 8 * s:s, 6:6 + 8 * s:s, 0], grey[1, ..., 0])  # the training image, left
