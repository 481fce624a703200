"""The conditional-memorization experiment of reproduce.py: SIDE Definition 1's memorization divergence of a
DDPM trained unconditionally, with informative labels (SIDE Definition 2) and with a random permutation of
them (the same classes and class sizes; only the label-image association changes), compared
by paired differences Δ = M(D_j; p_θ(.|j), ε) − M(D_j; p_θ, ε) per label subset (SIDE Theorem 1: Δ <= 0 for
an informative label in its limit). The bound on log p_θ is ddpm.Diffusion.subchain_nll; the Monte
Carlo estimator with common random numbers is metrics.divergence_difference (METRICS.md derives both).
Depends on numpy, torch, data.py, evidence.py, metrics.py, models.py, common.py and report.label_effect.
"""
import os

import numpy as np
import torch

import data
import evidence
import metrics
import models
from common import check
from report import label_effect


def _log_prob(model, diffusion, k, n_t, label, device):
    """SIDE Definition 1's callable for a DDPM: log p_θ(x | label) >= -subchain_nll (ddpm.py), with its
    timesteps and forward noise drawn from the generator metrics.py hands it, so the two models of a
    paired comparison see the same draws (common random numbers)."""
    def log_prob(x, g):
        y = None if label is None else torch.full((len(x),), int(label), dtype=torch.long, device=device)
        draw = diffusion.bound_draw(len(x), k, n_t, x.shape[1:], g)
        return -diffusion.subchain_nll(model, x.to(device), k, draw, y=y)
    return log_prob


def _interval(est, se, df):
    return [est - evidence.t975(df) * se, est + evidence.t975(df) * se]  # Student-t 95 % interval


def divergence(cond, uncond, diffusion, x, subsets, eps, n_mc, n_t, device, seed=0):
    """Δ_j = M(D_j; p_θ(.|j), ε_k) − M(D_j; p_θ, ε_k) (SIDE Definition 1) for each label subset D_j, the
    conditional model `cond` given label j against the unconditional `uncond`, paired (metrics.
    divergence_difference); ε_k is the noise level of the step k nearest ε (ddpm.Diffusion.level), where
    the bound of ddpm.subchain_nll starts. M uses a bound on log p, so each M is an upper bound; in Δ the
    two bounds' gaps need not cancel exactly (exact for the closed forms of tests/test_divergence.py).
    Returns per-subset rows and their mean with stderr sqrt(Σ s.e.²)/K and a Student-t 95 % interval with
    n_mc - 1 degrees of freedom (each subset's s.e. comes from n_mc Monte Carlo samples)."""
    k, eps_k = diffusion.level(eps)
    per = []
    for j in np.unique(subsets):
        Dj = x[torch.as_tensor(subsets == j)].double().cpu()
        r = metrics.divergence_difference(Dj, eps_k, _log_prob(cond, diffusion, k, n_t, j, device),
                                          _log_prob(uncond, diffusion, k, n_t, None, device), n_mc,
                                          torch.Generator().manual_seed(seed + int(j)), batch=max(1, min(n_mc, 64)))
        per.append(dict(label=int(j), n=len(Dj), delta=r["diff"], stderr=r["diff_stderr"],
                        ci95=_interval(r["diff"], r["diff_stderr"], n_mc - 1), M_cond=r["M_a"], M_cond_stderr=r["M_a_stderr"],
                        M_uncond=r["M_b"], M_uncond_stderr=r["M_b_stderr"], corr=r["corr"]))
    K = len(per)
    mean = lambda key: float(np.mean([p[key] for p in per]))  # noqa: E731
    comb = lambda key: float(np.sqrt(np.sum([p[key] ** 2 for p in per])) / K)  # noqa: E731
    est, se = mean("delta"), comb("stderr")
    ci = _interval(est, se, n_mc - 1)
    return dict(delta=est, stderr=se, ci95=ci, verdict=label_effect(*ci),
                M_cond=mean("M_cond"), M_cond_stderr=comb("M_cond_stderr"), M_uncond=mean("M_uncond"),
                M_uncond_stderr=comb("M_uncond_stderr"), subsets=per, eps=eps, eps_k=eps_k, k=k,
                unet_calls_per_sample=min(n_t, diffusion.top() - k), n_mc=n_mc, unit="nats", upper_bound=True)


def conditional(p, cfg, reps, device):
    """Unconditional vs informative-label vs permuted-label DDPMs at the smallest size, in every replicate
    (its own training sample and three models, the same seeds but for the labels): per labelling, the
    paired difference Δ = M(D_j; p_θ(.|j)) − M(D_j; p_θ) of Definition 1 averaged over label subsets, per
    replicate with its Monte Carlo interval, over replicates with a Student-t 95 % interval, and by
    label-subset size |D_j| (SIDE Theorem 1: Δ <= 0 for an informative label, the more so the smaller and
    purer D_j). Profile knobs: div_mc samples of q_ε per subset, div_t timestep strata per sample (= UNet
    calls per sample and model)."""
    torch.set_num_threads(os.cpu_count() or 1)
    units = [_unit(p, cfg, rep, device) for rep in reps if rep["labelled"]]
    rows = []
    for name in ("none", "informative", "permuted"):
        r = dict(labelling=name)
        if name == "none":  # M of the unconditional model on the informative and on the permuted subsets
            for key, part in (("divergence", "informative"), ("divergence_permuted_subsets", "permuted")):
                r[key] = _over_units([u[part] for u in units], "M_uncond")
        else:
            per = [u[name] for u in units]
            r["divergence"] = _over_units(per, "M_cond")
            est, lo, hi = evidence.mean_ci([d["delta"] for d in per])
            lo, hi = (lo, hi) if len(per) > 1 else per[0]["ci95"]  # one replicate: its Monte Carlo interval
            r["delta"] = dict(delta=est, ci95=[lo, hi], verdict=label_effect(lo, hi), units=per, n_units=len(per),
                              per_replicate=[d["delta"] for d in per], by_size=_by_size(per),
                              **{k: per[0][k] for k in ("eps", "eps_k", "k", "unet_calls_per_sample", "n_mc", "unit")})
        rows.append(r)
    return rows


def _by_size(per):
    """Δ by label-subset size |D_j|: over the replicates that have subsets of that size, the mean of each
    replicate's mean Δ at that size, with a Student-t interval (one replicate: no interval)."""
    sizes = sorted({s["n"] for d in per for s in d["subsets"]})
    out = []
    for n in sizes:
        vals = [float(np.mean([s["delta"] for s in d["subsets"] if s["n"] == n])) for d in per
                if any(s["n"] == n for s in d["subsets"])]
        m, lo, hi = evidence.mean_ci(vals)
        out.append(dict(size=n, replicates=len(vals), subsets=sum(s["n"] == n for d in per for s in d["subsets"]),
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
              f"{paths[name]} has another noise schedule than {paths['none']}; retrain the three models together")
    ds = data.load_data(cfg.data, tcfg["image_size"], n=rep["n"], seed=tcfg["data_seed"])
    x = data.to_tensor(ds.images)  # the permuted model's labels, as train.py drew them from its seed
    parts = {"informative": ds.labels, "permuted": data.permuted_labels(ds.labels, rcfg["seed"])}
    return {name: divergence(loaded[name][0], loaded["none"][0], diffusion, x, parts[name], cfg.eps,
                             p["div_mc"], p["div_t"], device, seed=rep["seeds"]["syn"]) for name in parts}
