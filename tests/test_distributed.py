"""Scaling out: torchrun training and sharded extraction against one process, kill-and-resume,
sharded nearest-neighbour metrics, the bf16 fast path on CPU, and NaN/corruption as one error line.

The references are independent runs: a 1-process run for the 2-process one, an uninterrupted run for
a killed-and-resumed one, the whole generated set for its merged shards. Everything runs on CPU with
gloo and a tiny model (8 px, base 16, T=50); each torchrun costs a few seconds of process start-up.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import extract
import metrics
import side
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_train=8, image_size=8, base=16, mults=(1, 2), attn_res=(4,), T=50, batch=8,
            sample_n=0, log_every=1e9, device="cpu")
EXTRACT = ["--n-syn", "16", "--K", "2", "--tau", "0", "--clf-steps", "5", "--clf-width", "8",
           "--sample-steps", "5", "--grid-top", "2", "--device", "cpu"]
# one thread per process: 2 ranks share this 2-core machine fairly
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def flags(**kw):
    """TrainConfig fields -> train.py flags."""
    out = []
    for k, v in kw.items():
        out += ["--" + k.replace("_", "-"),
                ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return out


def torchrun(script, args, nproc=2):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", script, *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(path):
    ck = common.load_checkpoint(path)
    return ck["step"], ck["model"], ck["ema"]


def samples(out):
    with np.load(os.path.join(out, "samples.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    train.train(train.TrainConfig(out=str(out), steps=20, **TINY))
    return str(out / "ckpt.pt")


def kill_when(proc, ready, timeout=300):
    """SIGKILL `proc` as soon as ready() holds; fails if it finished first."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, ("the run finished before it could be killed: "
                                     + proc.stderr.read()[-2000:])
        assert time.time() - t0 < timeout, "timed out waiting to kill"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


# -------------------------------------------------------------------------- training under torchrun

