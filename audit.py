"""An audit a privacy team can act on: the same attack repeated on ONE model, the training images it
leaked, and how many more a larger budget would reach. Run by `extract.py --repeats R` (R >= 2):

    python extract.py --ckpt MODEL --data TRAIN --repeats 3
    # -> OUT/AUDIT_REPORT.md, leaked.csv, leaked.png

Repeat 0 is extract.py's ordinary run in OUT (--seed, --syn-seed); repeat r >= 1 is the same run in
OUT/repeat-r on seeds drawn from (--seed, --syn-seed, r), so it redraws everything the attacker
draws: the synthetic set, the clustering, both classifiers and the generation noise. Every repeat
attacks the same weights, so the spread over repeats is the attack's own randomness on this model,
not the variation between models trained on other samples (reproduce.py's units measure that).

  - per method: the hit rate (AMS, SIDE's evaluation metrics) and the distinct training images
    reached (UMS x N_G), any band and high band, as means over repeats with Student-t 95 %
    intervals; SIDE against plain sampling (and Carlini Cond where the data has labels) on both,
    paired by repeat and decided as one family with Holm's correction (evidence.py);
  - leaked.csv: every training image some generation reached in some band (SIDE's φ(x, D_2)), by any
    method in any repeat, sorted by how reliably it leaks, and leaked.png (each beside its closest
    generation);
  - how many more a larger budget reaches: `extrapolate` (Chao et al. 2014; see there), at 10x and
    100x N_G and in total, with an interval whose upper end also holds where that estimate is low
    (`spread_bound`), checked on the model itself (from the first N_G/8 generations to all N_G).
Depends on numpy, pillow, metrics.py, models.py, evidence.py, report.py and common.py. It never
imports extract.py: extract.main hands it its run and check functions.
"""
import csv
import dataclasses
import io
import json
import math
import os
import shlex

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import evidence
import metrics
import models
from common import atomic_write_bytes, atomic_write_json, atomic_write_text
from report import METHOD_NAMES, ci

SEED_BITS = 31  # derived seeds below 2^31: valid for numpy, torch and any int32 seed field
# budgets extrapolated to, as multiples of N_G (and the total, N_G -> infinity)
MULTIPLES = (10, 100)
# the built-in check: estimate from the first N_G / 8 generations, compare with all 8x as many
CHECK = 8
# bootstrap replicates per interval: a standard error good to about 1 / sqrt(2 B) = 5 %
BOOTSTRAP = 200
Z95 = 1.959963984540054  # two-sided 95 % normal quantile (Chao et al. 2014: estimate ± 1.96 s.e.)
# one tail of a two-sided 95 % interval: spread_bound's confidence in the unseen hit mass
Z_TAIL = 0.025
# bisection steps of poisson_upper: the bracket shrinks by 2^-100, far below float resolution
BISECT = 100
# nearest training images searched per generation at first; x4 while the last is in a band
FIRST_K = 8
TABLE_ROWS = 20  # leaked images listed in AUDIT_REPORT.md (leaked.csv has all)
# leaked.png: images enlarged to about 64 px (small ones readable); pairs per row
GRID_PX, GRID_COLS = 64, 4
OUTPUTS = ("AUDIT_REPORT.md", "leaked.csv", "leaked.png")


# ==================================================================== repeats: seeds, folders, runs

def repeat_seeds(seed, syn_seed, R, avoid=()):
    """[(generation seed, synthetic-set seed)] of repeats 0..R-1. Repeat 0 is (seed, syn_seed), the
    single run's; repeat r >= 1 takes the first two values of SeedSequence([seed, syn_seed, r]) that
    no earlier repeat (nor `avoid`) uses, so no two repeats share a seed."""
    out, used = [(seed, syn_seed)], {seed, syn_seed, *avoid}
    for r in range(1, R):
        n = 2
        # a collision among 2^31 values is rare; then draw more words of the same sequence
        while True:
            words = np.random.SeedSequence([seed, syn_seed, r]).generate_state(n)
            pick = [s for s in dict.fromkeys(int(w) >> (32 - SEED_BITS) for w in words)
                    if s not in used][:2]
            if len(pick) == 2:
                break
            n *= 2
        used.update(pick)
        out.append(tuple(pick))
    return out


