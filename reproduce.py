"""The paper's experiments in miniature, with independent replicates and a corrected verdict:
`make reproduce`.

    python reproduce.py --profile cpu --out results            # the README's table, 2-core CPU
    python reproduce.py --profile cpu --seed 1 --out results1  # the same from another base seed
    python reproduce.py --profile cpu --calibrate --out cal    # how the budgets were chosen
    python reproduce.py --profile gpu --data /path/to/celeba   # larger images and sets, one GPU

1. Table 1 of the paper (arXiv 2410.02467v7): for several training-set sizes of one source,
   unconditional DDPMs trained for a per-size budget (chosen by --calibrate so that plain sampling
   reaches part of the training set, never none and never all); then Carlini UnCond, Carlini Cond
   and SIDE (Alg. 1) at equal N_G, sampler and steps (extract.py), with SIDE's permuted-label
   control, plain sampling given SIDE's whole budget N_syn + N_G, and at the smallest size the
   class-conditional DDPM.
2. Replicates: R per size. A replicate is one (size, r) with its own seeds for everything random:
   the training sample, the initial weights and training stream, the attacker's synthetic set,
   clustering and classifiers, and the generation noise; no seed is shared by two replicates
   (evidence.check_independent, tests/test_reproduce.py), so a claim pooled over every replicate of
   every size uses independent values. Models of one size train together (ensemble.py), each as if
   alone.
3. Tuning never sees a reported model: λ and Cond's guidance scale are chosen by sweeps (extended
   while their best value sits at a grid's end) on a tuning replicate with seeds of its own.
4. The abstract's "SIDE can extract training data where previous methods fail": each replicate of
   one size also keeps its model at a smaller (weakly memorized) budget, attacked the same way.
5. Conditional memorization (SIDE Definition 1, SIDE Theorem 1): at the smallest size each
   replicate's DDPM is also trained with its true labels and with a permutation of them (the same
   classes and sizes).
6. The verdict: every claim (both metrics, any and high band, the controls, the weak arm, the sizes,
   SIDE Definition 1) decided as one family with Holm-Bonferroni (evidence.py); the
   uncorrected intervals are kept beside. Pixel-L2 bands are calibrated on the data at the working
   resolution.
Writes OUT/REPORT.md, OUT/summary.json and PNGs. Every stage is cached; a rerun resumes.
"""
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import data
import evidence
import extract
import metrics
import models
from common import (UserError, atomic_write_json, atomic_write_text, check, check_writable, option,
                    parse_config, resolve_device, run_main)
from report import calibration_report, curve_plot, label_effect, reproduce_report

# The cpu profile (`make reproduce`), 8 px: 16 px did not memorize within a CPU budget. `make
# calibrate` (bands calibrated at 8 px): 800 epochs (= steps, batch min(128, n)) is the smallest
# budget with every size partly memorized (20-56 % reached at 20 sampler steps), 700 the largest
# with every size almost unreached (3-12 %: the weak arm); 600: none, 1,000: 58-100 %
# (reports/calibrate-faces)
CPU = dict(data="faces", image_size=8,
           sizes=(16, 32, 64), epochs=(800, 800, 800), weak_epochs=700,
           batch=128, base=32, mults=(1, 2), attn_res=(4,), T=1000,
           n_gen=512, n_syn=512, K=16,
           sweep_lambda=(1.0, 3.0, 10.0, 30.0), sweep_cond=(0.0, 1.0, 3.0, 10.0, 30.0),
           sample_steps=20, check_steps=40, check_replicates=2, clf_steps=250,
           replicates=6, div_mc=16, div_t=32,
           calib_epochs=(500, 550, 600, 700, 800, 1000), jobs=2)

