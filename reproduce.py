"""The paper's experiments in miniature, with seeds and intervals: `make reproduce` (PROFILE=smoke|cpu|gpu).

    python reproduce.py --profile cpu --out results            # the README's table, on a 2-core CPU
    python reproduce.py --profile cpu --seed 1 --out results1  # the same protocol from another base seed
    python reproduce.py --profile cpu --calibrate --out cal    # how the training budgets were chosen
    python reproduce.py --profile gpu --data /path/to/celeba   # larger images and sets, one GPU

1. Table 1 of the paper: for several training-set sizes of one source, an unconditional DDPM
   (train.py) trained for a per-size budget in epochs, chosen (--calibrate) so that plain sampling
   reaches part of the training set, never none and never all; then Carlini UnCond, Carlini Cond and
   SIDE (Alg. 1) at equal N_G, sampler and steps (extract.py), plus SIDE with random surrogate labels
   (control), plain sampling given SIDE's whole budget N_syn + N_G (compute-matched) and, at one size,
   the class-conditional DDPM trained on the true labels (the other reading of "Cond").
2. Repetition: several units per size, each with its own training sample (nested across sizes), its
   own trained model and its own attack (synthetic set, clustering, classifiers, generations).
   Figures are means with 95 % intervals over these units; claims are paired ratios with intervals,
   labelled holds / does not hold / undecided (evidence.py).
3. SIDE's λ and Carlini Cond's guidance scale are each chosen by a sweep on a separate generation
   seed of one size, never on the reported generations.
4. Extraction versus budget: distinct training images found as a function of the samples drawn.
5. Conditional memorization (Definition 1, Theorem 1): the same DDPM trained unconditionally,
   with informative labels and with random labels; AMS/UMS and the memorization divergence M.
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
from conditional import conditional
from sweeps import load_sweep
from common import (UserError, atomic_write_json, atomic_write_text, check, check_writable, option, parse_config, resolve_device,
                    run_main)
from report import calibration_report, curve_plot, reproduce_report

# Each profile: data and model, per-size training budget in epochs, attack settings, repetitions.
PROFILES = {
    "smoke": dict(image_size=8, sizes=(8, 16), epochs=(300, 150), batch=16, base=16, mults=(1, 2), attn_res=(4,), T=100,
                  n_gen=32, n_syn=64, K=4, sweep_lambda=(0.0, 3.0), sweep_cond=(1.0, 3.0), sample_steps=10, clf_steps=40,
                  seeds=2, cond_size=8, div_mc=8, div_t=16, calib_epochs=(50, 150), jobs=2),
    # 8 px: 16 px did not memorize within a CPU budget. 700 epochs (= steps, batch min(128, n)): `make calibrate`
    # put every size at 23-38 % of its images reached (500: none; 1,000: 94-97 %); README "How the budgets were chosen"
    "cpu": dict(image_size=8, sizes=(16, 32, 64), epochs=(700, 700, 700), batch=128, base=32, mults=(1, 2),
                attn_res=(4,), T=1000, n_gen=512, n_syn=512, K=16, sweep_lambda=(1.0, 3.0, 10.0),
                sweep_cond=(1.0, 3.0, 10.0), sample_steps=40, clf_steps=250, seeds=3, cond_size=16,
                div_mc=16, div_t=32, calib_epochs=(500, 600, 700, 800, 1000), jobs=2),
    # not run here (no GPU in this project's sessions so far); sizes and epochs are a starting point for
    # --calibrate on the GPU; pass --data /path/to/celeba for real faces
    "gpu": dict(image_size=32, sizes=(256, 512, 1024), epochs=(1500, 1500, 1500), batch=128, base=64, mults=(1, 2, 2),
                attn_res=(16,), T=1000, n_gen=1024, n_syn=1024, K=32, sweep_lambda=(1.0, 3.0, 10.0),
                sweep_cond=(1.0, 3.0, 10.0), sample_steps=50, clf_steps=1000, seeds=3, cond_size=256,
                div_mc=64, div_t=100, calib_epochs=(500, 1000, 1500, 3000), jobs=1),
}
TRAIN_FIXED = dict(schedule="cosine", prediction="eps", lr=2e-3)  # calibration: memorized sooner than linear/v
PAPER_TABLE1 = [  # arXiv 2410.02467v7 Table 1, low band [0.4, 0.5) of SSCD similarity, %
    ("CelebA-HQ-FI (~4-5k)", dict(uncond=11.66, cond=15.01, side=23.27), None),
    ("CelebA-25000", dict(uncond=5.00, cond=8.71, side=20.53), dict(uncond=4.24, cond=6.80, side=11.45)),
    ("CelebA (full)", dict(uncond=1.95, cond=4.68, side=7.19), None),
]
TABLE_METHODS = "uncond,cond,side,side_random,uncond_budget"


@dataclass
class ReproduceConfig:
    profile: str = option("cpu", "sizes, budgets and repetitions: smoke (a test), cpu (the README's table), gpu", choices=list(PROFILES))
    out: str = option("results", "output folder: REPORT.md, summary.json, PNGs, models/, extract/", nonempty=True)
    data: str = option("faces", "faces (built-in) or an image folder / .npz (e.g. CelebA) used in its place", nonempty=True)
    seed: int = option(0, "base seed: the data sample, every training seed and every attack seed derive from it", lo=0)
    sizes: tuple = option((), "training-set sizes (override the profile; then --epochs too)", elem=int, lo=2)
    epochs: tuple = option((), "training epochs per size (override the profile)", elem=float, gt=0.0)
    seeds: int = option(0, "attack seeds per model (0 = profile; >= 2 for an interval)", lo=0)
    n_gen: int = option(0, "N_G per method (0 = profile)", lo=0)
    calibrate: bool = option(False, "instead of the reproduction: train each size for the profile's calib_epochs and "
                                   "print the share of its training images plain sampling reaches")
    eps: float = option(0.05, "ε of Definition 1 on the [-1,1] pixel scale (small next to the 0.2 typical train-to-train NN distance)", gt=0.0)
    device: str = option("auto", "auto, cpu or cuda", nonempty=True)
    overwrite: bool = option(False, "replace a finished run in --out made with other settings (without it that is refused)")


class Stages:
    """Wall time of each named stage (parallel jobs overlap: their times do not add up to the total)."""

    def __init__(self):
        self.t, self.t0 = {}, time.time()

    def __call__(self, name, fn):
        t0 = time.time()
        print(f"== {name}", file=sys.stderr, flush=True)
        out = fn()
        self.t[name] = self.t.get(name, 0.0) + time.time() - t0
        return out


def flags(d):
    return [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in d.items()]


def seeds_of(base, i):
    """The seeds of unit i under base seed `base`: (training-set sample, training, attack generations,
    attacker's synthetic set). Every unit draws its own training set, model and attack, so the
    intervals over units include data-to-data and model-to-model variation, not only the attacker's."""
    return 1000 * base + i, 1000 * base + i, 1000 * base + 100 + i, 1000 * base + 200 + i


def train_job(p, cfg, n, epochs, labels, out, train_seed, data_seed):
    """(name, argv) of one train.py run for `epochs` passes over n images; resumable, never retrained.
    The batch is min(profile batch, n), so a set no larger than the batch gets one optimiser step per
    epoch: at a fixed batch a small set would get few steps, and steps, not epochs, set how far a DDPM
    memorizes (calibration: at batch 128 and 1,000 epochs, 54 % of 128 faces were reached and none of 32)."""
    batch = min(p["batch"], n)
    steps = max(1, math.ceil(epochs * n / batch))
    args = dict(out=out, data=cfg.data, n_train=n, data_seed=data_seed, image_size=p["image_size"], labels=labels,
                base=p["base"], mults=p["mults"], attn_res=p["attn_res"], T=p["T"], steps=steps, batch=batch,
                seed=train_seed, sample_n=16, sample_steps=p["sample_steps"], device=cfg.device, resume=True,
                log_every=30, **TRAIN_FIXED)
    return f"train {os.path.basename(out)}", ["train.py", *flags(args)]


def extract_job(p, cfg, ckpt, out, methods, name, **extra):
    args = dict(ckpt=ckpt, out=out, methods=methods, n_gen=p["n_gen"], n_syn=p["n_syn"], K=p["K"],
                sample_steps=p["sample_steps"], clf_steps=p["clf_steps"], batch=min(256, p["n_gen"]), device=cfg.device)
    args.update(extra)
    return name, ["extract.py", *flags(args)]


def check_train_flags(argv):
    """train.py's own check of a train job's flags (`train.py --dry-run` in a subprocess, so that this
    orchestrator does not import the trainer): its one error line as a UserError."""
    r = subprocess.run([sys.executable, *argv, "--dry-run"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["train.py failed"])[-1]
        raise UserError(f"train.py {last.removeprefix('error: ')}")


def run_jobs(jobs, parallel, st, log_dir):
    """Run (name, argv) script jobs, `parallel` at a time. With more than one at a time each gets one
    thread: two torch processes with all threads each on 2 cores collapse each other's throughput."""
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if parallel > 1 else {}))
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, argv = pending.pop(0)
            log = os.path.join(log_dir, name.replace(" ", "_").replace("=", "").replace("/", "_") + ".log")
            print(f"== {name} (log: {log})", file=sys.stderr, flush=True)
            fh = open(log, "w")
            proc = subprocess.Popen([sys.executable, *argv], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                    cwd=os.path.dirname(os.path.abspath(__file__)))
            running.append((name, proc, fh, log, time.time()))
        time.sleep(0.2)
        for job in list(running):
            name, proc, fh, log, t0 = job
            if proc.poll() is None:
                continue
            running.remove(job)
            fh.close()
            st.t[name] = time.time() - t0
            if proc.returncode != 0:
                for other in running:
                    other[1].kill()
                tail = [ln for ln in open(log).read().splitlines() if ln.strip()][-1:] or ["(no output)"]
                raise UserError(f"{name} failed (exit {proc.returncode}): {tail[0]} (full log: {log}); "
                                "fix it and rerun: finished stages are reused")