def repeat_configs(cfg, base, chosen=None):
    """Every repeat's ExtractConfig: repeat 0 is cfg (folder `base`); repeat r is a single run in
    base/repeat-r on its own seeds. chosen: repeat 0's λ, K and Cond scale, fixed in the others (no
    sweeps)."""
    fix = {} if chosen is None else dict(
        lam=chosen["lam"], K=chosen["K"], cond_scale=-1.0 if chosen["cond_scale"] is None
        else chosen["cond_scale"],
        sweep_lambda=(), sweep_k=(), sweep_cond_scale=())
    seeds = repeat_seeds(cfg.seed, cfg.syn_seed, cfg.repeats, avoid=(cfg.sweep_seed,))
    return [cfg] + [dataclasses.replace(cfg, seed=s, syn_seed=ss,
                                        out=os.path.join(base, f"repeat-{r}"), repeats=1, **fix)
                    for r, (s, ss) in enumerate(seeds[1:], 1)]


def run_repeats(cfg, base, target, ranks, run, check):
    """After extract.run made repeat 0 in `base`: repeats 1..R-1 (run = extract.run; check =
    extract.check_previous, every repeat's folder checked before any of them runs), then the audit
    of all R. Returns the audit dict (rank 0). With R = 1 only stale audit files go (with
    --overwrite)."""
    if cfg.repeats == 1:
        for f in OUTPUTS if cfg.overwrite and ranks.rank == 0 else ():
            if os.path.exists(os.path.join(base, f)):
                os.unlink(os.path.join(base, f))
        return None
    chosen = ranks.agree(_json(os.path.join(base, "metrics.json"))["chosen"] if ranks.rank == 0
                         else None)
    cfgs = repeat_configs(cfg, base, chosen)
    for c in cfgs[1:]:
        check(c)
    for r, c in enumerate(cfgs[1:], 1):
        ranks.log(f"[repeat {r}/{cfg.repeats - 1}] seed {c.seed}, syn-seed {c.syn_seed} -> {c.out}")
        run(c, target, ranks)
    return write_audit(cfg, base, cfgs, target) if ranks.rank == 0 else None


def _json(path):
    with open(path) as fh:
        return json.load(fh)


# ============================================================= who was reached, by which generation

def incidence(G, T, bands, kind, device=None):
    """Every (generation g, training item j, value) with the value in some band: section 3's φ(x,
    D_2) per generation (UMS keeps only their union), as three arrays. Exact: each generation's k
    nearest are searched (metrics.knn), k growing x4 while its k-th nearest is not yet beyond the
    farthest band edge."""
    far = max(hi for _, hi in bands.values()) if kind == "l2" else min(lo
                                                                       for lo, _ in bands.values())
    n, k, todo, out = len(T), min(FIRST_K, len(T)), np.arange(len(G)), []
    while len(todo):
        v, i = metrics.knn(G[todo], T, k=k, metric=kind, device=device)
        hit = np.any([metrics.in_band(v, lo, hi, kind) for lo, hi in bands.values()], axis=0)
        more = ((v[:, -1] <= far) if kind == "l2" else (v[:, -1] >= far)) & (k < n)
        g, c = np.nonzero(hit & ~more[:, None])
        out.append((todo[g], i[g, c], v[g, c]))
        todo, k = todo[more], min(4 * k, n)
    return tuple(np.concatenate(a)
                 for a in zip(*out)) if out else (np.zeros(0, int),) * 2 + (np.zeros(0),)


def _embedder(similarity, device):
    """x -> what the similarity compares: uint8 pixels (l2), SSCD or a TorchScript embedding
    (cosine)."""
    if similarity == "l2":
        return lambda x: x
    if similarity == "sscd":
        session = metrics.load_sscd()
        return lambda x: metrics.sscd_embed(session, x)
    model = metrics.load_embedder(similarity, device)
    return lambda x: metrics.embed_images(model, x, device=device)