# Each profile: data and model, per-size training budget in epochs, attack settings, replicates.
PROFILES = {
    "smoke": dict(data="faces", image_size=8,
                  sizes=(8, 16), epochs=(300, 150), weak_epochs=100,
                  batch=16, base=16, mults=(1, 2), attn_res=(4,), T=100,
                  n_gen=32, n_syn=64, K=4,
                  sweep_lambda=(1.0, 3.0), sweep_cond=(0.0, 3.0),
                  sample_steps=10, check_steps=20, check_replicates=1, clf_steps=40,
                  replicates=2, div_mc=8, div_t=16,
                  calib_epochs=(50, 150), jobs=2),
    "cpu": CPU,
    # Fashion-MNIST (real images, grey), 28 -> 8 px: the cpu profile's model and attack.
    # `make calibrate DATA=fashion-mnist` (its own bands at 8 px): 1,000 epochs is the smallest
    # budget with every size partly memorized (20-50 % reached), 700 the largest with every size
    # almost unreached (2-12 %); 600: none
    "fmnist": dict(CPU, data="fashion-mnist", epochs=(1000, 1000, 1000),
                   calib_epochs=(500, 600, 700, 800, 900, 1000)),
    # never run on a GPU yet; sizes and epochs are a starting point for --calibrate;
    # --data /path/to/celeba for real faces
    "gpu": dict(data="faces", image_size=32,
                sizes=(256, 512, 1024), epochs=(1500, 1500, 1500), weak_epochs=1000,
                batch=128, base=64, mults=(1, 2, 2), attn_res=(16,), T=1000,
                n_gen=1024, n_syn=1024, K=32,
                sweep_lambda=(1.0, 3.0, 10.0, 30.0), sweep_cond=(0.0, 1.0, 3.0, 10.0, 30.0),
                sample_steps=50, check_steps=0, check_replicates=0, clf_steps=1000,
                replicates=5, div_mc=64, div_t=100,
                calib_epochs=(500, 1000, 1500, 3000), jobs=1),
}
# calibration: memorized sooner than linear/v
TRAIN_FIXED = dict(schedule="cosine", prediction="eps", lr=2e-3)
PAPER_TABLE1 = [  # arXiv 2410.02467v7 Table 1, low band [0.4, 0.5) of SSCD similarity, %
    ("CelebA-HQ-FI (~4-5k)", dict(uncond=11.66, cond=15.01, side=23.27), None),
    ("CelebA-25000", dict(uncond=5.00, cond=8.71, side=20.53),
     dict(uncond=4.24, cond=6.80, side=11.45)),
    ("CelebA (full)", dict(uncond=1.95, cond=4.68, side=7.19), None),
]
TABLE_METHODS = "uncond,cond,side,side_random,uncond_budget"
WEAK_METHODS = "uncond,cond,side"
CHECK_METHODS = "uncond,side"  # what the sampler-steps check repeats at check_steps
ROLES = {"table": 1, "tune": 2, "bands": 3, "calibrate": 4}  # replicate roles, one seed stream each
# training sample, weights + training stream, attacker, generations
SEED_KINDS = ("data", "train", "syn", "gen")
# images of the band calibration: more than any training set, so its closest pair is closer
BAND_REFERENCE = 1024


@dataclass
class ReproduceConfig:
    profile: str = option("cpu", "sizes, budgets and replicates: smoke (a test), "
                                 "cpu (the README's table), gpu", choices=list(PROFILES))
    out: str = option("results", "output folder: REPORT.md, summary.json, PNGs, models/, extract/",
                      nonempty=True)
    data: str = option("", "faces (built-in), fashion-mnist, mnist, an image or IDX folder or an "
                           ".npz (e.g. CelebA) in the profile's place ('' = the profile's: faces, "
                           "or fashion-mnist for the fmnist profile)")
    seed: int = option(0, "base seed: every replicate's seeds derive from it "
                          "(and from the replicate)", lo=0)
    sizes: tuple = option((), "training-set sizes (override the profile; then --epochs too)",
                          elem=int, lo=2)
    epochs: tuple = option((), "training epochs per size (override the profile)",
                           elem=float, gt=0.0)
    replicates: int = option(0, "independent replicates per size "
                                "(0 = profile; >= 2 for an interval)", lo=0)
    n_gen: int = option(0, "N_G per method (0 = profile)", lo=0)
    calibrate: bool = option(False, "instead of the reproduction: train each size for the "
                                    "profile's calib_epochs and print the share of its training "
                                    "images plain sampling reaches")
    eps: float = option(0.05, "ε of Definition 1 on the [-1,1] pixel scale (small next to the "
                              "0.2 typical train-to-train NN distance)", gt=0.0)
    device: str = option("auto", "auto, cpu or cuda", nonempty=True)
    overwrite: bool = option(False, "replace a finished run in --out made with other settings "
                                    "(without it that is refused); nothing is removed before "
                                    "every check has passed")


class Timer:
    """Wall time of each named stage (parallel jobs overlap: their times do not add up to the
    total)."""

    def __init__(self):
        self.t, self.t0 = {}, time.time()

    def __call__(self, name, fn):
        t0 = time.time()
        print(f"== {name}", file=sys.stderr, flush=True)
        out = fn()
        self.t[name] = self.t.get(name, 0.0) + time.time() - t0
        return out


def flags(d):
    return [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
            for k, v in d.items()]


def seeds_of(base, role, n, r):
    """{kind: seed} of replicate r of size n in `role`, for each of SEED_KINDS: drawn from one
    SeedSequence per (base, role, n, r, kind), so no two replicates (nor two kinds) share a
    stream."""
    return {k: int(np.random.SeedSequence([base, ROLES[role], n, r, i]).generate_state(1)[0] >> 1)
            for i, k in enumerate(SEED_KINDS)}