def load_metrics(out):
    with open(os.path.join(out, "metrics.json")) as fh:
        return json.load(fh)


def row(r, n_train, method, **unit):
    """One summary.json row from extract's per-method metrics; `unit` names the repetition."""
    hits = {b: round(v * r["n_generated"] / 100) for b, v in r["ams"].items()}
    return dict(n_train=n_train, method=method, n_gen=r["n_generated"], ams=r["ams"], ums=r["ums"],
                distinct=r["distinct"], distinct_any=r["distinct_any"], ams_any=r["ams_any"],
                hits_any=sum(hits.values()), p95=r["p95"], carlini_extracted=r["carlini_extracted"],
                yoon_extracted=r["yoon_extracted"], **unit)


def check_data(cfg, p, sizes):
    """Everything about the data that can fail, before any training: enough images, and for labelled
    data at least two classes in every training set (Carlini Cond's classifier needs them)."""
    need = max(sizes + [p["cond_size"]])
    for i in range(p["seeds"]):
        ds = data.load_data(cfg.data, p["image_size"], n=need, seed=seeds_of(cfg.seed, i)[0])
        if ds.labels is None:
            print(f"note: {cfg.data} has no labels (no class subfolders): skipping Carlini Cond and the "
                  "conditional-memorization experiment", file=sys.stderr)
            return False
        for n in sorted(set(sizes + [p["cond_size"]])):
            k = len(np.unique(ds.labels[:n]))  # the sample of n is the first n of the same permutation
            check(k >= 2, f"the training set of {n} images drawn from {cfg.data} (unit {i}) holds {k} class; Carlini "
                  "Cond and the informative-label model need >= 2: use larger --sizes or data with more classes")
    return True