def collect(cfg, folders, ds, device):
    """Per repeat and method (`runs`): metrics.json's figures and the per-image hit counts Y
    (generations reaching each training image, any band and high band; also over the first N_G /
    CHECK generations); and `best`, every training image's best match over everything (value, where,
    the generation)."""
    kind, embed = ("l2" if cfg.similarity == "l2" else "cos"), _embedder(cfg.similarity, device)
    train, n = embed(ds.images), len(ds.images)
    best = dict(score=np.full(n, -np.inf), value=np.full(n, np.nan), where=[None] * n,
                image=[None] * n)
    runs = []
    for r, folder in enumerate(folders):
        rec = _json(os.path.join(folder, "metrics.json"))
        with np.load(os.path.join(folder, "samples.npz")) as z:
            images, method, index = z["images"], z["method"], z["index"]
        for m in cfg.methods.split(","):
            rows = np.flatnonzero(method == m)
            # generation order: the first T0 are a run of T0
            rows = rows[np.argsort(index[rows], kind="stable")]
            bands = {b: tuple(e) for b, e in rec["methods"][m]["bands"].items()}
            g, j, v = incidence(embed(images[rows]), train, bands, kind, device)
            T, high = len(rows), metrics.in_band(v, *bands.get("high", (math.nan,) * 2), kind)
            T0 = T // CHECK
            runs.append(dict(repeat=r, method=m, T=T, T0=T0, metrics=rec["methods"][m],
                             seed=rec["config"]["seed"],
                             any=np.bincount(j, minlength=n),
                             high=np.bincount(j[high], minlength=n),
                             first=np.bincount(j[g < T0], minlength=n),
                             at_check=len(np.unique(j[g < CHECK * T0]))))
            score = -v if kind == "l2" else v
            o = np.lexsort((-score, j))  # by image, its best match first
            for q in o[np.r_[True, j[o][1:] != j[o][:-1]]] if len(o) else ():
                if score[q] > best["score"][j[q]]:
                    best["score"][j[q]], best["value"][j[q]] = score[q], v[q]
                    best["where"][j[q]] = dict(method=m, repeat=r, index=int(index[rows[g[q]]]),
                                               seed=runs[-1]["seed"])
                    best["image"][j[q]] = images[rows[g[q]]]
    return runs, best, bands, kind


# ============================================================ how many more a larger budget reaches

def unseen(Y, T, n):
    """(S_obs, Q1, Q̂0): images reached, reached by exactly one of the T generations, and Chao's
    estimate of those reachable but not reached yet, Q̂0 = (T-1)/T Q1² / (2 Q2) (Q1 (Q1-1) / 2 where
    Q2 = 0), at most the n - S_obs training images not reached (Chao 1987; Chao et al. 2014,
    incidence data)."""
    Y = np.asarray(Y)
    s, q1, q2 = int((Y > 0).sum()), int((Y == 1).sum()), int((Y == 2).sum())
    q0 = (T - 1) / T * (q1 * q1 / (2 * q2) if q2 > 0 else q1 * (q1 - 1) / 2)
    return s, q1, min(q0, n - s)


def extrapolate(Y, T, n, budgets):
    """Expected distinct training images reached after m >= T generations (these T included), for
    each m in budgets (math.inf: all reachable), from Y, the hit count of each training image in T
    generations.

    Model: generation k reaches image i with probability p_i, independently (the Bernoulli product
    model of incidence data, Colwell et al. 2012, J. Plant Ecol. 5:3): a generation may reach
    several images. The paper's expected-unique formula E[N] = Σ_i 1 - (1 - p_i)^m is its mean;
    given the first T, E[S(m)] = S_obs + Σ_{i unseen} 1 - (1 - p_i)^(m - T). Chao et al. 2014 (Ecol.
    Monogr. 84:45, the incidence-based extrapolation) estimate the unseen terms: Q̂0 of them (Chao2,
    `unseen`), sharing the Good-Turing mass Q1 / T of hits on unseen images, so each has p̂0 with
    Q̂0 p̂0 = (Q1 / T)(1 - p̂0):
        Ŝ(m) = S_obs + Q̂0 [1 - (1 - Q1 / (T Q̂0 + Q1))^(m - T)],   Ŝ(inf) = S_obs + Q̂0.
    Why this one: Good-Toulmin (1956) diverges beyond m = 2T and its smoothed form (Orlitsky, Suresh
    & Wu 2016, PNAS 113:13283) is only proven up to m - T ~ T log T; Chao's is finite at any m, and
    the number of training images caps it (Q̂0 <= n - S_obs). Its limit: Chao2 is a lower bound of
    the unseen when the p_i vary (Chao 1987, by Cauchy-Schwarz), and images with p_i << 1 / T leave
    no trace in T generations, so far extrapolations (100x) tend to be too low; the built-in 8x
    check measures how much."""
    s, q1, q0 = unseen(Y, T, n)
    p0 = q1 / (T * q0 + q1) if q0 > 0 else 0.0
    return np.array([s + q0 if math.isinf(m) else s + q0 * -math.expm1((m - T) * math.log1p(-p0))
                     for m in budgets])