def test_two_process_training_and_resume_equal_one_process(tmp_path):
    kw = dict(TINY, steps=4, ckpt_every=2)
    one = train.train(train.TrainConfig(out=str(tmp_path / "one"), **kw))
    # stopped after 2 steps, resumed by 2 ranks
    torchrun("train.py", ["--out", str(tmp_path / "two")] + flags(**dict(kw, steps=2)))
    torchrun("train.py", ["--out", str(tmp_path / "two"), "--resume"] + flags(**kw))
    step, model, ema = weights(tmp_path / "two" / "ckpt.pt")
    assert step == 4
    # the same global batch; only the gradient all-reduce's summation order differs
    for k in one["model"]:
        torch.testing.assert_close(model[k], one["model"][k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(ema[k], one["ema"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    kw = dict(TINY, steps=40, ckpt_every=3)
    full = train.train(train.TrainConfig(out=str(tmp_path / "full"), **kw))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", "--out", str(out)] + flags(**kw), cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when(proc, lambda: os.path.exists(out / "ckpt.pt"))
    killed_at = weights(out / "ckpt.pt")[0]
    assert 3 <= killed_at < 40
    resumed = train.train(train.TrainConfig(out=str(out), resume=True, **kw))
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k
        assert torch.equal(full["ema"][k], resumed["ema"][k]), k


# ------------------------------------------------------------------------ extraction under torchrun

def test_sharded_extraction_equals_one_process_bit_for_bit(ckpt, tmp_path):
    args = ["--ckpt", ckpt, "--methods", "uncond,side", "--n-gen", "6", "--batch", "2",
            "--sweep-lambda", "0,3", "--sweep-n-gen", "2"] + EXTRACT
    extract.main(args + ["--out", str(tmp_path / "one")])
    torchrun("extract.py", args + ["--out", str(tmp_path / "two")])
    one, two = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert one.keys() == two.keys() and len(one["images"]) == 12
    for k in one:
        assert np.array_equal(one[k], two[k]), k
    report = lambda out: json.load(open(tmp_path / out / "metrics.json"))  # noqa: E731
    # metrics: each rank searched half the generations, rank 0 merged
    one, two = report("one"), report("two")
    assert one["chosen"] == two["chosen"] and one["methods"] == two["methods"]


def test_killed_extraction_resumes_from_its_cached_batches(ckpt, tmp_path):
    args = ["--ckpt", ckpt, "--methods", "uncond", "--n-gen", "32", "--batch", "2"] + EXTRACT
    extract.main(args + ["--out", str(tmp_path / "full")])
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "extract.py", *args, "--out", str(out)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = lambda: glob.glob(str(out / "cache" / "gen-uncond-*" / "*.npy"))  # noqa: E731
    kill_when(proc, lambda: len(done()) >= 1)
    assert 1 <= len(done()) < 16 and not os.path.exists(out / "samples.npz")
    extract.main(args + ["--out", str(out)])
    full, resumed = samples(tmp_path / "full"), samples(out)
    for k in full:
        assert np.array_equal(full[k], resumed[k]), k


@pytest.mark.parametrize("kw", [dict(), dict(carlini_center="train"), dict(similarity="features")],
                         ids=["l2", "l2-carlini-train", "cosine"])
def test_sharded_metrics_merge_to_the_unsharded_result(kw):
    rng = np.random.default_rng(0)
    if kw.get("similarity") == "features":
        train_x = rng.normal(size=(40, 16))
        near = train_x[:10] + rng.normal(scale=np.linspace(0.05, 1.5, 10)[:, None], size=(10, 16))
        gen = np.concatenate([near, rng.normal(size=(13, 16))])
    else:
        train_x = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
        near = (train_x[:10].astype(int)
                + rng.integers(-1, 2, (10, 8, 8, 3)) * np.arange(10)[:, None, None, None])
        gen = (np.concatenate([near, rng.integers(0, 256, (13, 8, 8, 3))])
               .clip(0, 255).astype(np.uint8))
    # copies at growing distances + new images
    whole = metrics.evaluate(gen, train_x, block_q=4, block_k=16, **kw)
    merged = metrics.merge([metrics.evaluate(gen, train_x, block_q=4, block_k=16, shard=(r, 3),
                                             **kw)
                            for r in range(3)])
    assert sum(whole["ams"].values()) > 0 and whole["n_generated"] == 23
    assert whole.keys() == merged.keys()
    for k, v in whole.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, merged[k]), k
        elif k == "ums_index":
            assert (v.keys() == merged[k].keys()
                    and all(np.array_equal(v[b], merged[k][b]) for b in v)), k
        else:
            assert v == merged[k], k


# ----------------------------------------------------------------------------- fast path on CPU

def test_bf16_autocast_trains_and_samples_close_to_fp32(tmp_path):
    kw = dict(TINY, steps=3)
    f32 = train.train(train.TrainConfig(out=str(tmp_path / "f32"), **kw))
    b16 = train.train(train.TrainConfig(out=str(tmp_path / "b16"), amp="bf16", **kw))
    for k, v in b16["model"].items():
        # fp32 master weights
        assert v.dtype == f32["model"][k].dtype and torch.isfinite(v).all(), k
        # Adam's first steps: about lr * warm-up fraction
        assert (v - f32["model"][k]).abs().max() < 1e-3, k
    model, diffusion, _, _ = train.load_trained(os.path.join(tmp_path / "f32", "ckpt.pt"))
    gens = lambda: extract.ddpm.sample_generators(0, range(4))  # noqa: E731
    ref = diffusion.sample(model, 4, gens(), steps=10, eta=1.0)
    with common.autocast("bf16", torch.device("cpu")):
        low = diffusion.sample(model, 4, gens(), steps=10, eta=1.0)
    assert low.dtype == torch.float32 and (low - ref).abs().max() < 0.05


# ------------------------------------------------------------------------- errors: one line, exit 2

def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        common.run_main(extract.main, argv)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return e.value.code, errors, err


@pytest.mark.parametrize("when,needle", [
    ("training", r"stage clf-side-\w+: classifier training: loss is nan at step 0"),
    ("guidance", r"stage gen-side-\w+, batch 0: guidance: non-finite classifier "
                 r"gradient at timestep 49")], ids=["classifier", "guidance"])
def test_nan_in_classifier_or_guidance_is_one_error_line(ckpt, tmp_path, capsys, monkeypatch, when,
                                                         needle):
    real = side.TimeResNet.forward

    # NaN logits while training (classifier) or while guiding (eval mode)
    def poisoned(self, x, t=None):
        out = real(self, x, t)
        return out * float("nan") if self.training == (when == "training") else out

    monkeypatch.setattr(side.TimeResNet, "forward", poisoned)
    code, errors, err = run_cli(["--ckpt", ckpt, "--methods", "side", "--n-gen", "2",
                                 "--batch", "2", "--out", str(tmp_path)] + EXTRACT, capsys)
    assert code == 2 and len(errors) == 1, err
    assert __import__("re").search(needle, errors[0]), errors[0]


def test_corrupted_checkpoint_is_refused_by_extract(ckpt, tmp_path, capsys):
    bad = tmp_path / "ckpt.pt"
    raw = open(ckpt, "rb").read()
    bad.write_bytes(raw[:-100])  # truncated
    code, errors, err = run_cli(["--ckpt", str(bad), "--methods", "uncond", "--n-gen", "2"]
                                + EXTRACT, capsys)
    assert code == 2 and len(errors) == 1 and "truncated or corrupted" in errors[0], err
