"""The paper's experiments in miniature, end to end: `make reproduce` (PROFILE=smoke|cpu|gpu).

    python reproduce.py --profile cpu --out results          # 12.5 min measured on a 2-core CPU
    python reproduce.py --profile gpu --data /path/to/celeba  # a closer analogue of the paper's scale

1. Table 1 (SPEC Sec. 4): for several training-set sizes of one source, an unconditional DDPM
   (train.py) and extraction by Carlini UnCond, Carlini Cond and SIDE at equal N_G, sampler and
   steps (extract.py); plus SIDE with random surrogate labels (control) and plain sampling given
   SIDE's whole sampling budget N_syn + N_G (compute-matched, beyond the paper).
2. λ and K for SIDE are chosen by sweeps on a separate generation seed of one size, never on the
   reported generations.
3. Conditional memorization (SPEC Sec. 1): the same DDPM trained unconditionally, with informative
   labels and with random labels; AMS/UMS at equal N_G and the memorization divergence M of
   Definition 1 per label subset, log p from the ELBO (so each M is an upper bound); and the exact
   Gaussian-mixture check of Theorem 1.
Writes OUT/REPORT.md, OUT/summary.json and PNGs. Every stage is cached; a rerun resumes.
"""
import dataclasses
import json
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
import extract
import metrics
import train
from common import (UserError, atomic_write_json, atomic_write_text, check, check_writable, field, parse_config, resolve_device,
                    run_main)
from report import reproduce_report

# Each profile: training (sizes, steps, model), extraction (N_G, N_syn, sampler), sweeps, divergence.
PROFILES = {  # calibrated on a 2-core CPU; see README "Reproducing the paper"
    "smoke": dict(image_size=8, sizes=(8, 16), steps=150, base=16, mults=(1, 2), attn_res=(4,), batch=16, n_gen=32, n_syn=64,
                  K=4, sweep_lambda=(0.0, 3.0), sweep_k=(2, 4), sample_steps=10, clf_steps=40, cond_size=8,
                  div_mc=4, div_t=8, T=100, jobs=2),
    # 8 px: at 16 px no size reached memorization within this budget (1,200-2,000 steps, README);
    # 1,600 steps memorize 16 faces fully and 32 partially (calibration runs, README)
    "cpu": dict(image_size=8, sizes=(16, 32, 64), steps=1600, base=32, mults=(1, 2), attn_res=(4,), batch=16, n_gen=256,
                n_syn=512, K=16, sweep_lambda=(1.0, 3.0, 10.0), sweep_k=(8, 16, 32), sample_steps=40,
                clf_steps=250, cond_size=32, div_mc=8, div_t=32, T=1000, jobs=2),
    # not run here (no GPU in this project's sessions so far): an analogue of the paper's scale, several
    # hours per model on one GPU (estimate, README); pass --data /path/to/celeba for real faces
    "gpu": dict(image_size=64, sizes=(256, 1024, 4096), steps=20000, base=64, mults=(1, 2, 2, 2), attn_res=(16,), batch=128,
                n_gen=5120, n_syn=8192, K=64, sweep_lambda=(1.0, 3.0, 10.0, 30.0), sweep_k=(32, 64, 128),
                sample_steps=50, clf_steps=5000, cond_size=1024, div_mc=64, div_t=100, T=1000, jobs=1),
}
TRAIN_FIXED = dict(schedule="cosine", prediction="eps", lr=2e-3)  # calibration: memorized sooner than linear/v
PAPER_TABLE1 = [  # arXiv 2410.02467v7 Table 1, low band [0.4, 0.5) of SSCD similarity, % (SPEC Sec. 4)
    ("CelebA-HQ-FI (~4-5k)", dict(uncond=11.66, cond=15.01, side=23.27), None),
    ("CelebA-25000", dict(uncond=5.00, cond=8.71, side=20.53), dict(uncond=4.24, cond=6.80, side=11.45)),
    ("CelebA (full)", dict(uncond=1.95, cond=4.68, side=7.19), None),
]