def plan(cfg, p, labelled):
    """Every replicate: {name, role, n, r, seeds, model, weak (a kept checkpoint or None),
    labelled models}."""
    sizes, reps = list(p["sizes"]), []
    tune_n, weak_n = sizes[len(sizes) // 2], sizes[len(sizes) // 2]
    for n, e in zip(sizes, p["epochs"]):
        for r in range(p["replicates"]):
            rep = dict(name=f"n{n}-r{r}", role="table", n=n, r=r, epochs=e,
                       seeds=seeds_of(cfg.seed, "table", n, r))
            rep["model"] = f"{cfg.out}/models/{rep['name']}"
            rep["weak"] = rep["keep"] = steps_of(p, n, p["weak_epochs"]) if n == weak_n else None
            rep["labelled"] = ({lab: f"{rep['model']}-{lab}" for lab in ("informative", "permuted")}
                               if labelled and n == sizes[0] else {})
            reps.append(rep)
    e = dict(zip(sizes, p["epochs"]))[tune_n]
    reps.append(dict(name=f"n{tune_n}-tune", role="tune", n=tune_n, r=0, epochs=e,
                     seeds=seeds_of(cfg.seed, "tune", tune_n, 0),
                     model=f"{cfg.out}/models/n{tune_n}-tune", weak=None, labelled={},
                     # trains beside the table's models: the same --keep
                     keep=steps_of(p, tune_n, p["weak_epochs"]) if tune_n == weak_n else None))
    return reps


def steps_of(p, n, epochs):
    """Optimiser steps of `epochs` passes over n images at batch min(profile batch, n): a set no
    larger than the batch gets one step per epoch, since steps, not epochs, set how far a DDPM
    memorizes (calibration: at batch 128 and 1,000 epochs, 54 % of 128 faces were reached and
    none of 32)."""
    return max(1, math.ceil(epochs * n / min(p["batch"], n)))


def train_args(cfg, p, rep, labels="none", out=None):
    """train.py's flags for one model of a replicate (labels: none, true or random = permuted)."""
    n = rep["n"]
    args = dict(out=out or rep["model"], data=cfg.data, n_train=n, data_seed=rep["seeds"]["data"],
                image_size=p["image_size"], labels=labels, base=p["base"], mults=p["mults"],
                attn_res=p["attn_res"], T=p["T"], steps=steps_of(p, n, rep["epochs"]),
                batch=min(p["batch"], n), seed=rep["seeds"]["train"],
                sample_n=16, sample_steps=p["sample_steps"], device=cfg.device, resume=True,
                log_every=30, keep=_steps(rep.get("keep")), **TRAIN_FIXED)
    return flags(args)


def _steps(keep):
    """A replicate's `keep` (None, one step or several) as train.py's --keep tuple."""
    return () if keep is None else (keep,) if isinstance(keep, int) else tuple(keep)


def train_jobs(cfg, p, reps):
    """One ensemble.py job per group of models that share a shape (size; labelled or not),
    longest first."""
    groups = {}
    for rep in reps:
        groups.setdefault((rep["n"], "none"), []).append(train_args(cfg, p, rep))
        for lab, path in rep["labelled"].items():
            groups.setdefault((rep["n"], "labelled"), []).append(train_args(
                cfg, p, rep, labels="true" if lab == "informative" else "random", out=path))
    jobs = []
    for (n, kind), members in sorted(groups.items(), key=lambda kv: -kv[0][0] * len(kv[1])):
        path = f"{cfg.out}/logs/train-n{n}-{kind}.json"
        atomic_write_json(path, members)
        jobs.append((f"train n{n} {kind} x{len(members)}", ["ensemble.py", f"--jobs={path}"]))
    return jobs


def extract_args(cfg, p, ckpt, out, methods, bands, **extra):
    args = dict(ckpt=ckpt, out=out, methods=methods, n_gen=p["n_gen"], n_syn=p["n_syn"], K=p["K"],
                sample_steps=p["sample_steps"], clf_steps=p["clf_steps"],
                batch=min(256, p["n_gen"]), device=cfg.device, bands=bands)
    args.update(extra)
    return ["extract.py", *flags(args)]


def attack_jobs(cfg, p, reps, chosen, bands):
    """extract.py jobs: the Table 1 methods on every table replicate, the weak arm's methods on
    its kept checkpoint, and plain sampling of the labelled models; each replicate's generation
    and attacker seeds."""
    jobs = []
    for rep in (r for r in reps if r["role"] == "table"):
        s, m, x = rep["seeds"], rep["model"], f"{cfg.out}/extract/{rep['name']}"
        seeds = dict(seed=s["gen"], syn_seed=s["syn"], lam=chosen["lam"],
                     cond_scale=chosen["cond_scale"])
        jobs.append((f"extract {rep['name']}",
                     extract_args(cfg, p, f"{m}/ckpt.pt", x, TABLE_METHODS, bands, **seeds)))
        if rep["weak"]:
            jobs.append((f"extract {rep['name']} weak", extract_args(
                cfg, p, f"{m}/ckpt-{rep['weak']}.pt", f"{x}-weak", WEAK_METHODS, bands,
                curve_points=0, **seeds)))
        for lab, path in rep["labelled"].items():
            jobs.append((f"extract {rep['name']} {lab}", extract_args(
                cfg, p, f"{path}/ckpt.pt", f"{x}-{lab}", "uncond", bands, seed=s["gen"],
                curve_points=0)))
        # the sampler right-sizing, checked: the same attack with more steps
        if rep["r"] < p["check_replicates"]:
            jobs.append((f"extract {rep['name']} steps{p['check_steps']}", extract_args(
                cfg, p, f"{m}/ckpt.pt", f"{x}-steps{p['check_steps']}", CHECK_METHODS, bands,
                curve_points=0, **dict(seeds, sample_steps=p["check_steps"]))))
    return jobs


def check_train_flags(argv):
    """train.py's own check of a train job's flags (`train.py --dry-run` in a subprocess, so that
    this orchestrator does not import the trainer): its one error line as a UserError."""
    r = subprocess.run([sys.executable, "train.py", *argv, "--dry-run"], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["train.py failed"])[-1]
        raise UserError(f"train.py {last.removeprefix('error: ')}")


def run_jobs(jobs, parallel, timer, log_dir):
    """Run (name, argv) script jobs, `parallel` at a time. With more than one at a time each gets
    one thread: two torch processes with all threads each on 2 cores collapse each other's
    throughput."""
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if parallel > 1 else {}))
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, argv = pending.pop(0)
            log = os.path.join(log_dir,
                               name.replace(" ", "_").replace("=", "").replace("/", "_") + ".log")
            print(f"== {name} (log: {log})", file=sys.stderr, flush=True)
            fh = open(log, "w")
            proc = subprocess.Popen([sys.executable, *argv], stdout=fh, stderr=subprocess.STDOUT,
                                    env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
            running.append((name, proc, fh, log, time.time()))
        time.sleep(0.2)
        for job in list(running):
            name, proc, fh, log, t0 = job
            if proc.poll() is None:
                continue
            running.remove(job)
            fh.close()
            timer.t[name] = time.time() - t0
            if proc.returncode != 0:
                for other in running:
                    other[1].kill()
                tail = ([ln for ln in open(log).read().splitlines() if ln.strip()][-1:]
                        or ["(no output)"])
                raise UserError(f"{name} failed (exit {proc.returncode}): {tail[0]} "
                                f"(full log: {log}); "
                                "fix it and rerun: finished stages are reused")


def load_metrics(out):
    with open(os.path.join(out, "metrics.json")) as fh:
        return json.load(fh)


def row(r, rep, method, arm="table", **extra):
    """One summary.json row of extract's metrics for one method: counts per band (hits = AMS x
    N_G / 100, distinct = UMS x N_G / 100) and in any band, tagged with its replicate."""
    hits = {b: round(v * r["n_generated"] / 100) for b, v in r["ams"].items()}
    return dict(n_train=rep["n"], method=method, arm=arm, replicate=rep["r"],
                n_gen=r["n_generated"], ams=r["ams"], ums=r["ums"], hits=hits,
                hits_any=sum(hits.values()), distinct=r["distinct"],
                distinct_any=r["distinct_any"], ams_any=r["ams_any"], p95=r["p95"],
                carlini_extracted=r["carlini_extracted"], yoon_extracted=r["yoon_extracted"],
                **extra)


def collect(cfg, p, reps):
    """summary rows (one per replicate, arm and method; `side_union`: SIDE's synthetic set and
    guided generations together, distinct counts only) and the raw budget curves
    {"n/method": [per replicate]}."""
    rows, curves = [], {}
    for rep in (r for r in reps if r["role"] == "table"):
        x = f"{cfg.out}/extract/{rep['name']}"
        res = load_metrics(x)
        rows += [row(r, rep, m) for m, r in res["methods"].items()]
        for m, c in res.get("curves", {}).items():
            curves.setdefault(f"{rep['n']}/{m}", []).append(c)
        union = res.get("curves", {}).get("side_union")
        if union:  # its last point: the whole budget N_syn + N_G
            rows.append(dict(n_train=rep["n"], method="side_union", arm="table", replicate=rep["r"],
                             n_gen=union[-1]["budget"], distinct_any=union[-1]["distinct_any"],
                             distinct=union[-1]["distinct"]))
        if rep["weak"]:
            rows += [row(r, rep, m, arm="weak")
                     for m, r in load_metrics(f"{x}-weak")["methods"].items()]
        for lab in rep["labelled"]:
            r = load_metrics(f"{x}-{lab}")["methods"]["uncond"]
            rows.append(row(r, rep, "uncond", arm="labelled", labelling=lab))
            # the other reading of "Cond": a class-conditional DDPM, paired by replicate
            if lab == "informative":
                rows.append(row(r, rep, "cond_ddpm"))
        if rep["r"] < p["check_replicates"]:
            res = load_metrics(f"{x}-steps{p['check_steps']}")["methods"]
            rows += [row(res[m], rep, m, arm="steps") for m in CHECK_METHODS.split(",")]
    return rows, curves


def bands_of(cfg, p, device):
    """Pixel-L2 bands calibrated on BAND_REFERENCE images of the data at the working resolution,
    drawn with a seed no replicate uses (metrics.calibrate_l2_bands: every band closer than the
    closest two distinct images of the reference, which holds more images than any training
    set). (--bands string, stats)"""
    seed = seeds_of(cfg.seed, "bands", 0, 0)["data"]
    try:
        ref = data.load_data(cfg.data, p["image_size"], n=BAND_REFERENCE, seed=seed)
    except UserError:  # a source with fewer images: all of them
        ref = data.load_data(cfg.data, p["image_size"], seed=seed)
    bands, stats = metrics.calibrate_l2_bands(ref.images, device=device)
    spec = ",".join(f"{b}={lo:.6g}:{hi:.6g}" for b, (lo, hi) in bands.items())
    # as in JSON
    stats["distinct_nn_percentiles"] = {str(q): v
                                        for q, v in stats["distinct_nn_percentiles"].items()}
    return spec, dict(bands={b: list(v) for b, v in bands.items()}, **stats)


def closest_training_pairs(cfg, p, reps, device):
    """The smallest distance between two distinct images of each replicate's training set (a band
    must not contain one: it would count a different image as a copy)."""
    out = {}
    for rep in (r for r in reps if r["role"] == "table"):
        ds = data.load_data(cfg.data, p["image_size"], n=rep["n"], seed=rep["seeds"]["data"])
        v, i = metrics.knn(ds.images, ds.images, k=2, scale=metrics.PIXEL_SCALE, device=device)
        nn = np.where(i[:, 0] == np.arange(len(v)), v[:, 1], v[:, 0])
        out[rep["name"]] = float(nn[nn > 0].min()) if (nn > 0).any() else None
    return out


def tune(cfg, p, reps, labelled, bands, timer):
    """λ (SIDE) and Carlini Cond's guidance scale, each the best of its sweep on the tuning
    replicate's model (own data sample, weights, synthetic set and generation seed: no reported
    model is tuned on)."""
    rep = next(r for r in reps if r["role"] == "tune")
    s, out = rep["seeds"], f"{cfg.out}/sweeps"
    extra = dict(sweep_lambda=p["sweep_lambda"], sweep_n_gen=p["n_gen"], seed=s["gen"],
                 sweep_seed=s["gen"], syn_seed=s["syn"], curve_points=0)
    if labelled:
        extra["sweep_cond_scale"] = p["sweep_cond"]
    run_jobs([(f"sweeps {rep['name']}", extract_args(cfg, p, f"{rep['model']}/ckpt.pt", out,
                                                     "uncond", bands, **extra))],
             1, timer, f"{cfg.out}/logs")
    chosen = load_metrics(out)["chosen"]
    return dict(lam=chosen["lam"], cond_scale=chosen.get("cond_scale", chosen["lam"]), K=p["K"],
                size=rep["n"], replicate=rep["name"])


def check_data(cfg, p, reps):
    """Everything about the data that can fail, before any training: enough images, and for labelled
    data at least two classes in every training set (Carlini Cond's classifier needs them)."""
    labelled = True
    for rep in reps:
        ds = data.load_data(cfg.data, p["image_size"], n=rep["n"], seed=rep["seeds"]["data"])
        if ds.labels is None:
            print(f"note: {cfg.data} has no labels (no class subfolders): skipping Carlini Cond "
                  "and the conditional-memorization experiment", file=sys.stderr)
            return False
        k = len(np.unique(ds.labels))
        check(k >= 2, f"the training set of {rep['n']} images drawn from {cfg.data} "
              f"({rep['name']}) holds {k} class; Carlini Cond and the informative-label model "
              "need >= 2: use larger --sizes or data with more classes")
    return labelled


def profile_of(cfg):
    p = dict(PROFILES[cfg.profile])
    if cfg.sizes:
        check(len(cfg.epochs) == len(cfg.sizes),
              f"--sizes {','.join(map(str, cfg.sizes))} needs --epochs with one value per size")
        p["sizes"] = cfg.sizes
    if cfg.epochs:
        check(len(cfg.epochs) == len(p["sizes"]),
              f"--epochs needs one value per size ({len(p['sizes'])})")
        p["epochs"] = cfg.epochs
    p.update({k: v for k, v in dict(replicates=cfg.replicates, n_gen=cfg.n_gen).items() if v})
    check(p["replicates"] >= 1 and p["n_gen"] >= 1, "--replicates and --n-gen must be >= 1")
    return p


def check_previous(cfg):
    """A finished run in --out with other settings is refused unless --overwrite (nothing removed
    here)."""
    done = os.path.join(cfg.out, "summary.json")
    if os.path.exists(done) and not cfg.overwrite and not cfg.calibrate:
        try:
            with open(done) as fh:
                old = json.load(fh).get("config", {})
        except (OSError, ValueError) as e:
            raise UserError(f"{done} cannot be read ({e}); remove it or pass --overwrite") from None
        diff = [k for k, v in dataclasses.asdict(cfg).items()
                if k not in ("device", "overwrite") and json.dumps(old.get(k)) != json.dumps(v)]
        check(not diff, f"{cfg.out} holds a finished run with other settings "
              f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); "
              "choose another --out or pass --overwrite to replace it")


