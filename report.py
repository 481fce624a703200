"""Pictures, tables and output files for the reports: Table-1-shaped Markdown, grids of each
extracted image beside its nearest training images, the sweep and budget plots (drawn by plots.py),
reproduce.py's REPORT.md sections, extract.py's output files (write_extraction, write_sweep), and
the README's tables from committed runs (`python report.py --compare ...`).

Used by extract.py, reproduce.py and audit.py; imports metrics.py (for the nearest neighbours in
grids), plots.py, evidence.py and common.py.
"""
import argparse
import dataclasses
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import metrics
import plots
from common import UserError, atomic_write_bytes, atomic_write_json, atomic_write_text, run_main
from evidence import mean_ci

BANDS = ("low", "mid", "high")


def _png(img, path):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def fmt(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def extraction_table(rows, first="method"):
    """Markdown table in the shape of the paper's Table 1: AMS and UMS (%) per band, distinct
    training images per band, p95 similarity, Carlini and Yoon counts. rows: name -> metrics
    dict."""
    head = ([first] + [f"AMS {b}" for b in BANDS] + [f"UMS {b}" for b in BANDS]
            + [f"distinct {b}" for b in BANDS]
            + ["p95", "Carlini", "Yoon"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = ([name] + [fmt(r["ams"].get(b)) for b in BANDS]
                 + [fmt(r["ums"].get(b)) for b in BANDS]
                 + [fmt(r["distinct"].get(b)) for b in BANDS]
                 + [fmt(r.get("p95"), 4), fmt(r.get("carlini_extracted")),
                    fmt(r.get("yoon_extracted"))])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def grid_of_matches(path, gen, train, result, top=16, k=3, scale=4, similarity="l2"):
    """PNG: one row per extracted generation (best match first): the generation, then its k nearest
    training images, each labelled with its normalized L2 distance; a grey PNG (mode L) for grey
    images."""
    order = np.argsort(np.asarray(result["nn_value"]))  # smallest distance first
    order = order[:top]
    if len(order) == 0:
        return
    d, idx = metrics.knn(gen[order], train, k=min(k, len(train)), metric="l2")
    d, idx = np.asarray(d), np.asarray(idx)
    h, w = gen.shape[1] * scale, gen.shape[2] * scale
    pad, label = 4, 12
    grey = gen.shape[-1] == 1
    tile = (lambda im: Image.fromarray(im[..., 0] if grey else im)  # noqa: E731
            .resize((w, h), Image.NEAREST))
    canvas = Image.new("L" if grey else "RGB",
                       ((w + pad) * (k + 1) + pad * 3, (h + label + pad) * len(order) + pad),
                       "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r, g in enumerate(order):
        y = pad + r * (h + label + pad)
        canvas.paste(tile(gen[g]), (pad, y))
        draw.text((pad, y + h), f"gen {g}", fill="black", font=font)
        for j in range(idx.shape[1]):
            x = pad * 4 + (j + 1) * (w + pad)
            canvas.paste(tile(train[idx[r, j]]), (x, y))
            draw.text((x, y + h), f"{d[r, j]:.3f}", fill="black", font=font)
    _png(canvas, path)


# ----------------------------------------------------------------------------- make reproduce

METHOD_NAMES = {"uncond": "Carlini UnCond",
                "cond": "Carlini Cond (classifier guidance, true labels)",
                "cond_ddpm": "Cond, other reading: class-conditional DDPM (true labels)",
                "side": "SIDE",
                "side_random": "SIDE, surrogate labels permuted (control)",
                "uncond_budget": "UnCond with SIDE's budget N_syn+N_G (compute-matched)",
                "side_union": "SIDE, synthetic set + guided generations"}


def ci(d, nd=1):
    """'mean [lo, hi]' of a {mean, lo, hi} dict (the interval left out when there is none)."""
    if d is None or d.get("mean") is None:
        return "–"
    if d.get("lo") is None:
        return f"{d['mean']:.{nd}f}"
    return f"{d['mean']:.{nd}f} [{d['lo']:.{nd}f}, {d['hi']:.{nd}f}]"


def curve_plot(path, curves, n, n_syn):
    """The extraction-versus-budget plot of one training-set size from
    summary['stats']['curves']."""
    order = ("uncond_budget", "cond", "side", "side_union", "side_random")
    label = dict(uncond_budget="Carlini UnCond", cond="Carlini Cond",
                 side="SIDE (guided only, from N_syn)",
                 side_union="SIDE incl. its synthetic set", side_random="SIDE, random labels")
    series = {label[m]: [(p["budget"], p["mean"], p["lo"], p["hi"]) for p in curves[f"{n}/{m}"]]
              for m in order if curves.get(f"{n}/{m}")}
    img = plots.band_plot(series, xlabel=f"samples drawn (N_syn = {n_syn})",
                          ylabel=f"distinct training images of {n}, any band")
    if img is not None:
        _png(img, path)


def write_sweep(out, name, rows):
    """sweep_<name>.json (the rows) and sweep_<name>.png (distinct training images per band
    against the swept value) in `out`."""
    atomic_write_json(os.path.join(out, f"sweep_{name}.json"), rows)
    _png(plots.line_plot([r["value"] for r in rows],
                         {b: [r["distinct"][b] for r in rows] for b in rows[0]["distinct"]},
                         xlabel=name, ylabel="distinct training images extracted"),
         os.path.join(out, f"sweep_{name}.png"))


def size_table(stats, n, units_of):
    head = (["method", "replicates", "distinct any", "AMS any %"] + [f"AMS {b} %" for b in BANDS]
            + [f"UMS {b} %" for b in BANDS])
    L = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ("uncond", "cond", "cond_ddpm", "side", "side_random", "uncond_budget"):
        st = stats.get(f"{n}/{m}")
        if st is None:
            continue
        L.append("| " + " | ".join([METHOD_NAMES[m] + f" (N_G={units_of(m)})",
                                    str(st["distinct_any"]["n"]),
                                    ci(st["distinct_any"]), ci(st["ams_any"])]
                                   + [ci(st["ams"].get(b)) for b in BANDS]
                                   + [ci(st["ums"].get(b)) for b in BANDS]) + " |")
    return "\n".join(L)


def _iv(lo, hi, nd=2):
    return "no interval" if lo is None else f"[{lo:.{nd}f}, {hi:.{nd}f}]"


def verdict_table(verdict):
    """The decided family: estimate, uncorrected 95 % interval and status, the Holm-corrected
    interval (at the level Holm tests the claim) and the verdict, replicates, and replicates the
    claim would need."""
    fam = verdict["family"]
    L = [f"{fam['size']} claims decided together ({fam['method']}, family-wise error <= "
         f"{100 * fam['alpha']:.0f} %). Ratios are geometric means over replicates of (a + 1) / "
         "(b + 1), paired within a replicate and pooled over sizes as the mean of the per-size "
         "means; Δ in nats. *needed*: replicates at which the corrected interval would exclude the "
         "threshold at the observed effect and spread.", "",
         "| claim | threshold | estimate | 95 % interval | uncorrected | corrected interval "
         "(level) | **verdict** | replicates | needed |", "|---|---|---|---|---|---|---|---|---|"]
    for c in verdict["claims"]:
        unit = "x" if c["scale"] == "ratio" else ""
        cor = c["corrected"]
        L.append(f"| {c['claim']} | {c['direction']} {c['threshold']:g} | {c['ratio']:.2f}{unit} | "
                 f"{_iv(c['raw']['lo'], c['raw']['hi'])} | {c['raw']['status']} | "
                 f"{_iv(cor['lo'], cor['hi'])} ({100 * cor['level']:.2f} %) | **{c['status']}** | "
                 f"{c['replicates']} | {fmt(c.get('needed'))} |")
    return "\n".join(L)


def descriptive_lines(verdict):
    out = []
    for d in verdict["descriptive"]:
        if d["kind"] in ("per size", "steps"):
            out.append(f"- {d['text']}: {d['ratio']:.2f}x, 95 % interval {_iv(d['lo'], d['hi'])} "
                       f"({d['replicates']} replicates; descriptive, not decided)")
        elif d["kind"] == "ceiling":
            out.append(f"- {d['text']}")
        else:
            out.append(f"- {d['text']}: "
                       f"{d['budget'] if d['budget'] is not None else 'never, within the budget'}")
    return "\n".join(out)


def bands_section(b):
    """How the pixel-L2 bands were calibrated at the working resolution, and the check that no two
    distinct training images of any replicate fall inside a band."""
    low_edge = max(hi for lo, hi in b["bands"].values())
    closest = {k: v for k, v in b["closest_training_pairs"].items() if v is not None}
    worst = min(closest.items(), key=lambda kv: kv[1]) if closest else None
    L = [f"Bands of normalized pixel L2 (on [-1, 1]) calibrated on {b['n']} images of the data at "
         f"{'x'.join(map(str, b['shape'][:2]))} px (metrics.calibrate_l2_bands): "
         + ", ".join(f"{k} ({lo:.4f}, {hi:.4f}]" for k, (lo, hi) in b["bands"].items())
         + f". The closest two distinct images of that reference are {b['distinct_nn_min']:.4f} "
         "apart (1st percentile of nearest-neighbour distances "
         f"{b['distinct_nn_percentiles']['1']:.4f}); planted near-copies reach at most "
         + ", ".join(f"{k} {v['max']:.4f}" for k, v in b["planted"].items())
         + " (one-pixel shifts lie beyond every band "
         "under plain L2, as for the paper's metric)."]
    if worst:
        inside = [k for k, v in closest.items() if v <= low_edge]
        L.append(f"Closest two distinct training images of any replicate: {worst[1]:.4f} "
                 f"({worst[0]}); "
                 + (f"**inside a band in {len(inside)} replicates** ({', '.join(inside)})" if inside
                    else f"outside every band in all {len(closest)} training sets") + ".")
    return " ".join(L)


def _report_head(s):
    """The report's title, methods, verdict and the heading of its Table 1."""
    hw, p, ch, v = s["hardware"], s["profile_settings"], s["chosen"], s["verdict"]
    table_reps = [r for r in s["replicates"] if r["role"] == "table"]
    weak = next((r for r in table_reps if r["weak"]), None)
    L = [f"# SIDE reproduction ({s['profile']} profile, base seed {s['base_seed']})", "",
         f"Data: {s['data']}, {p['image_size']} px. Device: {s['device']} ({hw['processor']}, "
         f"{hw['cpus']} CPUs, torch {hw['torch']}{', ' + hw['cuda'] if hw['cuda'] else ''}). Wall "
         f"time of this invocation: {s['total_seconds'] / 60:.1f} min (a rerun reuses every "
         "finished stage, so only a first run measures the protocol).",
         "", "## Methods", "",
         f"**Replicates.** {p['replicates']} per training-set size ({len(table_reps)} in all). A "
         "replicate is one (size, r): its own training sample, initial weights and training "
         "stream, its own synthetic set, clustering and classifiers, and its own generation noise, "
         "each from a seed no other replicate uses (summary.json lists them). Methods are compared "
         "within a replicate (they attack the same model); claims pool all replicates of all "
         "sizes. Training: "
         f"{', '.join(f'n={n}: {e:g} epochs' for n, e in zip(p['sizes'], p['epochs']))} at batch "
         f"min({p['batch']}, n), models of one size trained together (ensemble.py, each as if "
         f"alone). N_G = {p['n_gen']}, N_syn = {p['n_syn']}, K = {p['K']}, {p['sample_steps']} "
         "DDIM steps (η = 1) for every method.",
         f"**Tuning.** λ = {ch['lam']:g} (SIDE) and guidance scale {ch['cond_scale']:g} (Carlini "
         f"Cond) are the best of sweeps on a tuning replicate ({ch['replicate']}) with seeds of "
         "its own; no reported model is tuned on."
         + (" Carlini Cond's best scale is 0: its classifier's guidance reached fewer training "
            "images than none, so Cond is plain sampling here (the same generations, bit for bit) "
            "and its claims, UnCond's, are decided once."
            if v["family"].get("cond_is_uncond") else ""),
         (f"**Weakly memorized arm.** Each replicate of n = {weak['n']} also keeps its model at "
          f"{p['weak_epochs']:g} epochs, where plain sampling reaches almost nothing "
          "(calibration), attacked with the same seeds."
          if weak else ""),
         (f"**Sampler.** {p['sample_steps']} DDIM steps for every method; the right-sizing is "
          f"checked in every run: replicates r < {p['check_replicates']} of each size repeat "
          f"UnCond and SIDE with {p['check_steps']} steps (the same models and seeds), compared "
          "below (descriptive)." if p.get("check_replicates") else ""),
         "**Similarity.** " + bands_section(s["bands"]), "",
         "## Verdict", "", verdict_table(v), "", "Descriptive (no verdict):", "",
         descriptive_lines(v), "",
         "## Table 1 in miniature", "",
         "Mean over replicates [95 % Student-t interval]. distinct = training images reached (UMS "
         "x N_G / 100).", ""]
    return L


def _table1_lines(s, paper):
    """Table 1 in miniature per size (and the weak arm), then the paper's Table 1."""
    p = s["profile_settings"]
    weak = next((r for r in s["replicates"] if r["role"] == "table" and r["weak"]), None)
    L = []
    for n in p["sizes"]:
        ng = {r["method"]: r["n_gen"] for r in s["rows"] if r["n_train"] == n
              and r["arm"] == "table"}
        L += [f"### {n} training images", "",
              size_table(s["stats"]["table"], n, lambda m: ng.get(m)), ""]
        L += [f"Command of replicate 0: `{s['commands'].get(f'n{n}-r0', '')}`", ""]
    if weak:
        ng = {r["method"]: r["n_gen"] for r in s["rows"] if r["arm"] == "weak"}
        L += [f"### Weakly memorized: {weak['n']} training images at {p['weak_epochs']:g} epochs",
              "",
              size_table(s["stats"]["weak"], weak["n"], lambda m: ng.get(m)), ""]
    L += ["### The paper's Table 1 (CelebA 128 px, SSCD cosine similarity, low band) for "
          "orientation", "",
          "Different data, resolution, similarity and scale: compare directions, not values.", "",
          "| dataset | AMS UnCond | AMS Cond | AMS SIDE | UMS UnCond | UMS Cond | UMS SIDE |",
          "|---|---|---|---|---|---|---|"]
    for name, ams, ums in paper:
        u = ums or {}
        L.append(f"| {name} | {ams['uncond']} | {ams['cond']} | {ams['side']} | "
                 f"{u.get('uncond', '–')} | {u.get('cond', '–')} | {u.get('side', '–')} |")
    return L


def _budget_lines(s):
    """The extraction-versus-budget curves and the sweeps of the tuning replicate."""
    L = ["", "## Extraction versus budget", "",
         "Distinct training images (any band) against the number of samples drawn, mean and 95 % "
          "band over replicates. SIDE's guided curve starts at N_syn, its synthetic set being "
          "spent budget; UnCond's first N_syn samples are SIDE's synthetic set, so the two diverge "
          "only after it.", ""]
    L += [f"![budget n={n}](curve_n{n}.png)" for n in s["profile_settings"]["sizes"]] + [""]
    L += ["## Sweeps (the tuning replicate)", "",
          "![λ sweep](sweep_lambda.png) ![Cond scale sweep](sweep_cond_scale.png)", ""]
    for key, sw in s["sweeps"].items():
        if sw:
            L.append(f"- {key}: "
                     + "; ".join(f"{r['value']:g}{' (extended)' if r.get('added') else ''}: "
                                 f"distinct {r['distinct']}" for r in sw))
    return L


def reproduce_report(s, grids, paper):
    """REPORT.md for reproduce.py's summary dict."""
    L = _report_head(s) + _table1_lines(s, paper) + _budget_lines(s)
    L += [""] + conditional_section(s) + ["## Grids (each extracted generation beside its nearest "
                                          "training images)", ""]
    L += [f"![{g}]({g})" for g in grids]
    L += ["", "## Stage times", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {k} | {t:.1f} |" for k, t in s["stage_seconds"].items()]
    L += [f"| total | {s['total_seconds']:.1f} |", ""]
    return "\n".join(x for x in L if x is not None)




def conditional_verdict(cond):
    """One line per labelling: does its label lower M (more memorization), raise it, or is it
    undecided?"""
    out = []
    for r in cond:
        d = r.get("delta")
        if d:
            lo, hi = d["ci95"]
            over = (f"mean over {d['n_units']} replicates (each its own training sample and "
                    "models), Student-t interval"
                    if d["n_units"] > 1 else "one replicate, Monte Carlo interval")
            out.append(f"- {r['labelling']} labels: {d['verdict']}; Δ = M(conditional) − "
                       f"M(unconditional) = {d['delta']:.2f} nats, 95 % interval [{lo:.2f}, "
                       f"{hi:.2f}], {over} (ε_k = {d['eps_k']:.4f}; SIDE Theorem 1's limit: Δ <= 0 "
                       "for informative labels, Δ -> 0 for random ones).")
    return "\n".join(out)


def conditional_section(s):
    """Markdown lines of the conditional-memorization experiment: plain sampling of the three models
    (means over units), M per model kind, the paired differences Δ per unit (Monte Carlo intervals)
    and over units (Student-t intervals), the verdict per labelling, and the exact Theorem 1
    check."""
    L = ["## Conditional memorization (the paper's Definition 1 and Theorem 1)", "",
         "In every replicate of the smallest size the same DDPM on the same images (the same "
         "seeds), trained unconditionally, with informative labels (the data's true labels) and "
         "with a seeded permutation of them (the same classes and class sizes: only which image "
         "carries which label changes); plain sampling with a uniformly drawn label per "
         "generation. What is estimated: M_k = KL(q_εk ‖ p_θ,k), SIDE Definition 1's divergence "
         "with p_θ,k the model's distribution of its own reverse chain stopped at the step k whose "
         "noise level is ε_k (rescaled by 1/sqrt(ᾱ_k)), i.e. without its last denoising steps "
         "(nats, smaller = more memorization). The printed M is an upper bound on M_k (log p_θ,k "
         "is bounded by that chain's variational bound, ddpm.subchain_nll), averaged over label "
         "subsets. Δ = M(D_j; conditional model given j) − M(D_j; unconditional model): paired, "
         "the same ε-samples, timesteps and forward noise for both models (the two bounds' gaps "
         "need not cancel exactly); per replicate, then over replicates (Student-t).", ""]
    cond = s["conditional"]
    if not cond:
        return L + ["Skipped: the data has no labels (no class subfolders).", ""]
    return L + _divergence_tables(s, cond) + [conditional_verdict(cond), ""] + _exact_checks(s)


def _divergence_tables(s, cond):
    """Plain sampling and M per labelling, Δ per replicate and over replicates, Δ by
    label-subset size, and the estimator's cost."""
    nc = min(s["profile_settings"]["sizes"])
    L = ["| labelling | replicates | distinct any | AMS any % | M (upper bound on M_k), mean over "
         "replicates |",
         "|---|---|---|---|---|"]
    for c in cond:
        lab = c["labelling"]
        rows = [r for r in s["rows"] if r["n_train"] == nc and r["method"] == "uncond"
                and r.get("labelling", "none") == lab and r["arm"] in ("table", "labelled")]
        st = {f: dict(zip(("mean", "lo", "hi"), mean_ci([r[f] for r in rows])))
              for f in ("distinct_any", "ams_any")}
        L.append(f"| {lab} | {len(rows)} | {ci(st['distinct_any'])} | {ci(st['ams_any'])} | "
                 f"{c['divergence']['estimate']:.1f} |")
    L += ["", "| labelling | replicate | label subsets | Δ (nats) | ± s.e. (Monte Carlo) | 95 % "
              "interval | verdict |",
          "|---|---|---|---|---|---|---|"]
    for r in cond:
        d = r.get("delta")
        if not d:
            continue
        for i, u in enumerate(d["units"]):
            L.append(f"| {r['labelling']} | {i} | {len(u['subsets'])} | {u['delta']:.2f} | "
                     f"{u['stderr']:.2f} | [{u['ci95'][0]:.2f}, {u['ci95'][1]:.2f}] | "
                     f"{u['verdict']} |")
        L.append(f"| **{r['labelling']}** | **over replicates** | | **{d['delta']:.2f}** | | "
                 f"**[{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]** | **{d['verdict']}** (uncorrected; "
                 "the corrected verdict is in the family above) |")
    L += ["", "Δ by label-subset size |D_j| (over the replicates that have subsets of that size; "
          "SIDE Theorem 1: the smaller and purer D_j, the larger the gain for an informative "
          "label):", "",
          "| labelling | \\|D_j\\| | replicates | subsets | Δ (nats) [95 %] |",
          "|---|---|---|---|---|"]
    for r in cond:
        for b in (r.get("delta") or {}).get("by_size", []):
            L.append(f"| {r['labelling']} | {b['size']} | {b['replicates']} | {b['subsets']} | "
                     f"{b['delta']:.2f} {_iv(*b['ci95'])} |")
    d = next((r["delta"] for r in cond if r.get("delta")), None)
    if d:
        L += ["", f"Cost: {d['n_mc']} samples of q_ε per label subset, "
              f"{d['unet_calls_per_sample']} UNet calls per sample and model (stratified timesteps "
              "drawn afresh per sample). Per label subset: summary.json.", ""]
    return L


def _exact_checks(s):
    """SIDE Theorem 1 on a Gaussian mixture with closed-form densities, and random labels at
    finite |D_i| (metrics.theorem1_check, metrics.random_label_check)."""
    L = ["### SIDE Theorem 1, exactly (Gaussian mixture with overlapping components, closed-form "
         "densities)", "",
         "Components 2σ apart, so log p − log p_i varies over the support; the exact conditional "
         "and unconditional densities as models. SIDE Theorem 1's limit is −KL(p_i‖p); for this "
         "finite D_i the ε → 0 value is the mean of log p − log p_i over D_i; log(N_i/N) is what "
         "disjoint supports would give.", "",
         "| ε | M(D_i; p_i) − M(D_i; p) | ± s.e. | ε → 0 value for this D_i | −KL(p_i‖p) | "
         "log(N_i/N) (disjoint) |",
         "|---|---|---|---|---|---|"]
    for t in s["theorem1"]:
        L.append(f"| {t['eps']} | {t['diff']:.4f} | {t['diff_stderr']:.4f} | "
                 f"{t.get('target_finite', float('nan')):.4f} | {t['target_neg_kl']:.4f} | "
                 f"{t['target_disjoint']:.4f} |")
    if s.get("random_label_check"):
        L += ["", "### Random labels at finite |D_i|, exactly (metrics.random_label_check)", "",
              "Labels independent of x split Gaussian data into 2 subsets; each model is the "
              "maximum-likelihood Gaussian of its own training data. SIDE Theorem 1's limit gives "
              "no gain; at finite |D_i| the conditional fit is closer to D_i by −(d/2)(1/|D_i| − "
              "1/|D|) nats in expectation (d = 8), vanishing as |D_i| grows.", "",
              "| \\|D_i\\| | Δ, Monte Carlo | ± s.e. | exact, same partitions | expectation |",
              "|---|---|---|---|---|"]
        for t in s["random_label_check"]:
            L.append(f"| {t['n_i']} | {t['gain']:.4f} | {t['gain_stderr']:.4f} | {t['exact']:.4f} "
                     f"| {t['expected']:.4f} |")
    return L + [""]


def label_effect(lo, hi):
    """Verdict on Δ = M(conditional) − M(unconditional) from its 95 % interval [lo, hi]."""
    if hi < 0:
        return "lowers M (more memorization)"
    return "raises M (less memorization)" if lo > 0 else "undecided"


def calibration_report(rows):
    """CALIBRATION.md: the share of each training set plain sampling reaches, per size and
    budget."""
    bands = list(rows[0]["share"]) if rows else []
    L = ["# Calibration of the training budgets (reproduce.py --calibrate)", "",
         "Share of each training set that plain unconditional sampling reaches (N_G generations, "
         "one seed), per training budget in epochs. The rule, fixed before the runs: the "
         "reproduction's budget is the smallest at which every size is partly memorized (20-80 % "
         "reached in some band), the weak arm's the largest at which every size is almost "
         "unreached (at most 12.5 %).", "",
         "| n | epochs | N_G | distinct (any band) | share any | "
         + " | ".join(f"share {b}" for b in bands) + " |",
         "|---|---|---|---|---|" + "---|" * len(bands)]
    for r in rows:
        L.append(f"| {r['n_train']} | {r['epochs']:g} | {r['n_gen']} | {r['distinct_any']} | "
                 f"{100 * r['share_any']:.0f}% | "
                 + " | ".join(f"{100 * r['share'][b]:.0f}%" for b in bands) + " |")
    return "\n".join(L) + "\n"


def write_extraction(out, cfg, old, chosen, results, samples, sweeps, budget, ds, reports, seconds,
                     device, target=None):
    """extract.py's samples.npz, metrics.json, REPORT.md and grids/ in `out`: the methods of an
    earlier run there (`old`, its metrics.json; extract.check_previous made sure its settings match)
    are kept beside the new ones; with --overwrite (old None) whatever was there (grids and sweeps
    of methods not rerun included) goes. seconds: per stage, with the total. target: hashes of the
    model and the training data (recorded, so that a rerun after retraining in place is refused
    instead of mixed in)."""
    ms = list(samples)
    kept = [m for m in (old or {}).get("methods", {}) if m not in ms]
    kept = kept if os.path.exists(os.path.join(out, "samples.npz")) else []  # their images are gone
    _write_samples(out, samples, kept, cfg.seed)
    public = {m: {k: v for k, v in r.items() if k not in ("nn_index", "nn_value", "carlini_ratio",
                                                          "yoon_ratio", "ums_index")}
              for m, r in results.items()}
    public = dict({m: old["methods"][m] for m in kept},
                  **json.loads(json.dumps(public, default=_plain)))
    atomic_write_json(os.path.join(out, "metrics.json"), dict(
        config=dict(dataclasses.asdict(cfg), methods=",".join(public)), chosen=chosen,
        methods=public, target=target,
        classifiers=dict((old or {}).get("classifiers", {}), **reports),
        curves=dict((old or {}).get("curves", {}), **(budget or {})),
        seconds=seconds, device=str(device)))
    grids = os.path.join(out, "grids")
    os.makedirs(grids, exist_ok=True)
    for f in os.listdir(grids):  # a grid never outlives its method's results
        if f.endswith(".png") and f[:-4] not in public:
            os.unlink(os.path.join(grids, f))
    if cfg.overwrite:
        for name in ("lambda", "K", "cond_scale"):
            for ext in ("json", "png"):
                path = os.path.join(out, f"sweep_{name}.{ext}")
                if name not in sweeps and os.path.exists(path):
                    os.unlink(path)
    for m in ms:
        grid_of_matches(os.path.join(grids, f"{m}.png"), samples[m][0], ds.images, results[m],
                        top=cfg.grid_top)
    text = [f"# Extraction report: {cfg.ckpt}", "",
            f"N_G = {cfg.n_gen} per method, {cfg.sampler} {cfg.sample_steps} steps, η = {cfg.eta}, "
            f"seed {cfg.seed}; training set: {len(ds.images)} images ({ds.source}); λ = "
            f"{chosen['lam']}, K = {chosen['K']}, τ = {cfg.tau}.", "",
            extraction_table(public), "", "Stage times of this run (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if k != "total") +
            f"; total {seconds['total']:.1f}."
            + (f" Methods {', '.join(kept)} come from an earlier run with these settings." if kept
               else ""), ""]
    atomic_write_text(os.path.join(out, "REPORT.md"), "\n".join(text))
    print("\n".join(text))


def _write_samples(out, samples, kept, seed):
    """OUT/samples.npz: every generation of `samples` ({method: (images, info)}) with its method,
    cluster, index and seed, after the generations of the earlier methods `kept` there."""
    ms = list(samples)
    cols = dict(images=[samples[m][0] for m in ms], method=[[m] * len(samples[m][0]) for m in ms],
                cluster=[samples[m][1].get("cluster", np.full(len(samples[m][0]), -1)) for m in ms],
                index=[np.arange(len(samples[m][0])) for m in ms])
    if kept:
        try:
            # no pickles: nothing in it runs
            with np.load(os.path.join(out, "samples.npz"), allow_pickle=False) as z:
                rows = np.isin(z["method"], kept)
                for k in cols:
                    cols[k].append(z[k][rows])
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise UserError(f"{os.path.join(out, 'samples.npz')} cannot be read "
                            f"({str(e).splitlines()[0][:120]}); pass --overwrite to recompute "
                            "every method") from None
    cols = {k: np.concatenate(v) for k, v in cols.items()}
    buf = io.BytesIO()
    np.savez(buf, **cols, seed=np.full(len(cols["images"]), seed))
    atomic_write_bytes(os.path.join(out, "samples.npz"), buf.getvalue())


def _plain(v):
    """numpy scalars and arrays as JSON values (what atomic_write_json would do through
    json.dumps)."""
    return v.tolist() if hasattr(v, "tolist") else str(v)


def compare_verdicts(summaries, labels):
    """One row per claim, one column per run (e.g. two base seeds): the corrected verdict, the
    estimate and the Holm-corrected interval. Runs whose verdicts contradict (one holds, the other
    does not hold) are counted in the closing line; holds against undecided is not a contradiction,
    it is the same evidence at another spread."""
    by_run = [{c["claim"]: c for c in s["verdict"]["claims"]} for s in summaries]
    names = list(dict.fromkeys(k for run in by_run for k in run))
    L = ["| claim | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    clash = []
    for name in names:
        cells, seen = [], set()
        for run in by_run:
            c = run.get(name)
            if c is None:
                cells.append("–")
                continue
            unit = "x" if c["scale"] == "ratio" else ""
            cor = c["corrected"]
            cells.append(f"**{c['status']}** {c['ratio']:.2f}{unit} {_iv(cor['lo'], cor['hi'])}")
            seen.add(c["status"])
        if {"holds", "does not hold"} <= seen:
            clash.append(name)
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L += ["", f"{len(names)} claims; contradicting verdicts between runs: {len(clash)}"
          + (" (" + "; ".join(clash) + ")" if clash else "") + "."]
    return "\n".join(L)


def calibration_summary(rows):
    """README's calibration table: share of each training set reached (any band) per budget and
    size, the count in brackets."""
    sizes = sorted({r["n_train"] for r in rows})
    by = {(r["n_train"], r["epochs"]): r for r in rows}
    L = ["| epochs | " + " | ".join(f"n = {n}" for n in sizes) + " |",
         "|---|" + "---|" * len(sizes)]
    for e in sorted({r["epochs"] for r in rows}):
        L.append(f"| {e:g} | " + " | ".join(
            f"{100 * by[n, e]['share_any']:.0f} % ({by[n, e]['distinct_any']})" if (n, e) in by
            else "–" for n in sizes) + " |")
    return "\n".join(L)


def table1_summary(summaries, labels):
    """README's Table 1 in miniature: per size and method, distinct training images (any band) and
    AMS any %, mean [95 % interval] over replicates, one column pair per run."""
    sizes = sorted({int(k.split("/")[0]) for s in summaries for k in s["stats"]["table"]})
    L = ["| n | method | " + " | ".join(f"{lab}: distinct | {lab}: AMS any %" for lab in labels)
         + " |", "|---|---|" + "---|---|" * len(labels)]
    arms = [(str(n), "table", n) for n in sizes]
    arms += [(f"{n}, weak", "weak", n) for n in sorted({int(k.split("/")[0]) for s in summaries
                                                        for k in s["stats"].get("weak", {})})]
    for name, arm, n in arms:
        for m in ("uncond", "cond_ddpm", "side", "side_random", "uncond_budget"):
            cells = [s["stats"].get(arm, {}).get(f"{n}/{m}") for s in summaries]
            if all(c is None for c in cells):
                continue
            L.append(f"| {name} | {METHOD_NAMES[m]} | " + " | ".join(
                "– | –" if c is None else f"{ci(c['distinct_any'])} | {ci(c['ams_any'])}"
                for c in cells) + " |")
    return "\n".join(L)


def main(argv=None):
    """The README's tables from committed runs: verdicts side by side (--compare), Table 1 in
    miniature (--table1) or a calibration (--calibration); printed on stdout."""
    p = argparse.ArgumentParser(description="The verdicts of several reproduce runs side by side "
                                "(README's verdict table): python report.py --compare "
                                "results/summary.json results-seed1/summary.json")
    p.add_argument("--compare", nargs="+", metavar="SUMMARY_JSON")
    p.add_argument("--calibration", metavar="CALIBRATION_JSON",
                   help="instead: the calibration table of a reproduce.py --calibrate run")
    p.add_argument("--table1", action="store_true",
                   help="with --compare: Table 1 in miniature of the runs instead of their "
                        "verdicts")
    a = p.parse_args(argv)
    if bool(a.compare) == bool(a.calibration):
        p.exit(2, "error: pass either --compare SUMMARY_JSON... or --calibration "
                  "CALIBRATION_JSON\n")
    if a.calibration:
        try:
            with open(a.calibration) as f:
                print(calibration_summary(json.load(f)["rows"]))
        except (OSError, ValueError, KeyError) as e:
            p.exit(2, f"error: --calibration: cannot read {a.calibration} ({e!r}); pass the "
                      "calibration.json of a finished reproduce.py --calibrate run\n")
        return
    runs = []
    for path in a.compare:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            p.exit(2, f"error: --compare: cannot read {path} ({e}); pass the summary.json of a "
                      "finished reproduce.py run\n")
        if "verdict" not in runs[-1]:
            p.exit(2, f"error: --compare: {path} has no verdict; pass the summary.json of a "
                      "reproduce.py run (not an extract.py run)\n")
    try:
        labels = [f"{r['data']} seed {r['base_seed']}" for r in runs]
        print(table1_summary(runs, labels) if a.table1 else compare_verdicts(runs, labels))
    except (KeyError, TypeError, IndexError) as e:
        raise UserError(f"--compare: a summary lacks the field {e}; pass summary.json files "
                        "written by this version's reproduce.py") from None


if __name__ == "__main__":
    run_main(main, interrupted="nothing was written")
