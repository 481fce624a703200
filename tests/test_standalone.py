"""The files meant to be copied into other codebases run from a folder that holds only them: side.py
(with ddpm.py, which it imports), metrics.py and ddpm.py are each copied into an empty folder and
used there by a fresh interpreter, which must not load any other file of ours. side.py runs SIDE
Alg. 1 end to end on a random tiny UNet (and its memo hook replays a run without recomputing a
step); metrics.py finds planted copies and runs its own CLI; ddpm.py samples; plots.py draws."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))

PRELUDE = f"""
import json, sys
OURS = {OURS!r}
def loaded():
    return sorted(m for m in OURS if m in sys.modules)
"""

SIDE = """
import dataclasses, torch, ddpm, side
torch.manual_seed(0)
unet = ddpm.UNet(image_size=8, channels=3, base=8, mults=(1, 2), num_res_blocks=1, attn_res=())
torch.nn.init.normal_(unet.out[-1].weight, std=0.1)  # a random ε_θ (its output layer starts at 0)
unet.eval().requires_grad_(False)
s = side.Settings(n_syn=12, K=2, tau=0.0, clf_steps=3, clf_width=8,
                  sampling=dict(sampler="ddim", sample_steps=2, eta=1.0))
store, made = {}, []
def memo(stage, settings, make):
    key = json.dumps([stage, settings], sort_keys=True)
    if key not in store:
        made.append(stage)
        store[key] = make()
    return store[key]
run = lambda **kw: side.extract(unet, ddpm.Diffusion(10), s, 5, seed=1, log=None, **kw)
x, info = run(memo=memo)
again, _ = run(memo=memo)
plain, _ = run()
try:
    side.extract(unet, ddpm.Diffusion(10), dataclasses.replace(s, K=20), 5, seed=1, log=None)
    error = None
except ValueError as e:
    error = str(e)
print(json.dumps(dict(shape=list(x.shape), finite=bool(torch.isfinite(x).all()), made=made,
                      again=bool(torch.equal(x, again)), plain=bool(torch.equal(x, plain)),
                      cluster=info["cluster"].tolist(), kept=info["kept"], error=error,
                      loaded=loaded())))
"""

METRICS = """
import numpy as np, metrics
rng = np.random.default_rng(0)
train = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
gen = train[[0, 3]].copy()  # two exact copies
ev = metrics.evaluate(gen, train)
np.savez("gen.npz", images=gen)
np.savez("train.npz", images=train)
code = metrics.main(["gen.npz", "train.npz", "--json", "out.json"])
print(json.dumps(dict(nn_index=ev["nn_index"].tolist(), nn_value=ev["nn_value"].tolist(), code=code,
                      ums=json.load(open("out.json"))["ums"], loaded=loaded())))
"""

DDPM = """
import torch, ddpm
torch.manual_seed(0)
unet = ddpm.UNet(image_size=8, channels=3, base=8, mults=(1, 2), num_res_blocks=1, attn_res=())
unet.eval()
x = ddpm.Diffusion(10).sample(unet, 2, ddpm.sample_generators(0, range(2)), steps=3)
print(json.dumps(dict(shape=list(x.shape), loaded=loaded())))
"""

PLOTS = """
import numpy as np, plots
a = plots.line_plot([1, 3, 10], {"low": [1, 2, None], "high": [0, 1, 1]}, xlabel="lambda")
b = plots.band_plot({"SIDE": [(0, 1.0, 0.5, 1.5), (512, 2.0, 1.0, 3.0)]})
print(json.dumps(dict(a=list(a.size), b=list(b.size), empty=plots.band_plot({}) is None,
                      inked=int((np.asarray(b) != 255).any(-1).sum()), loaded=loaded())))
"""


def run_alone(tmp_path, files, code):
    """Run `code` with only `files` copied into an empty folder (the working directory and
    sys.path[0])."""
    for f in files:
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", PRELUDE + code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_side_runs_algorithm_1_with_ddpm_alone(tmp_path):
    out = run_alone(tmp_path, ["side.py", "ddpm.py"], SIDE)
    assert out["loaded"] == ["ddpm", "side"]  # nothing else of ours
    assert out["shape"] == [5, 3, 8, 8] and out["finite"]
    assert out["made"] == ["features",
                           "clf-side"]  # each memoised step once: the replay recomputed none
    # the memoised replay and an uncached run are bit-identical
    assert out["again"] and out["plain"]
    assert len(out["cluster"]) == 5 and all(0 <= c < out["kept"] for c in out["cluster"])
    assert out["error"] == "surrogate labels: K=20 clusters for 12 images; need 2 <= K <= N"


def test_metrics_runs_alone(tmp_path):
    out = run_alone(tmp_path, ["metrics.py"], METRICS)
    assert out["loaded"] == ["metrics"]
    assert out["nn_index"] == [0, 3] and out["nn_value"] == [0.0, 0.0]
    # 2 copies reach 2 images: 2/2
    assert out["code"] == 0 and out["ums"]["high"] == pytest.approx(100.0)


def test_ddpm_runs_alone(tmp_path):
    out = run_alone(tmp_path, ["ddpm.py"], DDPM)
    assert out["loaded"] == ["ddpm"] and out["shape"] == [2, 3, 8, 8]


def test_plots_runs_alone(tmp_path):
    out = run_alone(tmp_path, ["plots.py"], PLOTS)
    assert out["loaded"] == ["plots"] and out["a"] == [480, 320] and out["b"] == [640, 400]
    assert out["empty"] and out["inked"] > 1000  # axes, ticks, a line and its shaded band


def test_no_other_file_is_needed_by_its_imports():
    """The import lines themselves: side.py names only ddpm.py of ours; metrics.py and ddpm.py
    none."""
    for name, allowed in (("side", {"ddpm"}), ("metrics", set()), ("ddpm", set()),
                          ("plots", set())):
        with open(os.path.join(ROOT, f"{name}.py")) as fh:
            mods = {ln.split()[1].split(".")[0] for ln in fh if ln.startswith(("import ", "from "))}
        assert mods & set(OURS) == allowed, name