def clear_previous(cfg):
    """--overwrite: remove the earlier run's outputs from --out. Called only after every check
    that does not need the work itself (flags, --out, --device, the data), so a refused rerun
    deletes nothing."""
    for name in (("models", "extract", "sweeps", "grids", "logs", "REPORT.md", "summary.json")
                 if cfg.overwrite else ()):
        path = os.path.join(cfg.out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.unlink(path)


# ============================================================= conditional memorization
# SIDE Definition 1's memorization divergence of a DDPM trained unconditionally, with informative
# labels (SIDE Definition 2) and with a random permutation of them (the same classes and class
# sizes; only the label-image association changes), compared by paired differences
# Δ = M(D_j; p_θ(.|j), ε) − M(D_j; p_θ, ε) per label subset (SIDE Theorem 1: Δ <= 0 for an
# informative label in its limit). The bound on log p_θ is ddpm.Diffusion.subchain_nll; the Monte
# Carlo estimator with common random numbers is metrics.divergence_difference (METRICS.md derives
# both).

def _log_prob(model, diffusion, k, n_t, label, device):
    """SIDE Definition 1's callable for a DDPM: log p_θ(x | label) >= -subchain_nll (ddpm.py),
    with its timesteps and forward noise drawn from the generator metrics.py hands it, so the two
    models of a paired comparison see the same draws (common random numbers)."""
    def log_prob(x, g):
        y = (None if label is None
             else torch.full((len(x),), int(label), dtype=torch.long, device=device))
        draw = diffusion.bound_draw(len(x), k, n_t, x.shape[1:], g)
        return -diffusion.subchain_nll(model, x.to(device), k, draw, y=y)
    return log_prob


def _interval(est, se, df):
    return [est - evidence.t975(df) * se, est + evidence.t975(df) * se]  # Student-t 95 % interval


def divergence(cond, uncond, diffusion, x, subsets, eps, n_mc, n_t, device, seed=0):
    """Δ_j = M(D_j; p_θ(.|j), ε_k) − M(D_j; p_θ, ε_k) (SIDE Definition 1) for each label subset
    D_j, the conditional model `cond` given label j against the unconditional `uncond`, paired
    (metrics.divergence_difference); ε_k is the noise level of the step k nearest ε
    (ddpm.Diffusion.level), where the bound of ddpm.subchain_nll starts. M uses a bound on log p,
    so each M is an upper bound; in Δ the two bounds' gaps need not cancel exactly (exact for the
    closed forms of tests/test_divergence.py). Returns per-subset rows and their mean with stderr
    sqrt(Σ s.e.²)/K and a Student-t 95 % interval with n_mc - 1 degrees of freedom (each subset's
    s.e. comes from n_mc Monte Carlo samples)."""
    k, eps_k = diffusion.level(eps)
    per = []
    for j in np.unique(subsets):
        Dj = x[torch.as_tensor(subsets == j)].double().cpu()
        r = metrics.divergence_difference(Dj, eps_k, _log_prob(cond, diffusion, k, n_t, j, device),
                                          _log_prob(uncond, diffusion, k, n_t, None, device), n_mc,
                                          torch.Generator().manual_seed(seed + int(j)),
                                          batch=max(1, min(n_mc, 64)))
        per.append(dict(label=int(j), n=len(Dj), delta=r["diff"], stderr=r["diff_stderr"],
                        ci95=_interval(r["diff"], r["diff_stderr"], n_mc - 1),
                        M_cond=r["M_a"], M_cond_stderr=r["M_a_stderr"],
                        M_uncond=r["M_b"], M_uncond_stderr=r["M_b_stderr"], corr=r["corr"]))
    K = len(per)
    mean = lambda key: float(np.mean([p[key] for p in per]))  # noqa: E731
    comb = lambda key: float(np.sqrt(np.sum([p[key] ** 2 for p in per])) / K)  # noqa: E731
    est, se = mean("delta"), comb("stderr")
    ci = _interval(est, se, n_mc - 1)
    return dict(delta=est, stderr=se, ci95=ci, verdict=label_effect(*ci),
                M_cond=mean("M_cond"), M_cond_stderr=comb("M_cond_stderr"),
                M_uncond=mean("M_uncond"), M_uncond_stderr=comb("M_uncond_stderr"),
                subsets=per, eps=eps, eps_k=eps_k, k=k,
                unet_calls_per_sample=min(n_t, diffusion.top() - k), n_mc=n_mc, unit="nats",
                upper_bound=True)


def label_divergence(p, cfg, reps, device):
    """Unconditional vs informative-label vs permuted-label DDPMs at the smallest size, in every
    replicate (its own training sample and three models, the same seeds but for the labels): per
    labelling, the paired difference Δ = M(D_j; p_θ(.|j)) − M(D_j; p_θ) of Definition 1 averaged
    over label subsets, per replicate with its Monte Carlo interval, over replicates with a
    Student-t 95 % interval, and by label-subset size |D_j| (SIDE Theorem 1: Δ <= 0 for an
    informative label, the more so the smaller and purer D_j). Profile knobs: div_mc samples of
    q_ε per subset, div_t timestep strata per sample (= UNet calls per sample and model)."""
    torch.set_num_threads(os.cpu_count() or 1)
    units = [_unit(p, cfg, rep, device) for rep in reps if rep["labelled"]]
    rows = []
    for name in ("none", "informative", "permuted"):
        r = dict(labelling=name)
        # M of the unconditional model on the informative and on the permuted subsets
        if name == "none":
            for key, part in (("divergence", "informative"),
                              ("divergence_permuted_subsets", "permuted")):
                r[key] = _over_units([u[part] for u in units], "M_uncond")
        else:
            per = [u[name] for u in units]
            r["divergence"] = _over_units(per, "M_cond")
            est, lo, hi = evidence.mean_ci([d["delta"] for d in per])
            # one replicate: its Monte Carlo interval
            lo, hi = (lo, hi) if len(per) > 1 else per[0]["ci95"]
            r["delta"] = dict(delta=est, ci95=[lo, hi], verdict=label_effect(lo, hi), units=per,
                              n_units=len(per), per_replicate=[d["delta"] for d in per],
                              by_size=_by_size(per),
                              **{k: per[0][k] for k in ("eps", "eps_k", "k",
                                                        "unet_calls_per_sample", "n_mc", "unit")})
        rows.append(r)
    return rows


def _by_size(per):
    """Δ by label-subset size |D_j|: over the replicates that have subsets of that size, the mean
    of each replicate's mean Δ at that size, with a Student-t interval (one replicate: no
    interval)."""
    sizes = sorted({s["n"] for d in per for s in d["subsets"]})
    out = []
    for n in sizes:
        vals = [float(np.mean([s["delta"] for s in d["subsets"] if s["n"] == n])) for d in per
                if any(s["n"] == n for s in d["subsets"])]
        m, lo, hi = evidence.mean_ci(vals)
        out.append(dict(size=n, replicates=len(vals),
                        subsets=sum(s["n"] == n for d in per for s in d["subsets"]),
                        delta=m, ci95=[lo, hi]))
    return out


def _over_units(per, key):
    """M of one model kind, averaged over replicates (each an upper bound; nats)."""
    return dict(estimate=float(np.mean([d[key] for d in per])), per_unit=[d[key] for d in per],
                eps_k=per[0]["eps_k"], upper_bound=True)


def _unit(p, cfg, rep, device):
    """{labelling: divergence(...)} of one replicate's three models on its training sample."""
    paths = {"none": rep["model"], **rep["labelled"]}
    loaded = {k: models.load_model(f"{v}/ckpt.pt", device) for k, v in paths.items()}
    diffusion = loaded["none"][1]
    tcfg, rcfg = (loaded[k][2].checkpoint["config"] for k in ("none", "permuted"))
    for name in ("informative", "permuted"):
        check((loaded[name][1].T, loaded[name][1].schedule) == (diffusion.T, diffusion.schedule),
              f"{paths[name]} has another noise schedule than {paths['none']}; "
              "retrain the three models together")
    ds = data.load_data(cfg.data, tcfg["image_size"], n=rep["n"], seed=tcfg["data_seed"])
    x = data.to_tensor(ds.images)
    # the permuted model's labels, as train.py drew them from its seed
    parts = {"informative": ds.labels, "permuted": data.permuted_labels(ds.labels, rcfg["seed"])}
    return {name: divergence(loaded[name][0], loaded["none"][0], diffusion, x, parts[name], cfg.eps,
                             p["div_mc"], p["div_t"], device, seed=rep["seeds"]["syn"])
            for name in parts}


def main(argv=None):
    cfg = parse_config(ReproduceConfig, argv, __doc__.split("\n\n")[0])
    p = profile_of(cfg)
    cfg = dataclasses.replace(cfg, data=cfg.data or p["data"])
    check_writable(cfg.out, "--out")
    check_previous(cfg)
    device = resolve_device(cfg.device)
    if cfg.calibrate:
        return calibrate(cfg, p, Timer(), p["jobs"] if device.type == "cpu" else 1)
    reps = plan(cfg, p, labelled=True)
    evidence.check_independent(reps)
    labelled = check_data(cfg, p, reps)
    reps = reps if labelled else plan(cfg, p, labelled=False)
    # the flags of every train job differ only in validated numbers
    check_train_flags(train_args(cfg, p, reps[0]))
    parse_config(extract.ExtractConfig,
                 extract_args(cfg, p, "ckpt.pt", cfg.out, "side", "")[1:], "")
    clear_previous(cfg)  # --overwrite: only now, after every check above
    parallel = p["jobs"] if device.type == "cpu" else 1
    timer, out, sizes = Timer(), cfg.out, list(p["sizes"])
    os.makedirs(f"{out}/logs", exist_ok=True)
    bands, band_stats = timer("pixel-L2 bands", lambda: bands_of(cfg, p, device))
    band_stats["closest_training_pairs"] = closest_training_pairs(cfg, p, reps, device)
    run_jobs(train_jobs(cfg, p, reps), parallel, timer, f"{out}/logs")
    chosen = timer("sweeps", lambda: tune(cfg, p, reps, labelled, bands, timer))
    run_jobs(attack_jobs(cfg, p, reps, chosen, bands), parallel, timer, f"{out}/logs")
    rows, curves = collect(cfg, p, reps)
    cond = (timer("conditional memorization: divergence",
                  lambda: label_divergence(p, cfg, reps, device)) if labelled else [])
    thm = timer("theorem 1 check", lambda: metrics.theorem1_check())
    rand = timer("random-label check", lambda: metrics.random_label_check())
    cs = {k: evidence.curve_summary(v) for k, v in curves.items()}
    weak_n = next((r["n"] for r in reps if r["weak"]), None)
    verdict = evidence.verdict(rows, cs, cond, sizes, weak_n,
                             steps=(p["sample_steps"], p["check_steps"]),
                             cond_is_uncond=labelled and chosen["cond_scale"] == 0)
    stats = dict(table=evidence.summarize_table(rows, sizes),
                 weak=evidence.summarize_table(rows, sizes, "weak"), curves=cs)
    grids = copy_pictures(out, reps)
    for n in sizes:
        curve_plot(f"{out}/curve_n{n}.png", cs, n, p["n_syn"])
    summary = dict(total_seconds=time.time() - timer.t0, device=str(device), profile=cfg.profile,
                   data=cfg.data, base_seed=cfg.seed, hardware=hardware(), chosen=chosen,
                   bands=band_stats,
                   replicates=[{k: r[k] for k in ("name", "role", "n", "r", "seeds", "weak")}
                               for r in reps],
                   rows=rows, stats=stats, curves=curves, verdict=verdict, conditional=cond,
                   theorem1=thm, random_label_check=rand,
                   sweeps={k: extract.load_sweep(f"{out}/sweeps", k)
                           for k in ("lambda", "cond_scale")},
                   commands={rep["name"]:
                             " ".join(["python"] + attack_jobs(cfg, p, [rep], chosen, bands)[0][1])
                             for rep in reps if rep["role"] == "table" and rep["r"] == 0},
                   stage_seconds=timer.t, parallel_jobs=parallel, config=dataclasses.asdict(cfg),
                   profile_settings=p)
    atomic_write_json(f"{out}/summary.json", summary)
    atomic_write_text(f"{out}/REPORT.md", reproduce_report(summary, grids, PAPER_TABLE1))
    print(f"wrote {out}/REPORT.md and {out}/summary.json in {summary['total_seconds']:.0f}s",
          file=sys.stderr)
    return summary


def copy_pictures(out, reps):
    """Replicate 0's match grids of each size, and the sweep plots, into OUT."""
    grids = []
    os.makedirs(f"{out}/grids", exist_ok=True)
    for rep in (r for r in reps if r["role"] == "table" and r["r"] == 0):
        x = f"{out}/extract/{rep['name']}"
        for m in load_metrics(x)["methods"]:
            if os.path.exists(f"{x}/grids/{m}.png"):
                shutil.copy(f"{x}/grids/{m}.png", f"{out}/grids/n{rep['n']}_{m}.png")
                grids.append(f"grids/n{rep['n']}_{m}.png")
    for name in ("lambda", "cond_scale"):
        if os.path.exists(f"{out}/sweeps/sweep_{name}.png"):
            shutil.copy(f"{out}/sweeps/sweep_{name}.png", f"{out}/sweep_{name}.png")
    return grids


def calibrate(cfg, p, timer, parallel):
    """Train every size to the largest of calib_epochs, keeping its checkpoint at each budget
    (train.py --keep; a run resumed from a budget is the same run), and sample each kept
    checkpoint plainly: the share of its training images reached per band, printed and saved.
    One replicate per size, with seeds of its own role. A rerun reuses what is done (train.py and
    extract.py refuse a folder made with other settings); --overwrite starts afresh."""
    out, rows, epochs = cfg.out, [], p["calib_epochs"]
    clear_previous(cfg)
    os.makedirs(out, exist_ok=True)
    bands, _ = bands_of(cfg, p, resolve_device(cfg.device))
    reps = {n: dict(name=f"n{n}", n=n, r=0, seeds=seeds_of(cfg.seed, "calibrate", n, 0), weak=None,
                    model=f"{out}/models/n{n}", epochs=max(epochs),
                    keep=tuple(steps_of(p, n, e) for e in epochs)) for n in p["sizes"]}
    run_jobs([(f"train n{n}", ["train.py", *train_args(cfg, p, rep)]) for n, rep in reps.items()],
             parallel, timer, f"{out}/logs")
    for e in epochs:
        runs = {n: f"{out}/extract/n{n}-e{e:g}" for n in p["sizes"]}
        run_jobs([(f"sample n{n} e{e:g}",
                   extract_args(cfg, p, f"{reps[n]['model']}/ckpt-{steps_of(p, n, e)}.pt", run,
                                "uncond", bands, seed=reps[n]["seeds"]["gen"], curve_points=0))
                  for n, run in runs.items()], parallel, timer, f"{out}/logs")
        for n, run in runs.items():
            r = load_metrics(run)["methods"]["uncond"]
            rows.append(dict(n_train=n, epochs=e, n_gen=r["n_generated"],
                             distinct_any=r["distinct_any"], share_any=r["distinct_any"] / n,
                             share={b: v / n for b, v in r["distinct"].items()}))
            print(f"calibrate n={n} epochs={e:g}: plain sampling (N_G={r['n_generated']}) reached "
                  f"{r['distinct_any']}/{n} = {100 * r['distinct_any'] / n:.0f}% of the training "
                  "images in some band; per band "
                  + " ".join(f"{b} {100 * v / n:.0f}%" for b, v in r["distinct"].items()),
                  flush=True)
    atomic_write_json(f"{out}/calibration.json", dict(rows=rows, bands=bands, profile_settings=p,
                                                      seconds=time.time() - timer.t0))
    atomic_write_text(f"{out}/CALIBRATION.md", calibration_report(rows))
    return rows


def hardware():
    return dict(machine=platform.machine(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                python=platform.python_version())


if __name__ == "__main__":
    run_main(main)