def profile_of(cfg):
    p = dict(PROFILES[cfg.profile])
    if cfg.sizes:
        check(len(cfg.epochs) == len(cfg.sizes), f"--sizes {','.join(map(str, cfg.sizes))} needs --epochs with one "
              "value per size")
        p["sizes"], p["cond_size"] = cfg.sizes, min(cfg.sizes)
    if cfg.epochs:
        check(len(cfg.epochs) == len(p["sizes"]), f"--epochs needs one value per size ({len(p['sizes'])})")
        p["epochs"] = cfg.epochs
    p.update({k: v for k, v in dict(seeds=cfg.seeds, n_gen=cfg.n_gen).items() if v})
    check(min(p["sizes"]) >= 2 and min(p["epochs"]) > 0, "--sizes must be >= 2 and --epochs > 0")
    check(p["seeds"] >= 1 and p["n_gen"] >= 1, "--seeds and --n-gen must be >= 1")
    check(cfg.eps > 0, f"--eps {cfg.eps} must be > 0")
    return p


def main(argv=None):
    cfg = parse_config(ReproduceConfig, argv, __doc__.split("\n\n")[0])
    p = profile_of(cfg)
    check_train_flags(train_job(p, cfg, p["sizes"][0], p["epochs"][0], "none", cfg.out, 0, 0)[1])  # before any work;
    parse_config(extract.ExtractConfig, extract_job(p, cfg, "ckpt.pt", cfg.out, "side", "check")[1][1:], "")  # (sizes
    # differ only in --n-train and --steps, which profile_of and train_job keep >= 1)
    check_writable(cfg.out, "--out")
    done = os.path.join(cfg.out, "summary.json")  # a finished run there: the same settings resume, others are refused
    if os.path.exists(done) and not cfg.overwrite and not cfg.calibrate:
        with open(done) as fh:
            old = json.load(fh).get("config", {})
        diff = [k for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "overwrite") and json.dumps(old.get(k)) != json.dumps(v)]
        check(not diff, f"{cfg.out} holds a finished run with other settings ({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); "
              "choose another --out or pass --overwrite to replace it")
    device = resolve_device(cfg.device)
    parallel = p["jobs"] if device.type == "cpu" else 1
    st, out, sizes = Stages(), cfg.out, list(p["sizes"])
    labelled = check_data(cfg, p, sizes)
    clear_previous(cfg)  # --overwrite: only now, after every check above (flags, paths, device, data)
    os.makedirs(out, exist_ok=True)
    if cfg.calibrate:
        return calibrate(cfg, p, st, parallel)
    trained, jobs = plan_models(cfg, p, sizes, labelled)
    run_jobs(jobs, parallel, st, f"{out}/logs")
    chosen = st("sweeps", lambda: sweeps(cfg, p, trained, sizes, labelled, st))
    units = plan_units(cfg, p, trained, sizes, labelled, chosen)
    run_jobs([u["job"] for u in units], parallel, st, f"{out}/logs")
    rows, curves = collect(units, labelled, p)
    cond_rows = st("conditional memorization: divergence", lambda: conditional(p, cfg, trained, device)) if labelled else []
    thm = st("theorem 1 check", lambda: metrics.theorem1_check())
    rand = st("random-label check", lambda: metrics.random_label_check())
    stats, verdict = evidence_of(rows, curves, sizes, p)
    grids = copy_pictures(out, units)
    for n in sizes:
        curve_plot(f"{out}/curve_n{n}.png", stats["curves"], n, p["n_syn"])
    summary = dict(total_seconds=time.time() - st.t0, device=str(device), profile=cfg.profile, data=cfg.data,
                   base_seed=cfg.seed, hardware=hardware(), chosen=chosen, rows=rows, stats=stats, curves=curves,
                   verdict=verdict, conditional=cond_rows, theorem1=thm, random_label_check=rand,
                   sweeps={k: load_sweep(f"{out}/sweeps", k) for k in ("lambda", "cond_scale")},
                   commands={f"n={u['n']}": " ".join(["python"] + u["job"][1]) for u in units
                             if u["unit"] == 0 and u["train_seed"] == 0 and u["kind"] == "table"},
                   stage_seconds=st.t, parallel_jobs=parallel, config=dataclasses.asdict(cfg), profile_settings=p)
    atomic_write_json(f"{out}/summary.json", summary)
    atomic_write_text(f"{out}/REPORT.md", reproduce_report(summary, grids, PAPER_TABLE1))
    print(f"wrote {out}/REPORT.md and {out}/summary.json in {summary['total_seconds']:.0f}s", file=sys.stderr)
    return summary