def assemblage(Y, T, n):
    """Detection probabilities of a population like the one sampled, for the bootstrap (Chao et al.
    2014, Appendix): the images reached, Y / T shrunk by the unseen share (Chao & Jost 2012, Ecology
    93:2533), and ceil(Q̂0) unseen images sharing the Good-Turing mass Q̂0 p̂0 equally."""
    y = np.asarray(Y)[np.asarray(Y) > 0] / T
    s, q1, q0 = unseen(Y, T, n)
    if q0 <= 0:
        return y
    a, b = q0 * q1 / (T * q0 + q1), float((y * (1 - y) ** T).sum())
    shrunk = np.clip(y * (1 - (a / b if b > 0 else 0.0) * (1 - y) ** T), 0.0, 1.0)
    return np.concatenate([shrunk, np.full(math.ceil(q0), a / math.ceil(q0))])


def poisson_upper(k, level=1 - Z_TAIL):
    """The `level` upper confidence limit of a Poisson mean after observing k (Garwood 1936): the λ
    with P(X <= k | λ) = 1 - level, by bisection on the cumulative sum of the Poisson terms."""
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, k + 1)))])
    cdf = lambda lam: float(np.exp(-lam + np.arange(k + 1) * math.log(lam)
                                   - log_fact).sum())  # noqa: E731
    lo, hi = 0.0, k + 10.0 * math.sqrt(k + 1) + 10.0  # P(X <= k) is far below 1 - level at hi
    for _ in range(BISECT):
        lo, hi = ((lo + hi) / 2, hi) if cdf((lo + hi) / 2) > 1 - level else (lo, (lo + hi) / 2)
    return hi


def spread_bound(Y, T, n, budgets):
    """The most distinct images m generations can be expected to reach, whatever the unseen p_i: the
    unseen images (at most n - S_obs) share a total hit probability M0 = Σ_unseen p_i, and by
    Jensen's inequality Σ_unseen 1 - (1 - p_i)^(m - T) <= (n - S_obs) [1 - (1 - M0 / (n - S_obs))^(m
    - T)] (mass spread evenly over every image not yet reached). M0 at its upper confidence limit:
    Good-Turing's Q1 / T (for incidence data E[Q1] / T = Σ p_i (1 - p_i)^(T-1) >= E[M0]) with Q1 at
    poisson_upper (a sum of independent indicators is less dispersed than a Poisson count). Infinite
    m: n, as no finite run rules out p_i > 0."""
    Y = np.asarray(Y)
    s, u = int((Y > 0).sum()), n - int((Y > 0).sum())
    if u == 0:
        return np.full(len(budgets), float(s))
    m0 = min(poisson_upper(int((Y == 1).sum())) / T, 1.0)
    return np.array([float(n) if math.isinf(m) else s
                     + u * -math.expm1((m - T) * math.log1p(-min(m0 / u, 1.0))) for m in budgets])


def extrapolate_interval(Y, T, n, budgets, rng, B=BOOTSTRAP):
    """(estimate, lo, hi) per budget: `extrapolate` and a 95 % interval for the count a run to m
    generations reaches. Lower end: estimate - 1.96 s.e., the s.e. of (reached - estimated) over B
    bootstrap runs (the first T generations drawn anew from `assemblage`, then the m - T more; Chao
    et al. 2014). Upper end: the larger of estimate + 1.96 s.e. and `spread_bound`, which holds
    where Chao's estimate is low (hit probabilities that vary, or too few hits to tell). Both
    clipped to [S_obs, n]."""
    est, pi = extrapolate(Y, T, n, budgets), assemblage(Y, T, n)
    err = np.empty((B, len(budgets)))
    for b in range(B):
        Yb = rng.binomial(T, pi)
        miss = pi[Yb == 0]
        reached = [(pi > 0).sum() if math.isinf(m) else (Yb > 0).sum()
                   + (rng.random(len(miss)) < -np.expm1((m - T) * np.log1p(-miss))).sum()
                   for m in budgets]
        err[b] = np.array(reached) - extrapolate(Yb, T, n, budgets)
    se, s = err.std(0, ddof=1), int((np.asarray(Y) > 0).sum())
    hi = np.maximum(est + Z95 * se, spread_bound(Y, T, n, budgets))
    return est, np.clip(est - Z95 * se, s, n), np.clip(hi, s, n)


