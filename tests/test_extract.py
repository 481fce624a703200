"""extract.py end to end, against references computed here rather than by the code under test.

  - a planted memorization: an analytic "memorizing denoiser", the exact optimal denoiser of a
    *weighted* empirical distribution of 32 training faces (a few images hold most of the mass,
    as a partly memorizing DDPM favours some copies). Unconditional sampling lands on training
    images only (high band) but keeps hitting the heavy ones; SIDE, guiding each generation to a
    cluster drawn uniformly, must reach at least as many distinct training images at equal N_G.
    Distinct counts are checked against a brute-force torch.cdist nearest-neighbour count;
  - cached stages are reused (nothing recomputed, files untouched), an interrupted run resumes
    with only the missing batches regenerated and results identical to the uninterrupted run, and
    a changed setting is not served from a stale cache;
  - every bad option gives exit code 2 and a single `error:` line (subprocess, a real tiny
    checkpoint);
  - every generation is regenerated alone from its recorded seed and index (and cluster);
  - the outputs exist and are well formed.
A real 2-step 8-px checkpoint is trained once per module by `python train.py` (seconds).
"""
import dataclasses
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import common
import ddpm
import extract
import side
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny real run: 10 generations in batches of 4 (4 + 4 + 2: the last batch is partial).
TINY = ["--methods", "uncond,cond,side", "--n-gen", "10", "--batch", "4", "--n-syn", "16",
        "--K", "2", "--tau", "0", "--clf-steps", "5", "--clf-width", "8", "--sample-steps", "5",
        "--lam", "2", "--device", "cpu"]
TINY_N_GEN, TINY_BATCH = 10, 4


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def mtimes(folder):
    return {p: os.stat(p).st_mtime_ns
            for p in sorted(glob.glob(os.path.join(folder, "**"), recursive=True))
            if os.path.isfile(p)}


def load_samples(out):
    with np.load(os.path.join(out, "samples.npz")) as z:
        return {k: z[k] for k in z.files}


def fail_if_called(*args, **kwargs):
    raise AssertionError("a cached stage was recomputed")


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
def tiny(ckpt, tmp_path_factory):
    """extract.main on the real checkpoint, all three methods; returns (out folder, flags for a
    rerun)."""
    out = str(tmp_path_factory.mktemp("extract") / "run")
    flags = lambda o: ["--ckpt", ckpt, "--out", str(o)] + TINY  # noqa: E731
    extract.main(flags(out))
    return out, flags


# ========================================================================= the planted memorization

class Memorizer(nn.Module):
    """The exact posterior-mean denoiser of p(x_0) = Σ_i π_i δ(x_0 - x_i):
    x0_hat(x_t) = Σ_i softmax_i(log π_i - ||x_t - sqrt(ᾱ_t) x_i||² / (2 (1 - ᾱ_t))) x_i,
    returned as ε or v per the diffusion's prediction. return_mid: x0_hat, pixel-unshuffled to a
    4×-coarser grid of 48 channels (what a denoiser's mid-block "knows": the image it is heading
    to)."""

    def __init__(self, images, diffusion, log_prior):
        super().__init__()
        self.channels, self.image_size, self.num_classes = 3, images.shape[1], 0
        self.prediction = diffusion.prediction
        self.register_buffer("x_i", data.to_tensor(images))
        self.register_buffer("log_prior", torch.as_tensor(log_prior, dtype=torch.float32))
        self.register_buffer("ab", diffusion.f64["alphas_cumprod"].float())
        # extract_features reads the device from it
        self.unit = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, x, t, y=None, return_mid=False):
        ab = self.ab[t].view(-1, 1, 1, 1)
        d2 = ((x[:, None] - ab.sqrt()[:, None] * self.x_i[None]) ** 2).flatten(2).sum(-1)  # (B, N)
        # p(x_i | x_t), Bayes
        w = torch.softmax(self.log_prior - d2 / (2 * (1 - ab.view(-1, 1))), dim=1)
        x0 = torch.einsum("bn,nchw->bchw", w, self.x_i)
        if return_mid:
            return F.pixel_unshuffle(x0, 4)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # Ho et al. Eq. 4 solved for ε
        return eps if self.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0


