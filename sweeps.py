"""extract.py's tuning and budget helpers: sweeps of SIDE's λ and K and of Carlini Cond's guidance scale
on a separate generation seed (the paper sweeps λ and finds it rising then falling), and the
extraction-versus-budget curves (distinct training images found against samples drawn, SIDE's
synthetic set counted as spent budget). Each takes an extract.Audit, whose method() and evaluate() do
the work; they write sweep_<name>.{json,png}. Depends on numpy, common.py and report.py.
"""
import json
import os

import numpy as np

from common import atomic_write_json
from report import line_plot


def sweep(run, name, values, cfg, method, point):
    """The metrics of `method` at each swept value on the sweep seed (point(v) -> run.method kwargs);
    writes sweep_<name>.{json,png}."""
    n = cfg.sweep_n_gen or cfg.n_gen
    rows = []
    for v in values:
        x, info = run.method(method, n, cfg.sweep_seed, **point(v))
        ev = run.evaluate(x)  # every rank searches a shard; rank 0 gets the result
        if run.ranks.rank == 0:
            rows.append(dict(value=v, ams=ev["ams"], ums=ev["ums"], distinct=ev["distinct"], p95=ev["p95"],
                             distinct_any=ev["distinct_any"], kept=info.get("kept")))
            run.ranks.log(f"[sweep {name}] {v}: AMS {ev['ams']} UMS {ev['ums']}")
    if run.ranks.rank == 0:
        atomic_write_json(os.path.join(run.out, f"sweep_{name}.json"), rows)
        line_plot(os.path.join(run.out, f"sweep_{name}.png"), [r["value"] for r in rows],
                  {b: [r["distinct"][b] for r in rows] for b in rows[0]["distinct"]}, xlabel=name,
                  ylabel="distinct training images extracted")
    return rows


def curve(run, x, budgets, offset=0):
    """Distinct training images reached (per band and in any band) by the first b - offset images of x,
    for each total budget b in `budgets` (b > offset): the extraction-versus-budget curve of one method."""
    pts = []
    for b in budgets:
        if b - offset < 1 or b - offset > len(x):
            continue
        ev = run.evaluate(x[:b - offset])
        if ev is not None:
            pts.append(dict(budget=int(b), distinct=ev["distinct"], distinct_any=ev["distinct_any"]))
    return pts


def curves(run, cfg, samples):
    """Curves of every method over the budget N_syn + N_G (the attacker's total number of samples):
    UnCond from the compute-matched draw (synthetic set then plain samples), Cond and the SIDE
    variants after their own N_G; SIDE starts at N_syn (its synthetic set is spent budget) and
    `side_union` counts the synthetic set and the guided generations together (an attacker keeps both)."""
    total = cfg.n_syn + cfg.n_gen
    grid = sorted({int(round(total * j / cfg.curve_points)) for j in range(1, cfg.curve_points + 1)}
                  | {cfg.n_syn, cfg.n_gen})
    out = {}
    for m, (x, _) in samples.items():
        if m in ("side", "side_random"):
            out[m] = curve(run, x, grid, offset=cfg.n_syn)
        elif m != "uncond":
            out[m] = curve(run, x, grid)
    if "side" in samples:
        out["side_union"] = curve(run, np.concatenate([run.synthetic(), samples["side"][0]]), grid)
    return out


def best_of(rows):
    """The sweep value extracting most distinct training images (high band, then mid, then AMS)."""
    return max(rows, key=lambda r: (r["distinct"].get("high", 0), r["distinct"].get("mid", 0), r["ams"].get("high", 0)))["value"]


def load_sweep(out, name):
    path = os.path.join(out, f"sweep_{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)
