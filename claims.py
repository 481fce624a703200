"""The claims reproduce.py decides, from its per-replicate rows: the paper's, on both of its
metrics, and the controls, as ONE family corrected for multiplicity (evidence.decide:
Holm-Bonferroni), plus descriptive lines that carry an interval but no verdict.

The paper's headline (arXiv 2410.02467v7, Table 1 and the abstract's "over 50 % more effective") is
a statement about AMS and UMS in each similarity band. Here every comparison of SIDE with a baseline
is made on both metrics, counted per replicate at equal N_G: the hit count (generations whose
nearest training image is in a band: AMS x N_G / 100) and the distinct count (training images
reached: UMS x N_G / 100), in any band and in the high band, each at the thresholds 1 (more) and 1.5
(the paper's 50 % more). A ratio pooled over training-set sizes is the stratified mean of per-size
paired log-ratios (every replicate of every size is independent). Depends on evidence.py (numpy)
only.
"""
import evidence

NAMES = dict(uncond="Carlini UnCond", cond="Carlini Cond (classifier on the true labels)",
             cond_ddpm="a class-conditional DDPM on the true labels (Cond, other reading)",
             side_random="SIDE with its surrogate labels permuted (control)",
             uncond_budget="UnCond with SIDE's whole budget N_syn + N_G (compute-matched)")
METRIC_NAMES = dict(hits="hit rate (AMS)", distinct="distinct training images (UMS)")
PAPER_THRESHOLDS = (1.0, 1.5)  # "more", and the abstract's "over 50 % more effective"


def value(row, metric, band):
    """The count of `metric` (hits or distinct) in `band` (any = all bands together) of one row."""
    return row[f"{metric}_any"] if band == "any" else row[metric][band]


def paired(rows, a, b, metric, band, arm="table", sizes=None):
    """(a values, b values, size of each pair) over the replicates that ran both
    methods in `arm`."""
    by = {(r["arm"], r["n_train"], r["replicate"], r["method"]): r for r in rows}
    keys = sorted(k[:3] for k in by if k[0] == arm and k[3] == a and k[:3] + (b,) in by
                  and (sizes is None or k[1] in sizes))
    return ([value(by[k + (a,)], metric, band) for k in keys],
            [value(by[k + (b,)], metric, band) for k in keys],
            [k[1] for k in keys])


def _ratio(rows, a, b, metric, band, arm="table", sizes=None):
    va, vb, strata = paired(rows, a, b, metric, band, arm, sizes)
    if len(va) < 2 or max(va + vb) == 0:  # nothing found by either: a ratio of 1 says nothing
        return None
    return evidence.paired_log_ratio(va, vb, strata=strata)


