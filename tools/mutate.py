"""Mutation testing of the equation-bearing code: do the tests notice a wrong coefficient, sign or
operator?

    python tools/mutate.py                       # every target below, one mutant at a time
    python tools/mutate.py --files ddpm --list   # just print the mutants of ddpm.py
    python tools/mutate.py --only Diffusion.sample --timeout 120

For each target function (or the lines of it matching a pattern) every node of these kinds gives one
mutant: a binary operator swapped (+ <-> -, * <-> /, ** -> *), a term dropped (a - b -> a, a + b ->
a), a unary minus removed, a numeric constant changed (c -> 2c, 0 -> 1, integer n -> n + 1), a
comparison flipped (< <-> <=, > <-> >=), a sqrt/exp/log call replaced by its argument, and on
pattern-selected lines an assignment deleted (e.g. training a classifier on clean, not noised,
images). The mutated file is written into a scratch copy of the repository and the file's fast tests
run there with `pytest -x -q` and a per-mutant timeout: a failing test (or a timeout) kills the
mutant. Prints one line per mutant (KILLED/SURVIVED, file:line, original -> mutant) and the score.
Needs only the standard library and pytest; single-threaded (OMP_NUM_THREADS=1).

Measured for the ddpm, side and metrics targets only (328 mutants, ~30 min on one shared core):
234/328 killed (71.3 %) with the tests before tests/test_equations.py; 324/328 (98.8 %) after
(`python tools/mutate.py --rerun BEFORE.log` reruns only the survivors). metrics.summarize (AMS,
UMS, p95, the replicated fraction, the extracted sets; added since) brings 7 more, all killed once
a test put values on its thresholds (`--files metrics`: 73/75): 331/335 for those three files.
The evidence, ensemble, claims and divergence targets were added later and are not in these totals
(`--files evidence` etc. measures each; measured 2026-12: ensemble 92/93, claims 16/16, evidence
357/394, README). The 4 survivors above are equivalent mutants, which no test can kill:
  ddpm.py  `i > 0` -> `i >= 0` and `sigma > 0` -> `sigma >= 0` in the noise step of
           Diffusion.sample: at i = 0 (ᾱ_prev = 1) and at η = 0, σ is exactly 0, so mean + σ·z is
           the mean either way;
  metrics.py  the two constants of log_q_eps's chunk size: the same sum in other blocks.
"""
import argparse
import ast
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the library, one folder up
# file -> (tests that cover it, [(qualified function name, regex a mutated line must match, or None
# = every line)])
TARGETS = {
    "ddpm": (["tests/test_ddpm.py", "tests/test_equations.py"], [
        ("beta_schedule", None), ("Diffusion.__init__", None), ("Diffusion.q_sample", None),
        ("Diffusion.q_posterior", None), ("Diffusion.eps_x0", None), ("Diffusion.loss", None),
        ("Diffusion.timesteps", None), ("Diffusion.sample", r"sqrt|sigma|mean|eps|x0|beta|ab_")]),
    "side": (["tests/test_side.py", "tests/test_equations.py"], [
        ("_sqdist", None), ("cluster_cohesion", None), ("guidance", r"scale|grad|logp"),
        ("_noised", None), ("train_classifier", r"_noised|cross_entropy|randint\(T")]),
    "metrics": (["tests/test_metrics.py", "tests/test_equations.py"], [
        ("in_band", None), ("ams_ums", None), ("p95", None), ("carlini_ratio", None),
        ("yoon_ratio", None), ("extracted", None), ("summarize", None), ("log_q_eps", None)]),
    "evidence": (["tests/test_evidence.py"], [
        ("_betacf", None), ("betainc", None), ("t_cdf", None), ("t_pdf", None),
        ("t_quantile", None),
        ("mean_ci", None), ("count_ci", None), ("Estimate.value", None),
        ("Estimate.interval", None),
        ("Estimate.p_value", None), ("_stratified", None), ("paired_log_ratio", None),
        ("unpaired_log_ratio", None),
        ("mean_estimate", None), ("status", None), ("holm", None), ("replicates_needed", None),
        ("curve_summary", None), ("overtake", None)]),
    # the grouped network and its per-model clip and loss
    "ensemble": (["tests/test_ensemble.py"], [
        ("_conv", None), ("_norm", None), ("_linear", None), ("_blocks", None), ("_resblock", None),
        ("_attention", None), ("_cat", None), ("forward", None), ("_losses", None),
        ("_clip", None)]),
    "claims": (["tests/test_claims.py"], [("_ratio", None), ("_size_value", None),
                                          ("descriptive", r"ceiling|mean|\+ 1")]),
    # SIDE Definition 1 for a DDPM (ddpm.py) and its estimators (metrics.py)
    "divergence": (["tests/test_divergence.py", "tests/test_ddpm.py"], [
        ("Diffusion.level", None), ("Diffusion.bound_draw", None), ("Diffusion.subchain_nll", None),
        ("Diffusion.prior_kl", None), ("normal_kl", None)]),
}
# target groups whose functions live in a file of another name
FILES = {"divergence": "ddpm", "claims": "evidence"}
SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult}
FLIP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
CALLS = {"sqrt", "exp", "log"}  # f(a) -> a