def extrapolation(runs, n):
    """Per method and band: every repeat's estimates (with bootstrap intervals) at N_G, MULTIPLES x
    N_G and in total, and their means over repeats; plus the check (from the first N_G / CHECK, for
    CHECK x as many)."""
    out, check = {}, {}
    for k, ru in enumerate(runs):
        rng = np.random.default_rng([ru["seed"], k])
        budgets = [ru["T"] * f for f in (1,) + MULTIPLES] + [math.inf]
        for band in ("any", "high"):
            est, lo, hi = extrapolate_interval(ru[band], ru["T"], n, budgets, rng)
            out.setdefault(ru["method"], {}).setdefault(band, []).append(
                dict(repeat=ru["repeat"], n_gen=ru["T"], estimate=est.tolist(), lo=lo.tolist(),
                     hi=hi.tolist()))
        if ru["T0"] >= 2:
            est, lo, hi = extrapolate_interval(ru["first"], ru["T0"], n, [CHECK * ru["T0"]], rng)
            check.setdefault(ru["method"], []).append(dict(repeat=ru["repeat"], n_small=ru["T0"],
                                                           n_large=CHECK * ru["T0"],
                                                           estimate=est[0], lo=lo[0], hi=hi[0],
                                                           reached=ru["at_check"],
                                                           small=int((ru["first"] > 0).sum())))
    labels = ["N_G"] + [f"{f}x" for f in MULTIPLES] + ["total"]
    summary = {m: {band: {lab: dict(_ci([r["estimate"][i] for r in reps]),
                                    lowest=min(r["lo"][i] for r in reps),
                                    highest=max(r["hi"][i] for r in reps))
                          for i, lab in enumerate(labels)}
                   for band, reps in bands.items()} for m, bands in out.items()}
    return dict(budgets=labels, per_repeat=out, mean=summary, check=check)


def span(s, nd=1):
    """'mean [lowest, highest]': the mean estimate over repeats and the span of the repeats' 95 %
    intervals."""
    return f"{s['mean']:.{nd}f} [{s['lowest']:.{nd}f}, {s['highest']:.{nd}f}]"


def _ci(values):
    m, lo, hi = evidence.count_ci(values)
    return dict(mean=m, lo=lo, hi=hi, n=len(values))


# ================================================================== leaked images, figures, verdict

def figure(ru, f):
    """One run's figure f: hit rate (AMS %, any / high band), hits (generations in any band) or
    distinct images."""
    m = ru["metrics"]
    return dict(hit_rate_any=m["ams_any"], hit_rate_high=m["ams"].get("high", 0.0),
                hits_any=round(m["ams_any"] * ru["T"] / 100),
                distinct_any=m["distinct_any"], distinct_high=m["distinct"].get("high", 0))[f]


STATS = {"hit_rate_any": "hit rate, any band (AMS %)",
         "hit_rate_high": "hit rate, high band (AMS %)",
         "distinct_any": "distinct images, any band", "distinct_high": "distinct images, high band"}
CLAIMS = (("uncond", "plain sampling (Carlini UnCond)"),
          ("cond", "Carlini Cond (classifier on the true labels)"))
CLAIM_FIGURES = {"distinct_any": "distinct training images reached (any band, UMS x N_G)",
                 "hits_any": "generations that hit a training image (any band, AMS x N_G)"}


def method_stats(runs, methods):
    """{method: {figure: {mean, lo, hi, n, values}}}: the mean over repeats with its Student-t 95 %
    interval."""
    out = {}
    for m in methods:
        vals = {f: [figure(ru, f) for ru in runs if ru["method"] == m] for f in STATS}
        out[m] = {f: dict(_ci(v), values=v) for f, v in vals.items()}
    return out


def verdict(runs):
    """SIDE against plain sampling and Carlini Cond (those run), on distinct images and on hits,
    paired by repeat and decided as one family (evidence.decide: Holm-corrected and raw
    intervals)."""
    by, R = {(ru["method"], ru["repeat"]): ru for ru in runs}, 1 + max(ru["repeat"] for ru in runs)
    specs = []
    for other, name in CLAIMS:
        if ("side", 0) in by and (other, 0) in by:
            for f, what in CLAIM_FIGURES.items():
                a, b = ([figure(by[(m, r)], f) for r in range(R)] for m in ("side", other))
                specs.append((f"SIDE more than {name}: {what}", evidence.paired_log_ratio(a, b),
                              1.0, dict(side=a, other=b)))
    return evidence.decide(specs)


