"""ensemble.py against its independent reference, train.py training each model alone: the grouped
forward pass equals the models' own forward passes, and several steps of ensemble training give the
weights, EMA, optimiser state and data stream of lone runs from the same seeds (within float
rounding: grouped and plain convolutions add in another order)."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import ddpm
import ensemble
import train
from common import UserError, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unet(seed, num_classes=0):
    torch.manual_seed(seed)
    return ddpm.UNet(image_size=8, channels=3, base=16, mults=(1, 2), attn_res=(4,),
                     num_classes=num_classes)


@pytest.mark.parametrize("num_classes", [0, 5])
def test_grouped_forward_equals_each_models_own(num_classes):
    models = [_unet(s, num_classes) for s in range(3)]
    # non-zero weights everywhere (the zero-initialised layers would hide mistakes)
    for m in models:
        for p in m.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, 8, 8, generator=g)
    t = torch.randint(1000, (3, 4), generator=g)
    y = torch.randint(num_classes + 1, (3, 4), generator=g) if num_classes else None
    P = ensemble.stack([m.state_dict() for m in models],
                       [n for n, _ in models[0].named_parameters()])
    with torch.no_grad():
        out = ensemble.forward(P, models[0], x, t, y)
        for k, m in enumerate(models):
            ref = m(x[k], t[k], None if y is None else y[k])
            assert ref.abs().max() > 0.1
            torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-5)


def _cfgs(tmp_path, n=3, **kw):
    base = dict(data="faces", image_size=8, base=16, mults=(1, 2), attn_res=(4,), T=50, steps=6,
                batch=8, schedule="cosine", prediction="eps", lr=2e-3, warmup=2, ckpt_every=3,
                sample_n=0, log_every=1e9)
    base.update(kw)
    return [train.TrainConfig(out=str(tmp_path / f"m{i}"), seed=10 + i, data_seed=20 + i,
                              n_train=8 + 4 * i, **base)
            for i in range(n)]


@pytest.fixture
def float64():
    """Training in float64: then the grouped and the plain network agree to ~1e-13, so any
    difference is a mistake (in float32, Adam's first steps turn rounding differences of near-zero
    gradients into differences of up to ~lr)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _assert_same_run(a, b, tol=1e-9):
    assert (a["step"] == b["step"] and torch.equal(a["rng"], b["rng"])
            and torch.equal(a["torch_rng"], b["torch_rng"]))
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=tol, atol=tol,
                                       msg=f"{key}.{name}")
    for i, s in a["opt"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s[k], b["opt"]["state"][i][k], rtol=tol, atol=tol)
        assert float(s["step"]) == float(b["opt"]["state"][i]["step"])
    same = lambda c: {k: v for k, v in c.items()  # noqa: E731
                      if k not in ("out", "resume", "steps", "keep")}
    assert same(a["config"]) == same(b["config"]) and a["model_args"] == b["model_args"]


@pytest.mark.parametrize("prediction,labels", [("eps", "none"), ("v", "true")])
def test_ensemble_training_equals_lone_runs(tmp_path, prediction, labels, float64):
    cfgs = _cfgs(tmp_path, prediction=prediction, labels=labels)
    ensemble.train_ensemble(cfgs, log=False)
    for c in cfgs:
        alone = train.train(dataclasses.replace(c, out=c.out + "-alone"))
        _assert_same_run(load_checkpoint(os.path.join(c.out, "ckpt.pt")), alone)


def test_interrupted_ensemble_resumes_and_a_lagging_member_catches_up(tmp_path, float64):
    cfgs = _cfgs(tmp_path)
    ensemble.train_ensemble([dataclasses.replace(c, steps=3) for c in cfgs], log=False)
    train.train(dataclasses.replace(cfgs[0], steps=6, resume=True))  # one member ran ahead alone
    ensemble.train_ensemble([dataclasses.replace(c, resume=True) for c in cfgs], log=False)
    for c in cfgs:
        alone = train.train(dataclasses.replace(c, out=c.out + "-alone"))
        _assert_same_run(load_checkpoint(os.path.join(c.out, "ckpt.pt")), alone)


def test_a_lone_run_resumes_from_an_ensemble_checkpoint(tmp_path, float64):
    cfgs = _cfgs(tmp_path, n=2)
    ensemble.train_ensemble([dataclasses.replace(c, steps=3) for c in cfgs], log=False)
    resumed = train.train(dataclasses.replace(cfgs[1], resume=True))
    _assert_same_run(resumed, train.train(dataclasses.replace(cfgs[1], out=cfgs[1].out + "-alone")))


def test_members_that_cannot_share_a_network_are_refused(tmp_path):
    a, b = _cfgs(tmp_path, n=2)
    with pytest.raises(UserError, match="differ in batch"):
        ensemble.check_members([a, dataclasses.replace(b, batch=4)])
    with pytest.raises(UserError, match="dropout"):
        ensemble.check_members([dataclasses.replace(a, dropout=0.1)])
    with pytest.raises(UserError, match="same --out"):
        ensemble.check_members([a, dataclasses.replace(b, out=a.out)])


def test_cli_one_error_line(tmp_path):
    bad = tmp_path / "jobs.json"
    bad.write_text(json.dumps({"not": "a list"}))
    r = subprocess.run([sys.executable, "ensemble.py", "--jobs", str(bad)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:")


def test_kept_checkpoints_are_the_runs_at_those_steps(tmp_path, float64):
    cfgs = [dataclasses.replace(c, keep=(2, 4)) for c in _cfgs(tmp_path, n=2)]
    ensemble.train_ensemble(cfgs, log=False)
    alone = train.train(dataclasses.replace(cfgs[1], out=cfgs[1].out + "-alone"))
    for step in (2, 4):
        short = train.train(dataclasses.replace(cfgs[1], out=cfgs[1].out + f"-{step}", steps=step))
        _assert_same_run(load_checkpoint(os.path.join(cfgs[1].out, f"ckpt-{step}.pt")), short)
        _assert_same_run(load_checkpoint(os.path.join(cfgs[1].out + "-alone", f"ckpt-{step}.pt")),
                         short)
    _assert_same_run(load_checkpoint(os.path.join(cfgs[1].out, "ckpt.pt")), alone)