def family(rows, conditional, sizes, weak_size=None, cond_is_uncond=False):
    """The specs (text, Estimate, threshold, extra) of every claim of one run, in report order.
    cond_is_uncond: Carlini Cond's tuned guidance scale is 0, so its generations are plain
    sampling's, bit for bit; its claims would repeat UnCond's and are left out (one hypothesis is
    tested once)."""
    specs = []
    baselines = ("uncond",) if cond_is_uncond else ("uncond", "cond")

    def add(text, est, thr=1.0, **extra):
        if est is not None:
            specs.append((text, est, thr, dict(extra)))

    for b in baselines:  # the paper's Table 1, on both metrics, any and high band, > 1 and > 1.5
        for metric in ("hits", "distinct"):
            for band in ("any", "high"):
                for thr in PAPER_THRESHOLDS:
                    verb = "more" if thr == 1 else "at least 1.5x (the paper: over 50 % more)"
                    add(f"SIDE {verb} than {NAMES[b]}: {METRIC_NAMES[metric]}, {band} band",
                        _ratio(rows, "side", b, metric, band), thr, group="paper", baseline=b,
                        metric=metric, band=band)
    for metric in ("hits", "distinct"):  # controls: one factor each
        add(f"SIDE more than {NAMES['side_random']}: {METRIC_NAMES[metric]}, any band",
            _ratio(rows, "side", "side_random", metric, "any"), group="control", metric=metric)
    add(f"SIDE more than {NAMES['uncond_budget']}: distinct training images, any band",
        _ratio(rows, "side", "uncond_budget", "distinct", "any"), group="control",
        metric="distinct")
    add("SIDE counting its synthetic set (N_syn + N_G samples) more than UnCond with the same "
        "N_syn + N_G: distinct training images, any band",
        _ratio(rows, "side_union", "uncond_budget", "distinct", "any"),
        group="control", metric="distinct")
    for metric in ("hits", "distinct"):
        add(f"SIDE more than {NAMES['cond_ddpm']}: {METRIC_NAMES[metric]}, any band",
            _ratio(rows, "side", "cond_ddpm", metric, "any"), group="control", metric=metric)
    # the abstract's "where previous methods fail": a weakly memorized model
    if weak_size is not None:
        for b in baselines:
            for metric in ("hits", "distinct"):
                add(f"weakly memorized model (n={weak_size}): SIDE more than {NAMES[b]}: "
                    f"{METRIC_NAMES[metric]}, any band",
                    _ratio(rows, "side", b, metric, "any", arm="weak"), group="weak", baseline=b,
                    metric=metric)
    _size_claims(rows, sizes, add)
    _label_claims(conditional, add)
    return specs


def _size_claims(rows, sizes, add):
    """Smaller sets leak more: UnCond's hit rate and its share of the training set at the
    smallest size against the largest (unpaired: different models)."""
    small, large = min(sizes), max(sizes)
    if small != large:
        for metric, what in (("hits", "UnCond's hit rate"),
                             ("share", "the share of its training set UnCond reaches")):
            a, b = ([_size_value(r, metric) for r in rows if r["arm"] == "table"
                     and r["method"] == "uncond" and r["n_train"] == n] for n in (small, large))
            if min(len(a), len(b)) >= 2 and max(a + b) > 0:
                add(f"smaller sets leak more: {what}, n={small} above n={large} (each size at its "
                    "calibrated budget)",
                    evidence.unpaired_log_ratio(a, b), group="size", metric=metric)


def _label_claims(conditional, add):
    """SIDE Definition 1 / Theorem 1: each labelling's Δ < 0, and informative below permuted."""
    deltas = {c["labelling"]: c["delta"]["per_replicate"] for c in conditional if c.get("delta")}
    # SIDE Definition 1 / SIDE Theorem 1: a label lowers M (more memorization)
    for lab, per in deltas.items():
        if len(per) >= 2:
            add(f"{lab} labels lower the memorization divergence: "
                "Δ = M(conditional) − M(unconditional) < 0 (nats)",
                evidence.mean_estimate(per), 0.0, direction="<", group="conditional")
    inf, perm = deltas.get("informative", []), deltas.get("permuted", [])
    if len(inf) == len(perm) >= 2:  # the same classes and class sizes: only informativeness differs
        add("informative labels lower it more than the same labels permuted: "
            "Δ(informative) − Δ(permuted) < 0 (nats, paired by replicate)",
            evidence.mean_estimate([a - b for a, b in zip(inf, perm)]), 0.0, direction="<",
            group="conditional")


def _size_value(row, metric):
    """Hits (AMS x N_G / 100, any band) or the share of the n training images reached
    (distinct / n, x 100)."""
    return row["hits_any"] if metric == "hits" else 100.0 * row["distinct_any"] / row["n_train"]