def clear_previous(cfg):
    """--overwrite: remove the earlier run's outputs from --out. Called only after every check that does
    not need the work itself (flags, --out, --device, the data), so a refused rerun deletes nothing."""
    for name in ("models", "extract", "sweeps", "grids", "logs", "REPORT.md", "summary.json") if cfg.overwrite else ():
        path = os.path.join(cfg.out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.unlink(path)


def plan_models(cfg, p, sizes, labelled):
    """{key: model folder} and the training jobs: for every unit i, a model of every size (each on the
    unit's own nested training sample) and the informative- and random-label models at cond_size."""
    nc, out = p["cond_size"], cfg.out
    epochs = dict(zip(sizes, p["epochs"]))
    epochs.setdefault(nc, epochs[min(sizes, key=lambda s: abs(s - nc))])
    trained, jobs = {}, []
    for i in range(p["seeds"]):
        data_seed, train_seed = seeds_of(cfg.seed, i)[:2]
        for n in sorted(set(sizes) | ({nc} if labelled else set())):
            trained[(n, i)] = f"{out}/models/n{n}-u{i}"
            jobs.append(train_job(p, cfg, n, epochs[n], "none", trained[(n, i)], train_seed, data_seed))
        for lab, name in (("true", "informative"), ("random", "random")) if labelled else ():
            trained[(name, i)] = f"{out}/models/n{nc}-{name}-u{i}"
            jobs.append(train_job(p, cfg, nc, epochs[nc], lab, trained[(name, i)], train_seed, data_seed))
    trained["tune"], trained["cond_size"] = sizes[len(sizes) // 2], nc
    return trained, jobs


def sweeps(cfg, p, trained, sizes, labelled, st):
    """λ (SIDE) and the guidance scale of Carlini Cond, each the best of its sweep on the middle size's
    model, with a generation seed and a synthetic set that no reported unit uses."""
    tune, out = trained["tune"], cfg.out
    base = 1000 * cfg.seed + 999
    extra = dict(sweep_lambda=p["sweep_lambda"], sweep_n_gen=max(p["n_gen"] // 2, 1), seed=base, sweep_seed=base,
                 syn_seed=base, curve_points=0)
    if labelled:
        extra["sweep_cond_scale"] = p["sweep_cond"]
    run_jobs([extract_job(p, cfg, f"{trained[(tune, 0)]}/ckpt.pt", f"{out}/sweeps", "uncond", f"sweeps n{tune}",
                          n_gen=max(p["n_gen"] // 2, 1), **extra)], 1, st, f"{out}/logs")
    chosen = load_metrics(f"{out}/sweeps")["chosen"]
    return dict(lam=chosen["lam"], cond_scale=chosen.get("cond_scale") or chosen["lam"], K=p["K"], size=tune)


def plan_units(cfg, p, trained, sizes, labelled, chosen):
    """One extraction job per unit and model: the Table-1 methods on the unconditional models, and plain
    sampling of the informative- and random-label models (conditional experiment)."""
    units, nc = [], trained["cond_size"]
    models_ = [(k, v) for k, v in trained.items() if isinstance(k, tuple)]
    for (n, i), path in sorted(models_, key=lambda kv: (isinstance(kv[0][0], str), str(kv[0][0]).zfill(9), kv[0][1])):
        gen_seed, syn_seed = seeds_of(cfg.seed, i)[2:]
        kind = "table" if n in sizes else f"cond-{n}" if isinstance(n, str) else "cond-none"
        run = f"{cfg.out}/extract/{os.path.basename(path)}"
        if kind == "table":
            job = extract_job(p, cfg, f"{path}/ckpt.pt", run, TABLE_METHODS if labelled else TABLE_METHODS.replace("cond,", ""),
                              f"extract {os.path.basename(path)}", seed=gen_seed, syn_seed=syn_seed, lam=chosen["lam"],
                              cond_scale=chosen["cond_scale"])
        else:
            job = extract_job(p, cfg, f"{path}/ckpt.pt", run, "uncond", f"extract {os.path.basename(path)}",
                              seed=gen_seed, curve_points=0)
        units.append(dict(n=nc if isinstance(n, str) else n, train_seed=i, unit=i, kind=kind, run=run, job=job))
    return units


def collect(units, labelled, p):
    """summary rows (one per unit and method; `side_union`: SIDE's synthetic set and guided generations
    together, distinct images only) and the raw budget curves {(n, method): [per-unit curve]}."""
    rows, curves = [], {}
    for u in units:
        res = load_metrics(u["run"])
        tag = dict(train_seed=u["train_seed"], unit=u["unit"])
        if u["kind"] == "table":
            rows += [row(r, u["n"], m, **tag) for m, r in res["methods"].items()]
            for m, c in res.get("curves", {}).items():
                curves.setdefault(f"{u['n']}/{m}", []).append(c)
            union = res.get("curves", {}).get("side_union")
            if union:  # its last point: the whole budget N_syn + N_G
                rows.append(dict(n_train=u["n"], method="side_union", n_gen=union[-1]["budget"],
                                 distinct_any=union[-1]["distinct_any"], distinct=union[-1]["distinct"], **tag))
        elif u["kind"] == "cond-informative":  # the other reading of "Cond": a class-conditional DDPM
            rows.append(row(res["methods"]["uncond"], u["n"], "cond_ddpm", **tag))
        if u["kind"].startswith("cond-"):
            rows.append(dict(row(res["methods"]["uncond"], u["n"], "uncond", **tag), labelling=u["kind"][5:]))
    return rows, curves


def evidence_of(rows, curves, sizes, p):
    """Per (size, method) means and intervals, per (size, method) curve summaries, and the verdict."""
    table = [r for r in rows if "labelling" not in r]
    stats = {}
    for n in sizes:
        for m in sorted({r["method"] for r in table if r["n_train"] == n} - {"side_union"}):
            stats[f"{n}/{m}"] = evidence.summarize([r for r in table if r["n_train"] == n and r["method"] == m])
    cs = {k: evidence.curve_summary(v) for k, v in curves.items()}
    return dict(table=stats, curves=cs), verdict_claims(table, cs, sizes)


def _paired(table, a, b, field, sizes):
    """Values of methods a and b for the units (size, training seed, attack seed) that have both."""
    by = {(r["n_train"], r["train_seed"], r["unit"], r["method"]): r[field] for r in table if field in r}
    keys = sorted({k[:3] for k in by if k[0] in sizes and k[3] == a and k[:3] + (b,) in by})
    return [by[k + (a,)] for k in keys], [by[k + (b,)] for k in keys]


def verdict_claims(table, cs, sizes):
    """The paper's claims, each a paired ratio over every unit of every size, with its interval."""
    names = dict(uncond="Carlini UnCond", cond="Carlini Cond (classifier on the true labels)",
                 cond_ddpm="a class-conditional DDPM on the true labels (Cond, other reading)",
                 side_random="SIDE with random surrogate labels (control)",
                 uncond_budget="UnCond with SIDE's whole budget N_syn + N_G (compute-matched)")
    out = []
    specs = [("side", "uncond", "distinct_any", 1.0), ("side", "uncond", "distinct_any", 1.5),
             ("side", "uncond", "hits_any", 1.0), ("side", "cond", "distinct_any", 1.0),
             ("side", "cond_ddpm", "distinct_any", 1.0), ("side", "side_random", "distinct_any", 1.0),
             ("side", "uncond_budget", "distinct_any", 1.0), ("side_union", "uncond_budget", "distinct_any", 1.0)]
    what = dict(distinct_any="distinct training images reached (any band, UMS)",
                hits_any="generations that hit a training image (any band, AMS)")
    for a, b, f, thr in specs:
        va, vb = _paired(table, a, b, f, sizes)
        if len(va) < 2:
            continue
        r, lo, hi = evidence.paired_ratio(va, vb)
        if max(va + vb) == 0:  # nothing extracted at all: a ratio of 1 says nothing
            lo = hi = None
        verb = "at least 1.5x (the paper: over 50 % more)" if thr == 1.5 else "more"
        who = "SIDE counting its synthetic set too (N_syn + N_G samples)" if a == "side_union" else "SIDE"
        out.append(evidence.claim(f"{who} {verb} than {names[b]}: {what[f]}", r, lo, hi, thr, units=len(va)))
    for n in sizes:  # per size: SIDE vs plain sampling
        va, vb = _paired(table, "side", "uncond", "distinct_any", [n])
        if len(va) >= 2:
            out.append(evidence.claim(f"n={n}: SIDE more than Carlini UnCond (distinct, any band)",
                                      *evidence.paired_ratio(va, vb), 1.0, units=len(va)))
    small, large = min(sizes), max(sizes)
    a = [r["hits_any"] for r in table if r["n_train"] == small and r["method"] == "uncond"]
    b = [r["hits_any"] for r in table if r["n_train"] == large and r["method"] == "uncond"]
    if min(len(a), len(b)) >= 2:
        out.append(evidence.claim(f"smaller sets leak more: UnCond hit rate at n={small} above n={large} "
                                  "(at each size's calibrated budget)", *evidence.unpaired_ratio(a, b), 1.0))
    for n in sizes:
        u, s = cs.get(f"{n}/uncond_budget"), cs.get(f"{n}/side_union")
        if u and s:
            out.append(dict(claim=f"n={n}: budget from which SIDE (synthetic set + guided) stays ahead of plain "
                                  "sampling, by mean distinct images", budget=evidence.overtake(s, u)))
    return out


def copy_pictures(out, units):
    """The first unit's match grids of each size, and the sweep plots, into OUT."""
    grids = []
    os.makedirs(f"{out}/grids", exist_ok=True)
    for u in units:
        if u["kind"] != "table" or u["unit"] != 0 or u["train_seed"] != 0:
            continue
        for m in load_metrics(u["run"])["methods"]:
            src = f"{u['run']}/grids/{m}.png"
            if os.path.exists(src):
                shutil.copy(src, f"{out}/grids/n{u['n']}_{m}.png")
                grids.append(f"grids/n{u['n']}_{m}.png")
    for name in ("lambda", "cond_scale"):
        if os.path.exists(f"{out}/sweeps/sweep_{name}.png"):
            shutil.copy(f"{out}/sweeps/sweep_{name}.png", f"{out}/sweep_{name}.png")
    return grids


def calibrate(cfg, p, st, parallel):
    """Train every size in stages to each of calib_epochs (a stop and --resume is the same run) and
    sample each stage plainly: the share of its training images reached per band, printed and saved."""
    out, rows = cfg.out, []
    for e in p["calib_epochs"]:
        run_jobs([train_job(p, cfg, n, e, "none", f"{out}/models/n{n}", *seeds_of(cfg.seed, 0)[1::-1]) for n in p["sizes"]],
                 parallel, st, f"{out}/logs")
        runs = {n: f"{out}/extract/n{n}-e{e:g}" for n in p["sizes"]}
        run_jobs([extract_job(p, cfg, f"{out}/models/n{n}/ckpt.pt", run, "uncond", f"sample n{n} e{e:g}",
                              seed=seeds_of(cfg.seed, 0)[2], curve_points=0) for n, run in runs.items()],
                 parallel, st, f"{out}/logs")
        for n, run in runs.items():
            r = load_metrics(run)["methods"]["uncond"]
            rows.append(dict(n_train=n, epochs=e, n_gen=r["n_generated"], distinct_any=r["distinct_any"],
                             share_any=r["distinct_any"] / n, share={b: v / n for b, v in r["distinct"].items()}))
            print(f"calibrate n={n} epochs={e:g}: plain sampling (N_G={r['n_generated']}) reached {r['distinct_any']}/{n} "
                  f"= {100 * r['distinct_any'] / n:.0f}% of the training images in some band; per band "
                  + " ".join(f"{b} {100 * v / n:.0f}%" for b, v in r["distinct"].items()), flush=True)
    atomic_write_json(f"{out}/calibration.json", dict(rows=rows, profile_settings=p, seconds=time.time() - st.t0))
    atomic_write_text(f"{out}/CALIBRATION.md", calibration_report(rows))
    return rows


def hardware():
    return dict(machine=platform.machine(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, python=platform.python_version())


if __name__ == "__main__":
    run_main(main)