@dataclass
class ReproduceConfig:
    profile: str = field("cpu", "sizes and budgets: smoke (~75 s), cpu (12.5 min measured on 2 cores), gpu", choices=list(PROFILES))
    out: str = field("results", "output folder: REPORT.md, summary.json, PNGs, models/, extract/", nonempty=True)
    data: str = field("faces", "faces (built-in) or an image folder / .npz (e.g. CelebA) used in its place", nonempty=True)
    sizes: tuple = field((), "training-set sizes (override the profile)", elem=int, lo=2)
    steps: int = field(0, "training steps per model (0 = profile)", lo=0)
    n_gen: int = field(0, "N_G per method (0 = profile)", lo=0)
    eps: float = field(0.05, "ε of Definition 1 on the [-1,1] pixel scale (small next to the 0.2 typical train-to-train NN distance)", gt=0.0)
    device: str = field("auto", "auto, cpu or cuda", nonempty=True)
    overwrite: bool = field(False, "replace a finished run in --out made with other settings (without it that is refused)")


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


def train_job(p, cfg, n, labels, out):
    """(name, argv) of one train.py run; resumable, and a finished model is not retrained."""
    args = dict(out=out, data=cfg.data, n_train=n, image_size=p["image_size"], labels=labels, base=p["base"],
                mults=p["mults"], attn_res=p["attn_res"], T=p["T"], steps=p["steps"], batch=p["batch"], sample_n=16,
                sample_steps=p["sample_steps"], device=cfg.device, resume=True, log_every=30, **TRAIN_FIXED)
    return f"train n={n} labels={labels}", ["train.py", *flags(args)]


def extract_job(p, cfg, ckpt, out, methods, name=None, **extra):
    args = dict(ckpt=ckpt, out=out, methods=methods, n_gen=p["n_gen"], n_syn=p["n_syn"], K=p["K"],
                sample_steps=p["sample_steps"], clf_steps=p["clf_steps"], batch=min(128, p["n_gen"]), device=cfg.device)
    args.update(extra)
    return name or f"extract {os.path.basename(out)}", ["extract.py", *flags(args)]


def run_jobs(jobs, parallel, st, log_dir):
    """Run (name, argv) script jobs, `parallel` at a time. With more than one at a time each gets one
    thread: two torch processes with all threads each on 2 cores collapse each other's throughput."""
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if parallel > 1 else {}))
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, argv = pending.pop(0)
            log = os.path.join(log_dir, name.replace(" ", "_").replace("=", "") + ".log")
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


def row(r, n_train, method):
    """One summary.json row from extract's per-method metrics."""
    return dict(n_train=n_train, method=method, n_gen=r["n_generated"], ams=r["ams"], ums=r["ums"],
                distinct=r["distinct"], distinct_any=r["distinct_any"], ams_any=r["ams_any"], p95=r["p95"],
                carlini_extracted=r["carlini_extracted"], yoon_extracted=r["yoon_extracted"])


def divergence(model, diffusion, x, subsets, conditional, eps, n_mc, n_t, seed=0):
    """Mean over label subsets D_i of M(D_i; p_θ(.|i) or p_θ, ε) (Definition 1), log p = -ELBO (Eq. 5)
    with the continuous decoder, so each M is an upper bound. Same ε-samples for every model (paired)."""
    dim, vals, ses = x[0].numel(), [], []
    for j in np.unique(subsets):
        Dj = x[torch.as_tensor(subsets == j)].double()

        def log_prob(z, j=j):
            y = torch.full((len(z),), int(j), dtype=torch.long, device=z.device) if conditional else None
            return -diffusion.nll_bound(model, z.float(), n_t=n_t, seed=seed, y=y, decoder="gaussian").double() * dim
        m, se = metrics.memorization_divergence(Dj, eps, log_prob, n_samples=n_mc,
                                                generator=torch.Generator().manual_seed(seed + int(j)))
        vals.append(m)
        ses.append(se)
    k = len(vals)
    return dict(estimate=float(np.mean(vals)), stderr=float(np.sqrt(np.sum(np.square(ses))) / k), subsets=k,
                unit="nats", upper_bound=True, eps=eps)


