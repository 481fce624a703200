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


SWEEP_EXTEND = 3  # at most this many extra values beyond each end of a grid whose best value sits at that end
SWEEP_FACTOR = 3.0  # each extra value is the end value x3 (or /3): the grids are roughly geometric (1, 3, 10, 30)


def sweep(run, name, values, cfg, method, point):
    """The metrics of `method` at each swept value on the sweep seed (point(v) -> run.method kwargs),
    then, while the best value (best_of) sits at an end of the grid, one more value beyond that end
    (x3 above, /3 below; 0 is a lower end that stays, e.g. unguided Cond), at most SWEEP_EXTEND per end;
    writes sweep_<name>.{json,png}. Returns the rows in value order."""
    n = cfg.sweep_n_gen or cfg.n_gen
    rows, todo, added = [], sorted(set(values)), {"up": 0, "down": 0}
    while todo:
        for v in todo:
            x, info = run.method(method, n, cfg.sweep_seed, **point(v))
            ev = run.evaluate(x)  # every rank searches a shard; rank 0 gets the result
            if run.ranks.rank == 0:
                rows.append(dict(value=v, ams=ev["ams"], ums=ev["ums"], distinct=ev["distinct"], p95=ev["p95"],
                                 distinct_any=ev["distinct_any"], kept=info.get("kept"), added=v not in values))
                run.ranks.log(f"[sweep {name}] {v}: AMS {ev['ams']} UMS {ev['ums']}")
        todo = run.ranks.agree(beyond(rows, added) if run.ranks.rank == 0 else None)
    if run.ranks.rank == 0:
        rows.sort(key=lambda r: r["value"])
        atomic_write_json(os.path.join(run.out, f"sweep_{name}.json"), rows)
        line_plot(os.path.join(run.out, f"sweep_{name}.png"), [r["value"] for r in rows],
                  {b: [r["distinct"][b] for r in rows] for b in rows[0]["distinct"]}, xlabel=name,
                  ylabel="distinct training images extracted")
    return rows


def beyond(rows, added):
    """[the next value past the end of the grid where the best value sits], or [] (counts in `added`)."""
    vals, best = sorted(r["value"] for r in rows), best_of(rows)
    if best == vals[-1] and added["up"] < SWEEP_EXTEND:
        added["up"] += 1
        return [vals[-1] * SWEEP_FACTOR if vals[-1] > 0 else 1.0]
    if best == vals[0] and vals[0] > 0 and added["down"] < SWEEP_EXTEND and len(vals) > 1:
        added["down"] += 1
        return [vals[0] / SWEEP_FACTOR]
    return []


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
    """The sweep value reaching the most distinct training images in any band (UMS), then the highest hit
    rate in any band (AMS). Any band, not the high band first: a sweep point's high-band count is a handful
    of images (6 or fewer of 256 generations in the first reproduction), too few to rank scales by."""
    return max(rows, key=lambda r: (r["distinct_any"], sum(r["ams"].values())))["value"]


def load_sweep(out, name):
    path = os.path.join(out, f"sweep_{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)