PLANT_N, PLANT_PX, PLANT_ZIPF = 32, 16, 2.0  # π_i ∝ 1/(i+1)²: image 0 holds 61% of the mass
PLANT_N_GEN = 32  # expected distinct images of uncond at this N_G: Σ 1 - (1 - π_i)^N_G ≈ 6.8 of 32


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tcfg = train.TrainConfig(n_train=PLANT_N, image_size=PLANT_PX)  # data "faces", data_seed 0
    ds = data.load_data("faces", PLANT_PX, n=PLANT_N, seed=0)
    diffusion = ddpm.Diffusion(tcfg.T, tcfg.schedule, tcfg.prediction)
    model = Memorizer(ds.images, diffusion, -PLANT_ZIPF * np.log(np.arange(1, PLANT_N + 1))).eval()
    out = str(tmp_path_factory.mktemp("planted"))
    cfg = common.parse_config(extract.ExtractConfig, [
        "--ckpt", "memorizer", "--out", out, "--methods", "uncond,side,uncond_budget",
        "--n-gen", str(PLANT_N_GEN), "--batch", "32", "--n-syn", "64", "--K", "8",
        "--clf-steps", "150", "--clf-width", "8", "--sample-steps", "10",
        "--sweep-lambda", "0,10,30", "--device", "cpu"], "")
    results = extract.run(cfg, extract.Target(model, diffusion, ds, torch.device("cpu"),
                                              ident="memorizer"))  # no checkpoint
    return out, results, ds


def brute_force_distinct(gen_uint8, train_uint8, hi):
    """Training images with some generation within normalized L2 `hi` (on [-1, 1]), by a full
    cdist."""
    g, t = (data.to_tensor(gen_uint8).flatten(1).double(),
            data.to_tensor(train_uint8).flatten(1).double())
    d = torch.cdist(g, t) / math.sqrt(g.shape[1])
    return int((d.min(0).values <= hi).sum()), float((d.min(1).values <= hi).double().mean())


def test_extraction_finds_the_planted_training_images(planted):
    out, results, ds = planted
    s = load_samples(out)
    for m in ("uncond", "side"):
        r = results[m]
        hi = r["bands"]["high"][1]
        n_distinct, frac_high = brute_force_distinct(s["images"][s["method"] == m], ds.images, hi)
        assert r["distinct"]["high"] == n_distinct, (m, r["distinct"], n_distinct)
        assert r["ums"]["high"] == pytest.approx(100.0 * n_distinct / PLANT_N_GEN)
        assert r["ams"]["high"] == pytest.approx(100.0 * frac_high)
        # not saturated: the comparison below can fail
        assert 0 < n_distinct < PLANT_N, (m, n_distinct)
    # a memorizer only ever returns training images
    assert results["uncond"]["ams"]["high"] == 100.0
    # the skew keeps plain sampling on a few images
    assert results["uncond"]["distinct"]["high"] <= 12


def test_side_at_its_swept_lambda_reaches_at_least_as_many_as_uncond(planted):
    out, results, _ = planted
    rows = json.load(open(os.path.join(out, "sweep_lambda.json")))
    chosen = json.load(open(os.path.join(out, "metrics.json")))["chosen"]["lam"]
    assert [r["value"] for r in rows] == [0.0, 10.0, 30.0]
    best = max(r["distinct"]["high"] for r in rows)
    # first best on the sweep seed
    assert chosen == next(r["value"] for r in rows if r["distinct"]["high"] == best)
    # guidance helped on the sweep seed; λ = 0 would make the comparison below trivial
    assert chosen > 0
    assert results["side"]["scale"] == chosen
    assert results["side"]["distinct"]["high"] >= results["uncond"]["distinct"]["high"]
    assert os.path.exists(os.path.join(out, "sweep_lambda.png"))


def test_budget_curves_count_what_a_brute_force_search_counts(planted):
    """Every curve point = distinct training images (any band) of the first b samples, by full
    cdist; SIDE's curve starts at N_syn and its union curve shares UnCond's synthetic prefix."""
    out, results, ds = planted
    s, rec = load_samples(out), json.load(open(os.path.join(out, "metrics.json")))
    n_syn, curves = rec["config"]["n_syn"], rec["curves"]
    edge = results["side"]["bands"]["low"][1]  # the bands tile [0, edge]: any band = within edge
    budget = s["images"][s["method"] == "uncond_budget"]
    syn, guided = budget[:n_syn], s["images"][s["method"] == "side"]
    for name, x, offset in (("uncond_budget", budget, 0), ("side", guided, n_syn),
                            ("side_union", np.concatenate([syn, guided]), 0)):
        pts = curves[name]
        assert pts and [p["budget"] for p in pts] == sorted(p["budget"] for p in pts)
        assert (min(p["budget"] for p in pts) > offset
                and max(p["budget"] for p in pts) == n_syn + PLANT_N_GEN)
        for p in pts:
            assert p["distinct_any"] == brute_force_distinct(x[:p["budget"] - offset],
                                                             ds.images, edge)[0], (name, p)
    assert curves["side"][-1]["distinct_any"] == results["side"]["distinct_any"]
    first = {p["budget"]: p["distinct_any"] for p in curves["uncond_budget"]}
    assert all(first[p["budget"]] == p["distinct_any"]
               for p in curves["side_union"] if p["budget"] <= n_syn)