def functions(tree):
    """{qualified name: FunctionDef} of module-level functions and class methods."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out.update({f"{node.name}.{f.name}": f for f in node.body
                        if isinstance(f, ast.FunctionDef)})
    return out


def variants(node):
    """(description, replacement node) for each mutation of one AST node."""
    if isinstance(node, ast.BinOp) and type(node.op) in SWAP:
        yield "op", ast.BinOp(node.left, SWAP[type(node.op)](), node.right)
        if isinstance(node.op, (ast.Add, ast.Sub)):
            yield "drop", node.left
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield "sign", node.operand
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        v = node.value
        yield "const", ast.Constant(v + 1 if isinstance(v, int) else (1.0 if v == 0 else 2 * v))
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in FLIP:
        yield "cmp", ast.Compare(node.left, [FLIP[type(node.ops[0])]()], node.comparators)
    elif isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords:
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id",
                                                                                   "")
        if name in CALLS:
            yield "call", node.args[0]


def mutants(path, targets, only=None):
    """Yield (line, original text, mutated text, mutated module source) for the targets of one
    file."""
    src = open(path).read()
    lines = src.splitlines()
    tree = ast.parse(src)
    defs = functions(tree)
    for name, pattern in targets:
        if only and name != only:
            continue
        fn = defs[name]
        first = fn.body[0]
        body_start = first.lineno if not isinstance(first, ast.Expr) else first.end_lineno + 1
        for node in ast.walk(fn):
            if not hasattr(node, "lineno") or node.lineno < body_start:
                continue  # the signature's defaults and the docstring are not equations
            if pattern and not re.search(pattern, lines[node.lineno - 1]):
                continue
            # a line deleted
            extra = [("stmt", ast.Pass())] if pattern and isinstance(node, ast.Assign) else []
            for kind, new in list(variants(node)) + extra:
                mutated = copy.deepcopy(tree)
                target = next(n for n in ast.walk(mutated) if _same(n, node))
                _replace(mutated, target, new)
                yield (node.lineno, f"{kind}: {ast.unparse(node)} -> {ast.unparse(new)}",
                       ast.unparse(mutated))


def _same(a, b):
    return (type(a) is type(b) and getattr(a, "lineno", None) == b.lineno
            and a.col_offset == b.col_offset
            and getattr(a, "end_col_offset", None) == b.end_col_offset
            and ast.dump(a) == ast.dump(b))


def _replace(tree, target, new):
    """Put `new` where `target` sits in `tree` (one node)."""
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is target:
                setattr(parent, field, new)
                return
            if isinstance(value, list) and any(v is target for v in value):
                value[[i for i, v in enumerate(value) if v is target][0]] = new
                return
    raise AssertionError("node not found")


def run_tests(scratch, tests, timeout):
    """True if the tests fail (the mutant is killed) or time out."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                            *tests],
                           cwd=scratch, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True
    return r.returncode != 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", default=",".join(TARGETS),
                   help="comma-separated subset of " + ",".join(TARGETS))
    p.add_argument("--only", default="", help="one qualified function name (e.g. Diffusion.sample)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run (a "
                                                                "timeout kills it)")
    p.add_argument("--list", action="store_true", help="print the mutants without running the "
                                                       "tests")
    p.add_argument("--rerun", default="", help="a previous run's output: its KILLED mutants count "
                                               "as killed, every other mutant runs")
    args = p.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="mutate-")
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "results*", "__pycache__",
                                  ".pytest_cache")
    shutil.copytree(ROOT, scratch, dirs_exist_ok=True, ignore=skip)
    killed = total = 0
    survivors = []
    try:
        for group in args.files.split(","):
            tests, targets = TARGETS[group]
            name = FILES.get(group, group)
            path = os.path.join(ROOT, f"{name}.py")
            original = open(path).read()
            before = {}
            # mutants the earlier run killed stay killed (tests were only added); the rest run
            if args.rerun:
                before = {ln.split(None, 1)[1].rsplit("  (", 1)[0]: ln.startswith("KILLED")
                          for ln in open(args.rerun)
                          if ln.startswith(("KILLED", "SURVIVED"))}
            for line, what, src in mutants(path, targets, args.only or None):
                total += 1
                if before.get(f"{name}.py:{line} {what}"):
                    killed += 1
                    continue
                if args.list:
                    print(f"{name}.py:{line} {what}")
                    continue
                t0 = time.time()
                with open(os.path.join(scratch, f"{name}.py"), "w") as fh:
                    fh.write(src)
                dead = run_tests(scratch, tests, args.timeout)
                killed += dead
                status = "KILLED  " if dead else "SURVIVED"
                if not dead:
                    survivors.append(f"{name}.py:{line} {what}")
                print(f"{status} {name}.py:{line} {what}  ({time.time() - t0:.0f}s)", flush=True)
            with open(os.path.join(scratch, f"{name}.py"), "w") as fh:
                fh.write(original)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not args.list and total:
        print(f"mutation score: {killed}/{total} killed ({100 * killed / total:.1f}%)")
        for s in survivors:
            print(f"  survived: {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
