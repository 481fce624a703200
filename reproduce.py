"""The paper's experiments in miniature, end to end: `make reproduce` (PROFILE=smoke|cpu|gpu).

    python reproduce.py --profile cpu --out results          # about 15 min on a 2-core CPU
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
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import data
import extract
import metrics
import train
from common import UserError, atomic_write_json, atomic_write_text, check, field, parse_config, resolve_device, run_main
from report import reproduce_report

# Each profile: training (sizes, steps, model), extraction (N_G, N_syn, sampler), sweeps, divergence.
PROFILES = {
    "smoke": dict(image_size=8, sizes=(8, 16), steps=150, base=16, attn_res=(4,), batch=16, n_gen=32, n_syn=64,
                  K=4, sweep_lambda=(0.0, 3.0), sweep_k=(2, 4), sample_steps=10, clf_steps=60, cond_size=8,
                  div_mc=4, div_t=8, T=100),
    "cpu": dict(image_size=16, sizes=(32, 64, 128), steps=1200, base=32, attn_res=(8,), batch=32, n_gen=256,
                n_syn=512, K=16, sweep_lambda=(1.0, 3.0, 10.0), sweep_k=(8, 16), sample_steps=25, clf_steps=400,
                cond_size=64, div_mc=8, div_t=32, T=1000),
    "gpu": dict(image_size=64, sizes=(256, 1024, 4096), steps=40000, base=64, attn_res=(16,), batch=128,
                n_gen=5120, n_syn=8192, K=64, sweep_lambda=(1.0, 3.0, 10.0, 30.0), sweep_k=(32, 64, 128),
                sample_steps=50, clf_steps=5000, cond_size=1024, div_mc=64, div_t=100, T=1000),
}
PAPER_TABLE1 = [  # arXiv 2410.02467v7 Table 1, low band [0.4, 0.5) of SSCD similarity, % (SPEC Sec. 4)
    ("CelebA-HQ-FI (~4-5k)", dict(uncond=11.66, cond=15.01, side=23.27), None),
    ("CelebA-25000", dict(uncond=5.00, cond=8.71, side=20.53), dict(uncond=4.24, cond=6.80, side=11.45)),
    ("CelebA (full)", dict(uncond=1.95, cond=4.68, side=7.19), None),
]


@dataclass
class ReproduceConfig:
    profile: str = field("cpu", "sizes and budgets: smoke (~2 min), cpu (~15 min, 2 cores), gpu", choices=list(PROFILES))
    out: str = field("results", "output folder: REPORT.md, summary.json, PNGs, models/, extract/")
    data: str = field("faces", "faces (built-in) or an image folder / .npz (e.g. CelebA) used in its place")
    sizes: tuple = field((), "training-set sizes (override the profile)")
    steps: int = field(0, "training steps per model (0 = profile)")
    n_gen: int = field(0, "N_G per method (0 = profile)")
    eps: float = field(0.05, "ε of Definition 1 on the [-1,1] pixel scale (small next to the 0.2 typical train-to-train NN distance)")
    device: str = field("auto", "auto, cpu or cuda")


class Stages:
    """Wall time of each named stage."""

    def __init__(self):
        self.t, self.t0 = {}, time.time()

    def __call__(self, name, fn):
        t0 = time.time()
        print(f"== {name}", file=sys.stderr, flush=True)
        out = fn()
        self.t[name] = self.t.get(name, 0.0) + time.time() - t0
        return out


def train_model(p, cfg, n, labels, out):
    """Train (or resume, or reuse) one DDPM; returns its checkpoint path."""
    tc = train.TrainConfig(out=out, data=cfg.data, n_train=n, image_size=p["image_size"], labels=labels,
                           base=p["base"], attn_res=p["attn_res"], T=p["T"], steps=p["steps"], batch=p["batch"],
                           sample_n=16, sample_steps=p["sample_steps"], device=cfg.device, resume=True, log_every=30)
    path = os.path.join(out, "ckpt.pt")
    if os.path.exists(path) and train.load_checkpoint(path)["step"] >= tc.steps:
        return path
    train.main([f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                for k, v in dataclasses.asdict(tc).items()])
    return path


def extract_argv(p, ckpt, out, methods, **extra):
    args = dict(ckpt=ckpt, out=out, methods=methods, n_gen=p["n_gen"], n_syn=p["n_syn"], K=p["K"],
                sample_steps=p["sample_steps"], clf_steps=p["clf_steps"], batch=min(128, p["n_gen"]))
    args.update(extra)
    return [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in args.items()]


def row(r, n_train, method):
    """One summary.json row from extract's per-method result."""
    any_band = set().union(*[set(np.asarray(v).tolist()) for v in r["ums_index"].values()])
    return dict(n_train=n_train, method=method, n_gen=r["n_generated"], ams=r["ams"], ums=r["ums"],
                distinct=r["distinct"], distinct_any=len(any_band), ams_any=sum(r["ams"].values()),
                p95=r["p95"], carlini_extracted=r["carlini_extracted"], yoon_extracted=r["yoon_extracted"])