def main(argv=None):
    cfg = parse_config(ReproduceConfig, argv, __doc__.split("\n\n")[0])
    p = dict(PROFILES[cfg.profile])
    p.update({k: v for k, v in dict(sizes=tuple(int(s) for s in cfg.sizes), steps=cfg.steps, n_gen=cfg.n_gen).items() if v})
    check(len(p["sizes"]) >= 1, "--sizes: the profile has no sizes; give --sizes")
    for _, argv in [train_job(p, cfg, n, "none", cfg.out) for n in p["sizes"]] + [extract_job(p, cfg, "ckpt.pt", cfg.out, "side")]:
        parse_config(train.TrainConfig if argv[0] == "train.py" else extract.ExtractConfig, argv[1:], "")  # before any training
    check_writable(cfg.out, "--out")
    done = os.path.join(cfg.out, "summary.json")  # a finished run there: the same settings resume, others are refused
    if os.path.exists(done) and not cfg.overwrite:
        with open(done) as fh:
            old = json.load(fh).get("config", {})
        diff = [k for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "overwrite") and json.dumps(old.get(k)) != json.dumps(v)]
        check(not diff, f"{cfg.out} holds a finished run with other settings ({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); "
              "choose another --out or pass --overwrite to replace it")
    for name in ("models", "extract", "logs", "REPORT.md", "summary.json") if cfg.overwrite else ():
        path = os.path.join(cfg.out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.unlink(path)
    device = resolve_device(cfg.device)
    parallel = p["jobs"] if device.type == "cpu" else 1
    st, out = Stages(), cfg.out
    os.makedirs(out, exist_ok=True)
    sizes, nc = sorted(p["sizes"]), p["cond_size"]
    # fails early on a missing/too small folder; a folder without class subfolders has no true labels,
    # so Carlini Cond and the conditional-memorization experiment are skipped (and the report says so)
    labelled = data.load_data(cfg.data, p["image_size"], n=max(sizes + [nc])).labels is not None
    if not labelled:
        print(f"note: {cfg.data} has no labels (no class subfolders): skipping Carlini Cond and the "
              "conditional-memorization experiment", file=sys.stderr)
    model = {n: f"{out}/models/n{n}" for n in sorted(set(sizes) | {nc})}
    model.update({f"{nc}-{lab}": f"{out}/models/n{nc}-{lab}" for lab in ("informative", "random")})
    jobs = [train_job(p, cfg, n, "none", model[n]) for n in sorted(set(sizes) | ({nc} if labelled else set()))]
    if labelled:
        jobs += [train_job(p, cfg, nc, lab, model[f"{nc}-{name}"]) for lab, name in (("true", "informative"), ("random", "random"))]
    run_jobs(jobs, parallel, st, f"{out}/logs")
    # λ, then K, chosen by sweeps on the middle size with a generation seed that is not reported
    tune = sizes[len(sizes) // 2]
    run_jobs([extract_job(p, cfg, f"{model[tune]}/ckpt.pt", f"{out}/extract/n{tune}", "side", name=f"sweeps n{tune}",
                          sweep_lambda=p["sweep_lambda"], sweep_k=p["sweep_k"], sweep_n_gen=max(p["n_gen"] // 2, 1))],
             1, st, f"{out}/logs")
    chosen = load_metrics(f"{out}/extract/n{tune}")["chosen"]
    table = [extract_job(p, cfg, f"{model[n]}/ckpt.pt", f"{out}/extract/n{n}",
                         "uncond,cond,side,side_random,uncond_budget" if labelled else "uncond,side,side_random,uncond_budget",
                         lam=chosen["lam"], K=chosen["K"]) for n in sizes]
    cond = [extract_job(p, cfg, f"{model[k]}/ckpt.pt", f"{out}/extract/cond-{k.split('-')[1]}", "uncond")
            for k in (f"{nc}-informative", f"{nc}-random") if labelled]
    if labelled and nc not in sizes:
        cond.append(extract_job(p, cfg, f"{model[nc]}/ckpt.pt", f"{out}/extract/n{nc}", "uncond"))
    run_jobs(table + cond, parallel, st, f"{out}/logs")
    rows, grids = [], []
    os.makedirs(f"{out}/grids", exist_ok=True)
    for n in sizes:
        res = load_metrics(f"{out}/extract/n{n}")["methods"]
        rows += [row(res[m], n, m) for m in res]
        for m in res:
            shutil.copy(f"{out}/extract/n{n}/grids/{m}.png", f"{out}/grids/n{n}_{m}.png")
            grids.append(f"grids/n{n}_{m}.png")
    for name in ("lambda", "K"):
        shutil.copy(f"{out}/extract/n{tune}/sweep_{name}.png", f"{out}/sweep_{name}.png")
    cond_rows = st("conditional memorization: divergence", lambda: conditional(p, cfg, model, device)) if labelled else []
    thm = st("theorem 1 check", lambda: metrics.theorem1_check())
    summary = dict(total_seconds=time.time() - st.t0, device=str(device), profile=cfg.profile, data=cfg.data,
                   hardware=hardware(), chosen=chosen, rows=rows, conditional=cond_rows, theorem1=thm,
                   sweeps=dict(lam=extract.load_sweep(f"{out}/extract/n{tune}", "lambda"),
                               K=extract.load_sweep(f"{out}/extract/n{tune}", "K"), size=tune),
                   stage_seconds=st.t, parallel_jobs=parallel, config=dataclasses.asdict(cfg), profile_settings=p)
    atomic_write_json(f"{out}/summary.json", summary)
    atomic_write_text(f"{out}/REPORT.md", reproduce_report(summary, grids, PAPER_TABLE1))
    print(f"wrote {out}/REPORT.md and {out}/summary.json in {summary['total_seconds']:.0f}s", file=sys.stderr)
    return summary


def conditional(p, cfg, model, device):
    """Unconditional vs informative-label vs random-label DDPMs on one training set: AMS/UMS from their
    extract runs, and the divergence M of Definition 1 per label subset (paired ε-samples)."""
    nc, out = p["cond_size"], cfg.out
    torch.set_num_threads(os.cpu_count() or 1)
    paths = {"none": model[nc], "informative": model[f"{nc}-informative"], "random": model[f"{nc}-random"]}
    runs = {"none": f"{out}/extract/n{nc}", "informative": f"{out}/extract/cond-informative",
            "random": f"{out}/extract/cond-random"}
    loaded = {k: train.load_trained(f"{v}/ckpt.pt", device) for k, v in paths.items()}
    tcfg = loaded["none"][2]
    ds = data.load_data(cfg.data, tcfg.image_size, n=nc, seed=tcfg.data_seed)
    x = data.to_tensor(ds.images).to(device)
    parts = {"informative": ds.labels, "random": data.random_labels(nc, int(ds.labels.max()) + 1, tcfg.seed)}
    rows = []
    for name in ("none", "informative", "random"):
        r = dict(row(load_metrics(runs[name])["methods"]["uncond"], nc, "uncond"), labelling=name)
        m, diffusion = loaded[name][0], loaded[name][1]
        r["divergence"] = divergence(m, diffusion, x, parts["informative" if name == "none" else name],
                                     name != "none", cfg.eps, p["div_mc"], p["div_t"])
        if name == "none":  # the unconditional model on the random partition too, for the paired comparison
            r["divergence_random_subsets"] = divergence(m, diffusion, x, parts["random"], False, cfg.eps,
                                                        p["div_mc"], p["div_t"])
        rows.append(r)
    return rows


def hardware():
    return dict(machine=platform.machine(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, python=platform.python_version())


if __name__ == "__main__":
    run_main(main)