def test_cond_targets_only_labels_present_in_the_training_set(tiny, ckpt):
    out, _ = tiny
    s = load_samples(out)
    _, _, tcfg, _ = train.load_trained(ckpt)
    labels = data.load_data(tcfg.data, tcfg.image_size, n=tcfg.n_train, seed=tcfg.data_seed).labels
    # some label ids below the max have no image here
    assert len(np.unique(labels)) < labels.max() + 1
    assert set(s["cluster"][s["method"] == "cond"].tolist()) <= set(labels.tolist())


# ============================================================================ caching and resume

def test_a_second_run_reuses_every_cached_stage(tiny, tmp_path, monkeypatch):
    src, flags = tiny
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = mtimes(out / "cache")
    # no generation (synthetic or extraction)
    monkeypatch.setattr(ddpm.Diffusion, "sample", fail_if_called)
    monkeypatch.setattr(side, "train_classifier", fail_if_called)
    monkeypatch.setattr(side, "extract_features", fail_if_called)
    extract.main(flags(out))
    assert mtimes(out / "cache") == before
    for k, v in load_samples(src).items():
        assert np.array_equal(load_samples(out)[k], v), k


def counting_sampler(monkeypatch, interrupt_at=None):
    """Record the batch size of every Diffusion.sample call; optionally raise KeyboardInterrupt at
    call k."""
    real, calls = ddpm.Diffusion.sample, []

    def sample(self, model, n, generators, **kw):
        calls.append(n)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(self, model, n, generators, **kw)
    monkeypatch.setattr(ddpm.Diffusion, "sample", sample)
    return calls


def test_deleted_last_batches_alone_are_regenerated(tiny, tmp_path, monkeypatch):
    src, flags = tiny
    out = tmp_path / "run"
    shutil.copytree(src, out)
    gens = sorted(glob.glob(str(out / "cache" / "gen-*")))
    assert len(gens) == 3  # uncond, cond, side
    n_batches = math.ceil(TINY_N_GEN / TINY_BATCH)
    for g in gens:
        os.remove(os.path.join(g, f"{n_batches - 1:05d}.npy"))
    before = mtimes(out / "cache")
    monkeypatch.setattr(side, "train_classifier", fail_if_called)
    calls = counting_sampler(monkeypatch)
    extract.main(flags(out))
    # the partial last batch of each
    assert calls == [TINY_N_GEN - (n_batches - 1) * TINY_BATCH] * len(gens)
    after = mtimes(out / "cache")
    assert {p: after[p] for p in before} == before  # every surviving file untouched
    for k, v in load_samples(src).items():
        assert np.array_equal(load_samples(out)[k], v), k