def leaked(runs, best, bands, kind, names, R):
    """leaked.csv's rows: every training image some run reached in some band, the most reliable
    first: found in more repeats, then by more (method, repeat) attacks, then by more generations,
    then closer."""
    found = np.stack([ru["any"] > 0 for ru in runs])
    rep, hits = np.array([ru["repeat"] for ru in runs]), np.sum([ru["any"] for ru in runs], 0)
    methods = list(dict.fromkeys(ru["method"] for ru in runs))
    rows = []
    for j in np.flatnonzero(found.any(0)):
        per = {m: int(sum(found[k, j] for k, ru in enumerate(runs) if ru["method"] == m))
               for m in methods}
        w = best["where"][j]
        rows.append(dict(
            index=int(j), image=names[j], best_value=float(best["value"][j]),
            band=next((b for b, (lo, hi) in bands.items()
                       if metrics.in_band(best["value"][j], lo, hi, kind)), ""),
            repeats=len(set(rep[found[:, j]].tolist())), attacks=int(found[:, j].sum()),
            hits=int(hits[j]),
            methods=" ".join(f"{m}:{c}/{R}" for m, c in per.items() if c),
            closest=f"{w['method']} #{w['index']} of repeat {w['repeat']}", closest_seed=w["seed"]))
    rows.sort(key=lambda r: (-r["repeats"], -r["attacks"], -r["hits"], -best["score"][r["index"]],
                             r["index"]))
    return [dict(rank=i, **r) for i, r in enumerate(rows, 1)]


def training_names(cfg, n):
    """Each training image's name: its file relative to --data, 'FILE.npz#i', or 'faces #i'. A
    train.py checkpoint audits its own seeded sample of its data: the permutation data.load_data
    draws picks the names. '#i' (the index) where the listing does not match the n images
    audited."""
    info = models.load_model(cfg.ckpt)[2]
    own = info.data or dict(spec=cfg.data, n=None, seed=0)
    spec = cfg.data or own["spec"]
    if os.path.isdir(spec):  # metrics.load_images's order: sorted paths
        names = [os.path.relpath(f, spec) for f in metrics.image_files(spec)]
    elif spec.endswith(".npz"):
        with np.load(spec, allow_pickle=False) as z:
            names = [f"{os.path.basename(spec)}#{i}" for i in range(len(z["images"]))]
    else:  # the procedural faces: drawn from their seed, the index is the name
        return [f"faces #{i}" for i in range(n)]
    if own["n"] is not None:
        names = [names[p]
                 for p in np.random.default_rng(own["seed"]).permutation(len(names))[:own["n"]]]
    return names if len(names) == n else [f"#{i}" for i in range(n)]


# ============================================================================ outputs