def divergence(model, diffusion, x, subsets, conditional, eps, n_mc, n_t, seed=0):
    """Mean over label subsets D_i of M(D_i; p_θ(.|i) or p_θ, ε) (Definition 1), log p = -ELBO (Eq. 5)
    with the continuous decoder, so each M is an upper bound. Same ε-samples for every model (paired)."""
    dim, vals, ses = x[0].numel(), [], []
    for j in np.unique(subsets):
        Dj = x[torch.as_tensor(subsets == j)].double()

        def log_prob(z, j=j):
            y = torch.full((len(z),), int(j), dtype=torch.long) if conditional else None
            return -diffusion.nll_bound(model, z.float(), n_t=n_t, seed=seed, y=y, decoder="gaussian").double() * dim
        m, se = metrics.memorization_divergence(Dj, eps, log_prob, n_samples=n_mc,
                                                generator=torch.Generator().manual_seed(seed + int(j)))
        vals.append(m)
        ses.append(se)
    k = len(vals)
    return dict(estimate=float(np.mean(vals)), stderr=float(np.sqrt(np.sum(np.square(ses))) / k), subsets=k,
                unit="nats", upper_bound=True)


def main(argv=None):
    cfg = parse_config(ReproduceConfig, argv, __doc__.split("\n\n")[0])
    p = dict(PROFILES[cfg.profile])
    p.update({k: v for k, v in dict(sizes=tuple(int(s) for s in cfg.sizes), steps=cfg.steps, n_gen=cfg.n_gen).items() if v})
    check(len(p["sizes"]) >= 1 and min(p["sizes"]) >= 2, f"--sizes {cfg.sizes}: need sizes >= 2")
    check(cfg.eps > 0, f"--eps {cfg.eps} must be > 0")
    device = resolve_device(cfg.device)
    st, out = Stages(), cfg.out
    os.makedirs(out, exist_ok=True)
    sizes = sorted(p["sizes"])
    models = {n: st(f"train n={n}", lambda n=n: train_model(p, cfg, n, "none", f"{out}/models/n{n}")) for n in sizes}
    # sweeps for λ and K on the middle size, separate seed (extract's --sweep-seed)
    tune = sizes[len(sizes) // 2]
    tuned = st(f"sweeps n={tune}", lambda: extract.main(extract_argv(
        p, models[tune], f"{out}/extract/n{tune}", "side", sweep_lambda=p["sweep_lambda"], sweep_k=p["sweep_k"])))
    chosen = extract.load_chosen(f"{out}/extract/n{tune}")
    rows, grids = [], []
    for n in sizes:
        res = st(f"extract n={n}", lambda n=n: extract.main(extract_argv(
            p, models[n], f"{out}/extract/n{n}", "uncond,cond,side,side_random,uncond_budget",
            lam=chosen["lam"], K=chosen["K"])))
        rows += [row(res[m], n, m) for m in res]
        for m in res:
            os.makedirs(f"{out}/grids", exist_ok=True)
            shutil.copy(f"{out}/extract/n{n}/grids/{m}.png", f"{out}/grids/n{n}_{m}.png")
            grids.append(f"grids/n{n}_{m}.png")
    for name in ("lambda", "K"):
        shutil.copy(f"{out}/extract/n{tune}/sweep_{name}.png", f"{out}/sweep_{name}.png")
    cond_rows = st("conditional memorization", lambda: conditional(p, cfg, models, st, device))
    thm = st("theorem 1 check", lambda: metrics.theorem1_check())
    summary = dict(total_seconds=time.time() - st.t0, device=str(device), profile=cfg.profile, data=cfg.data,
                   hardware=hardware(), chosen=chosen, rows=rows, conditional=cond_rows, theorem1=thm,
                   sweeps=dict(lam=tuned and extract.load_sweep(f"{out}/extract/n{tune}", "lambda"),
                               K=extract.load_sweep(f"{out}/extract/n{tune}", "K"), size=tune),
                   stage_seconds=st.t, config=dataclasses.asdict(cfg), profile_settings=p)
    atomic_write_json(f"{out}/summary.json", summary)
    atomic_write_text(f"{out}/REPORT.md", write_report(summary, grids))
    print(f"wrote {out}/REPORT.md and {out}/summary.json in {summary['total_seconds']:.0f}s", file=sys.stderr)
    return summary


def conditional(p, cfg, models, st, device):
    """Unconditional vs informative-label vs random-label DDPMs on one training set."""
    n, out = p["cond_size"], cfg.out
    ck = {"none": models.get(n) or st(f"train n={n}", lambda: train_model(p, cfg, n, "none", f"{out}/models/n{n}"))}
    ck["informative"] = st(f"train n={n} informative labels", lambda: train_model(p, cfg, n, "true", f"{out}/models/n{n}-informative"))
    ck["random"] = st(f"train n={n} random labels", lambda: train_model(p, cfg, n, "random", f"{out}/models/n{n}-random"))
    rows = []
    loaded = {k: train.load_trained(v, device) for k, v in ck.items()}
    tcfg = loaded["none"][2]
    ds = data.load_data(cfg.data, tcfg.image_size, n=n, seed=tcfg.data_seed)
    x = data.to_tensor(ds.images).to(device)
    partitions = {"informative": ds.labels, "random": data.random_labels(n, int(ds.labels.max()) + 1, tcfg.seed)}
    for name in ("none", "informative", "random"):
        res = st(f"conditional: extract {name}", lambda name=name: extract.main(extract_argv(
            p, ck[name], f"{out}/extract/cond-{name}", "uncond")))
        r = row(res["uncond"], n, "uncond")
        r.update(labelling=name)
        model, diffusion = loaded[name][0], loaded[name][1]
        part = partitions["informative" if name == "none" else name]
        r["divergence"] = st(f"conditional: divergence {name}", lambda: divergence(
            model, diffusion, x, part, name != "none", cfg.eps, p["div_mc"], p["div_t"]))
        if name == "none":  # the unconditional model on the random partition too, for the paired comparison
            r["divergence_random_subsets"] = st("conditional: divergence none/random", lambda: divergence(
                model, diffusion, x, partitions["random"], False, cfg.eps, p["div_mc"], p["div_t"]))
        rows.append(r)
    return rows


def hardware():
    return dict(machine=platform.machine(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, python=platform.python_version())


def write_report(s, grids):
    """REPORT.md from summary.json: verdict first, then the tables the paper has."""
    return reproduce_report(s, grids, PAPER_TABLE1)


if __name__ == "__main__":
    run_main(main)