def test_an_interrupted_run_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    src, flags = tiny
    out = tmp_path / "run"
    # uncond's 3 batches, cond's first, then killed
    calls = counting_sampler(monkeypatch, interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        extract.main(flags(out))
    assert not os.path.exists(out / "samples.npz")
    monkeypatch.undo()
    calls = counting_sampler(monkeypatch)
    extract.main(flags(out))
    n_syn_batches = math.ceil(16 / TINY_BATCH)
    assert calls == [4, 2] + [4] * n_syn_batches + [4, 4, 2]  # cond's last two, synthetic set, side
    for k, v in load_samples(src).items():
        assert np.array_equal(load_samples(out)[k], v), k


def test_a_rerun_with_another_batch_size_does_not_mix_batch_files(tiny, tmp_path):
    """--batch changes how generations are cut into cached files: a rerun with another batch must
    not read the earlier run's files as its own (4 + 4 + 2 read as batches of 3 gave 11 images)."""
    src, flags = tiny
    out = tmp_path / "run"
    shutil.copytree(src, out)
    extract.main(flags(out) + ["--methods", "uncond,side", "--batch", "3"])
    old, new = load_samples(src), load_samples(out)
    for m in ("uncond", "side"):
        a, b = old["images"][old["method"] == m], new["images"][new["method"] == m]
        # same images
        assert len(b) == TINY_N_GEN and np.abs(a.astype(int) - b.astype(int)).max() <= 1, m


def test_a_stage_is_named_by_exactly_the_settings_it_reads(tmp_path):
    cfg = extract.ExtractConfig()
    stages = extract.Stages(str(tmp_path), cfg, "m")
    s = stages.reads("tau", "clf_steps", K=3)
    assert vars(s) == dict(tau=cfg.tau, clf_steps=cfg.clf_steps, K=3)
    with pytest.raises(AttributeError):
        s.lam  # a stage cannot read a setting its name does not hash
    name = stages.name("clf", s)
    for field, value, changes in (("lam", 9.0, False), ("seed", 7, False), ("tau", 0.9, True),
                                  ("clf_steps", 3, True)):
        other = extract.Stages(str(tmp_path), dataclasses.replace(cfg, **{field: value}), "m")
        assert (other.name("clf", other.reads("tau", "clf_steps", K=3)) != name) == changes, field
    assert extract.Stages(str(tmp_path), cfg, "other model").name("clf", s) != name


@pytest.mark.parametrize("flag,value", [("--n-syn", "20"), ("--clf-width", "16")])
def test_a_changed_setting_is_not_served_from_a_stale_cache(tiny, tmp_path, flag, value):
    src, flags = tiny
    out = tmp_path / "run"
    shutil.copytree(src, out)
    old = load_samples(src)
    extract.main(flags(out) + ["--methods", "uncond,side", flag, value, "--overwrite"])
    new = load_samples(out)
    # uncond does not depend on it: reused
    assert len(glob.glob(str(out / "cache" / "gen-uncond-*"))) == 1
    assert len(glob.glob(str(out / "cache" / "gen-side-*"))) == 2  # side does: generated anew
    assert np.array_equal(new["images"][new["method"] == "uncond"],
                          old["images"][old["method"] == "uncond"])
    assert not np.array_equal(new["images"][new["method"] == "side"],
                              old["images"][old["method"] == "side"])


# ============================================================================ bad options

@pytest.mark.parametrize("args,needle", [
    (["--lam", "-1"], "--lam -1.0"),
    (["--K", "1"], "--K 1"),
    (["--tau", "1.5"], "--tau 1.5"),
    (["--tau", "-0.1"], "--tau -0.1"),
    (["--n-gen", "0"], "--n-gen 0"),
    (["--methods", "uncond,bogus"], "bogus"),
    ("16px", "16 px"),  # a checkpoint trained at 8 px against 16-px data
])
def test_each_bad_option_gives_one_error_line_and_exit_2(ckpt, tmp_path, args, needle):
    if args == "16px":
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "faces16.npz",
                 images=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
        args = ["--data", str(tmp_path / "faces16.npz"), "--methods", "uncond", "--n-gen", "2",
                "--sample-steps", "2"]
    r = run_cli("extract.py", "--ckpt", ckpt, "--out", str(tmp_path / "x"), *args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


# ============================================================================ reproducibility

def test_every_generation_is_reproduced_alone_from_its_seed_and_index(tiny, ckpt):
    out, _ = tiny
    s = load_samples(out)
    rec = json.load(open(os.path.join(out, "metrics.json")))
    cfg = rec["config"]
    model, diffusion, tcfg, _ = train.load_trained(ckpt)
    clfs = {}
    for m, pattern, k, time_dependent in [
            ("cond", "clf-cond-*.pt", rec["methods"]["cond"].get("classes"), False),
            ("side", "clf-side-*.pt", rec["methods"]["side"].get("kept"), True)]:
        (path,) = glob.glob(os.path.join(out, "cache", pattern))
        clf = side.TimeResNet(k, tcfg.image_size, width=cfg["clf_width"],
                              time_dependent=time_dependent, T=diffusion.T)
        clf.load_state_dict(common.load_checkpoint(path)["state"])
        clfs[m] = clf.eval().requires_grad_(False)
    for m in ("uncond", "cond", "side"):
        rows = np.flatnonzero(s["method"] == m)
        assert np.array_equal(s["index"][rows], np.arange(TINY_N_GEN))
        for r in rows[[0, 5, -1]]:  # first batch, middle batch, the partial last batch
            i, seed, c = int(s["index"][r]), int(s["seed"][r]), int(s["cluster"][r])
            cond_fn = None if m == "uncond" else side.guidance(clfs[m], torch.tensor([c]),
                                                               rec["methods"][m]["scale"])
            x = diffusion.sample(model, 1, ddpm.sample_generators(seed, [i]),
                                 steps=cfg["sample_steps"], eta=cfg["eta"], sampler=cfg["sampler"],
                                 cond_fn=cond_fn)
            alone = data.to_uint8(x)[0]
            assert np.abs(alone.astype(int) - s["images"][r].astype(int)).max() <= 1, (m, i)
            # exact on CPU: no batch-dependent arithmetic
            assert np.array_equal(alone, s["images"][r]), (m, i)


# ============================================================================ outputs

def test_outputs_exist_and_are_well_formed(tiny):
    out, _ = tiny
    s = load_samples(out)
    methods = ["uncond", "cond", "side"]
    assert set(s) == {"images", "method", "cluster", "seed", "index"}
    n = len(methods) * TINY_N_GEN
    assert s["images"].shape == (n, 8, 8, 3) and s["images"].dtype == np.uint8
    assert all(len(v) == n for v in s.values())
    assert list(dict.fromkeys(s["method"].tolist())) == methods
    assert (s["seed"] == 1).all()
    rec = json.load(open(os.path.join(out, "metrics.json")))
    assert list(rec["methods"]) == methods
    bands = set(rec["methods"]["uncond"]["bands"])
    for m, r in rec["methods"].items():
        assert set(r["ams"]) == set(r["ums"]) == set(r["distinct"]) == bands, m
        assert all(0.0 <= v <= 100.0 for v in r["ams"].values()), m  # a share of the generations
        # UMS counts training images per generation: it can pass 100 %, but is distinct / N_G
        for b in bands:
            assert r["ums"][b] == pytest.approx(100.0 * r["distinct"][b] / TINY_N_GEN), (m, b)
        assert sum(r["ams"].values()) <= 100.0 + 1e-9, m  # bands do not overlap
        cl = s["cluster"][s["method"] == m]
        k = {"uncond": 0, "cond": r.get("classes"), "side": r.get("kept")}[m]
        assert (cl == -1).all() if m == "uncond" else ((cl >= 0) & (cl < k)).all(), m
    assert (rec["config"]["n_gen"] == TINY_N_GEN
            and rec["chosen"] == {"lam": 2.0, "K": 2, "cond_scale": None})
    report = open(os.path.join(out, "REPORT.md")).read().splitlines()
    header = next(ln for ln in report if ln.startswith("| method"))
    for m in methods:
        row = [ln for ln in report if ln.startswith(f"| {m} |")]
        assert len(row) == 1 and row[0].count("|") == header.count("|"), m
    for m in methods:
        with Image.open(os.path.join(out, "grids", f"{m}.png")) as im:
            assert im.format == "PNG" and im.size[0] > 8 and im.size[1] > 8


def test_a_sweep_whose_best_value_is_at_an_end_is_extended(tmp_path):
    """A fake audit whose distinct count peaks at value 30: the grid (1, 3, 10) is extended to 30,
    90 (the best is then inside) and stops; a peak below the grid extends it downward; 0 stays a
    lower end."""
    import types

    def fake(peak):
        score = lambda v: 100 - abs(v - peak)  # noqa: E731
        ranks = types.SimpleNamespace(rank=0, agree=lambda o: o, log=lambda m: None)
        run = types.SimpleNamespace(ranks=ranks, out=str(tmp_path), evaluate=lambda x: dict(
            ams={"high": 0}, ums={"high": 0}, distinct={"high": score(x)}, p95=0,
            distinct_any=score(x)))
        run.method = lambda m, n, seed, lam: (lam, {})
        return run

    cfg = types.SimpleNamespace(sweep_n_gen=4, n_gen=4, sweep_seed=0)
    rows = extract.sweep(fake(30), "lambda", (1.0, 3.0, 10.0), cfg, "side", lambda v: dict(lam=v))
    assert ([r["value"] for r in rows] == [1.0, 3.0, 10.0, 30.0, 90.0]
            and extract.best_of(rows) == 30.0)
    assert [r["added"] for r in rows] == [False, False, False, True, True]
    rows = extract.sweep(fake(0.2), "lambda", (1.0, 3.0), cfg, "side", lambda v: dict(lam=v))
    # best 1/9, inside: stop
    assert [round(r["value"], 4) for r in rows] == [0.037, 0.1111, 0.3333, 1.0, 3.0]
    rows = extract.sweep(fake(0.001), "lambda", (1.0, 3.0), cfg, "side", lambda v: dict(lam=v))
    # still at the end: capped
    assert [round(r["value"], 4) for r in rows] == [0.037, 0.1111, 0.3333, 1.0, 3.0]
    rows = extract.sweep(fake(0.0), "cond_scale", (0.0, 1.0, 3.0), cfg, "cond",
                         lambda v: dict(lam=v))
    assert [r["value"] for r in rows] == [0.0, 1.0, 3.0]  # best at 0: nothing below unguided