def command(cfg):
    """The extract.py command line of cfg: every option that differs from its default (and
    --ckpt)."""
    default, parts = type(cfg)(), ["python", "extract.py"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "ckpt" or v != getattr(default, f.name):
            parts.append(f"--{f.name.replace('_', '-')}="
                         + shlex.quote(",".join(map(str, v)) if isinstance(v, tuple) else str(v)))
    return " ".join(parts)


def _tile(a, scale):
    """An image of any channel count (H, W), (H, W, 1) or (H, W, 3) as an RGB PIL image,
    enlarged."""
    a = np.asarray(a)
    img = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a).convert("RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def leaked_grid(path, rows, train, best, top, R, cols=GRID_COLS):
    """PNG: the `top` most reliably leaked training images, each beside its closest generation,
    labelled with its index, best value and the repeats that found it (none leaked: no file)."""
    rows = rows[:top]
    if not rows:
        if os.path.exists(path):
            os.unlink(path)
        return
    scale = max(1, round(GRID_PX / train.shape[2]))
    w, h = _tile(train[0], scale).size
    pad, label = 10, 14
    cw, ch = max(2 * w + 2, 100), h + label + pad
    canvas = Image.new("RGB", (pad + cols * (cw + pad), pad + math.ceil(len(rows) / cols) * ch),
                       "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for k, r in enumerate(rows):
        x, y = pad + (k % cols) * (cw + pad), pad + (k // cols) * ch
        canvas.paste(_tile(train[r["index"]], scale), (x, y))
        canvas.paste(_tile(best["image"][r["index"]], scale), (x + w + 2, y))
        draw.text((x, y + h + 1), f"#{r['index']} {r['best_value']:.3f} {r['repeats']}/{R}",
                  fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_csv(path, rows):
    fields = ["rank", "index", "image", "best_value", "band", "repeats", "attacks", "methods",
              "hits", "closest", "closest_seed"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_audit(cfg, base, cfgs, target):
    """leaked.csv, leaked.png, AUDIT_REPORT.md and metrics.json's `audit` (repeat 0's file) in
    `base`."""
    folders = [base] + [c.out for c in cfgs[1:]]
    runs, best, bands, kind = collect(cfg, folders, target.ds, target.device)
    n, methods = len(target.ds.images), cfg.methods.split(",")
    rows = leaked(runs, best, bands, kind, training_names(cfg, n), cfg.repeats)
    a = dict(command=command(cfg), n_train=n, data=target.ds.source,
             similarity=runs[0]["metrics"]["value"], bands=bands,
             repeats=[dict(repeat=r, seed=c.seed, syn_seed=c.syn_seed, folder=folders[r])
                      for r, c in enumerate(cfgs)],
             n_gen={m: next(ru["T"] for ru in runs if ru["method"] == m) for m in methods},
             stats=method_stats(runs, methods), verdict=verdict(runs), leaked=rows,
             extrapolation=extrapolation(runs, n))
    a = json.loads(json.dumps(a, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
    write_csv(os.path.join(base, "leaked.csv"), rows)
    leaked_grid(os.path.join(base, "leaked.png"), rows, target.ds.images, best,
                max(cfg.grid_top, 1), cfg.repeats)
    text = audit_report(cfg, a)
    atomic_write_text(os.path.join(base, "AUDIT_REPORT.md"), text)
    rec = _json(os.path.join(base, "metrics.json"))
    atomic_write_json(os.path.join(base, "metrics.json"), dict(rec, audit=a))
    print(text)
    return a


def _name(m):
    return METHOD_NAMES.get(m, m)


def audit_report(cfg, a):
    """AUDIT_REPORT.md: what was run, the verdict, the leaked images, the extrapolation and its
    check."""
    R, n, rows, st = cfg.repeats, a["n_train"], a["leaked"], a["stats"]
    every, high = sum(r["repeats"] == R for r in rows), sum(r["band"] == "high" for r in rows)
    L = [f"# Privacy audit of {cfg.ckpt}", "",
         f"**What was run:** `{a['command']}`: the same attack {R} times on this one model, each "
         "repeat with its own synthetic set, clustering, classifiers and generation noise (seeds "
         f"at the end); methods {', '.join(_name(m) for m in a['stats'])}, N_G = {cfg.n_gen}, "
         f"{cfg.sampler} {cfg.sample_steps} steps. Training set: {n} images ({a['data']}). "
         f"Similarity: {a['similarity']}; bands "
         + ", ".join(f"{b} {lo:g}-{hi:g}" for b, (lo, hi) in a["bands"].items()) + ".", "",
         "**Scope:** repeats on ONE model measure the attack's own randomness on this model, not "
         "model-to-model variation: the same recipe trained again (other initial weights or data "
         "sample) may leak other images.", "",
         "## Verdict", "",
         f"- **{len(rows)} of {n} training images ({100 * len(rows) / n:.0f} %) leaked**: reached "
         f"in some band by some method in some repeat; {every} in every repeat; {high} at best in "
         "the high band (leaked.csv)."]
    for v in a["verdict"]:
        c, raw = v["corrected"], v["raw"]
        iv = ("no interval" if c["lo"] is None
              else f"{100 * c['level']:.1f} % interval [{c['lo']:.2f}, {c['hi']:.2f}]")
        riv = "" if raw["lo"] is None else f"; uncorrected 95 % [{raw['lo']:.2f}, {raw['hi']:.2f}]"
        L.append(f"- **{v['status']}**: {v['claim']}: {v['ratio']:.2f}x, Holm-corrected {iv}{riv} "
                 f"(paired over {v['replicates']} repeats)")
    if not a["verdict"]:
        L.append("- no paired verdict: it needs SIDE and Carlini UnCond (or Cond) in --methods")
    for m, s in a["extrapolation"]["mean"].items():
        if m in ("uncond", "side"):
            x, tot = s["any"][f"{MULTIPLES[0]}x"], s["any"]["total"]
            L.append(f"- {_name(m)} with {MULTIPLES[0]}x the generations would reach {span(x)} "
                     f"training images (any band); reachable by it in total: {span(tot)} (estimate "
                     "[95 % interval], see below)")
    L += ["", f"## Per method (mean over {R} repeats [95 % interval])", "",
          "| method | N_G | " + " | ".join(STATS.values()) + " |", "|---|---|"
          + "---|" * len(STATS)]
    L += [f"| {_name(m)} | {a['n_gen'][m]} | " + " | ".join(ci(s[f]) for f in STATS) + " |"
          for m, s in st.items()]
    L += ["", f"## Leaked training images ({min(TABLE_ROWS, len(rows))} most reliable of "
              f"{len(rows)}; all in leaked.csv)", "",
          "Sorted by the repeats that found the image, then the (method, repeat) attacks, then the "
          "generations that reached it.", "",
          "| rank | image | best value | band | repeats | found by (repeats) | generations | "
          "closest generation |", "|---|---|---|---|---|---|---|---|"]
    L += [f"| {r['rank']} | {r['image']} | {r['best_value']:.4f} | {r['band']} | "
          f"{r['repeats']}/{R} | {r['methods']} | {r['hits']} | "
          f"{r['closest']} |" for r in rows[:TABLE_ROWS]]
    L += ["", "![each leaked training image (left) beside its closest generation "
              "(right)](leaked.png)", ""] if rows else [""]
    return "\n".join(L + budget_section(cfg, a) + ["## Reproduce", "", f"    {a['command']}", "",
                                                   "| repeat | seed | syn-seed | folder |",
                                                   "|---|---|---|---|"]
                     + [f"| {r['repeat']} | {r['seed']} | {r['syn_seed']} | {r['folder']} |"
                        for r in a["repeats"]] + [""])


def budget_section(cfg, a):
    """The extrapolation table and its check on this model, as Markdown lines."""
    ex, R = a["extrapolation"], cfg.repeats
    L = ["## How many a larger budget would reach", "",
         f"Distinct training images reached after N_G, {' and '.join(f'{f}x' for f in MULTIPLES)} "
         f"as many generations (these included) and in total, of {a['n_train']}: the mean over {R} "
         "repeats of Chao et al. 2014's estimate (audit.extrapolate) [lowest lower end, highest "
         "upper end of the repeats' 95 % intervals] (per repeat: metrics.json). The estimate is "
         "low where hit probabilities vary or hits are few; the upper end holds anyway: it is the "
         "most images the hit probability not yet spent on reached images could reach, spread "
         "evenly (audit.spread_bound). No finite run bounds the total from above: images reached "
         "once in a million generations leave no trace in these.", "",
         "| method | band | " + " | ".join(ex["budgets"]) + " |", "|---|---|"
         + "---|" * len(ex["budgets"])]
    for m, bands in ex["mean"].items():
        L += [f"| {_name(m)} | {band} | " + " | ".join(span(s[b]) for b in ex["budgets"]) + " |"
              for band, s in bands.items()]
    L += ["", f"**Check on this model:** each repeat's estimate from its first N_G/{CHECK} "
          f"generations of the count {CHECK}x as many reach (the first generations of a run are "
          "exactly a run with that smaller N_G), against what they reached:", "",
          "| method | generations: small -> large | reached by the small run | estimated "
          "[interval] | reached by the large run | repeats inside their interval |",
          "|---|---|---|---|---|---|"]
    for m, c in ex["check"].items():
        inside = sum(r["lo"] <= r["reached"] <= r["hi"] for r in c)
        est = dict(mean=np.mean([r["estimate"] for r in c]), lowest=min(r["lo"] for r in c),
                   highest=max(r["hi"] for r in c))
        L.append(f"| {_name(m)} | {c[0]['n_small']} -> {c[0]['n_large']} | "
                 f"{np.mean([r['small'] for r in c]):.1f} | {span(est)} | "
                 f"{np.mean([r['reached'] for r in c]):.1f} | {inside}/{len(c)} |")
    if not ex["check"]:
        L.append(f"| (needs N_G >= {2 * CHECK}) | | | | | |")
    return L + [""]