def descriptive(rows, curves, sizes, steps=None):
    """Per-size paired ratios of SIDE to UnCond on both metrics (raw 95 % intervals, no verdict),
    the ceiling of each UMS comparison (how much of its training set plain sampling already
    reaches), the budget from which SIDE with its synthetic set stays ahead of plain sampling, and
    the sampler check: the same attack with steps[1] sampler steps against the reported steps[0],
    paired by replicate."""
    out = []
    if steps and any(r["arm"] == "steps" for r in rows):
        by = {(r["arm"], r["n_train"], r["replicate"], r["method"]): r for r in rows}
        for m in ("uncond", "side"):
            for metric in ("hits", "distinct"):
                keys = sorted(k[1:3] for k in by if k[0] == "steps" and k[3] == m)
                a = [value(by[("steps", n, r, m)], metric, "any") for n, r in keys]
                b = [value(by[("table", n, r, m)], metric, "any") for n, r in keys]
                if len(a) >= 2:
                    ratio, lo, hi = evidence.paired_ratio(a, b)
                    out.append(dict(kind="steps", method=m, metric=metric, ratio=ratio, lo=lo,
                                    hi=hi, replicates=len(a),
                                    text=f"{steps[1]} / {steps[0]} sampler steps, "
                                         f"{NAMES.get(m, 'SIDE')}, {METRIC_NAMES[metric]}, "
                                         "any band (the same replicates, seeds and models)"))
    for n in sizes:
        for metric in ("hits", "distinct"):
            va, vb, _ = paired(rows, "side", "uncond", metric, "any", sizes=[n])
            if len(va) >= 2:
                r, lo, hi = evidence.paired_ratio(va, vb)
                out.append(dict(kind="per size", n=n, metric=metric, ratio=r, lo=lo, hi=hi,
                                replicates=len(va),
                                text=f"n={n}: SIDE / Carlini UnCond, {METRIC_NAMES[metric]}, "
                                     "any band"))
        reached = [r["distinct_any"] for r in rows
                   if r["arm"] == "table" and r["method"] == "uncond" and r["n_train"] == n]
        if reached:
            m, lo, hi = evidence.count_ci(reached)
            out.append(dict(kind="ceiling", n=n, mean=m, lo=lo, hi=hi, share=m / n,
                            text=f"n={n}: plain sampling reaches {m:.1f} of {n} training images "
                                 f"({100 * m / n:.0f} %): a distinct-count ratio cannot exceed "
                                 f"{(n + 1) / (m + 1):.2f}"))
        u, s = curves.get(f"{n}/uncond_budget"), curves.get(f"{n}/side_union")
        if u and s:
            out.append(dict(kind="budget", n=n, budget=evidence.overtake(s, u),
                            text=f"n={n}: budget from which SIDE (synthetic set + guided) stays "
                                 "ahead of plain sampling, by mean distinct images"))
    return out


def verdict(rows, curves, conditional, sizes, weak_size=None, steps=None, cond_is_uncond=False):
    """{claims: the decided family (evidence.decide), descriptive: the lines without a verdict}."""
    claims = evidence.decide(family(rows, conditional, sizes, weak_size, cond_is_uncond))
    return dict(claims=claims, descriptive=descriptive(rows, curves, sizes, steps),
                family=dict(size=len(claims), alpha=evidence.ALPHA, method="Holm-Bonferroni",
                            cond_is_uncond=cond_is_uncond))


def summarize_table(rows, sizes, arm="table"):
    """{"n/method": evidence.summarize(...)} of one arm's rows."""
    stats = {}
    for n in sizes:
        for m in sorted({r["method"] for r in rows if r["arm"] == arm and r["n_train"] == n}
                        - {"side_union"}):
            sel = [r for r in rows if r["arm"] == arm and r["n_train"] == n and r["method"] == m]
            stats[f"{n}/{m}"] = evidence.summarize(sel,
                                                   fields=("distinct_any", "ams_any", "hits_any"))
    return stats


def check_independent(plan):
    """Raise ValueError unless no seed is used by two replicates (any role, any kind of seed)."""
    seen = {}
    for rep in plan:
        for kind, s in rep["seeds"].items():
            if s in seen and seen[s] != rep["name"]:
                raise ValueError(f"seed {s} is shared by {seen[s]} and {rep['name']} ({kind})")
            seen[s] = rep["name"]
    return len(seen)
