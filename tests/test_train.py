"""train.py: learning, checkpoints, exact resume, and one-line errors with exit code 2."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import ddpm
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_train=8, image_size=8, base=16, mults=(1, 2), attn_res=(4,), T=100, batch=8,
            sample_n=0, log_every=1e9)


def cfg(tmp_path, name="run", **kw):
    return train.TrainConfig(out=str(tmp_path / name), **dict(TINY, **kw))


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def fixed_loss(model, diffusion, x0):
    g = torch.Generator().manual_seed(99)
    t = torch.randint(diffusion.T, (256,), generator=g)
    noise = torch.randn((256,) + x0.shape[1:], generator=g)
    with torch.no_grad():
        return diffusion.loss(model, x0[torch.arange(256) % len(x0)], t, noise).mean().item()


def test_short_training_lowers_the_loss(tmp_path):
    c = cfg(tmp_path, steps=150, lr=3e-3, warmup=10)
    state = train.train(c)
    import data
    x0 = data.to_tensor(data.load_data("faces", 8, n=8).images)
    torch.manual_seed(c.seed)
    fresh, diffusion = train.build(c, 0, "cpu")
    trained, _ = train.build(c, 0, "cpu")
    trained.load_state_dict(state["model"])
    before, after = fixed_loss(fresh, diffusion, x0), fixed_loss(trained, diffusion, x0)
    assert after < 0.7 * before, (before, after)


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    c = cfg(tmp_path, steps=5)
    state = train.train(c)
    model, diffusion, tcfg, ck = train.load_trained(os.path.join(c.out, "ckpt.pt"))
    assert ck["step"] == 5 and tcfg.base == 16 and diffusion.T == 100
    for k, v in state["ema"].items():
        assert torch.equal(model.state_dict()[k], v)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = train.train(cfg(tmp_path, "full", steps=12, ckpt_every=100))
    train.train(cfg(tmp_path, "part", steps=5, ckpt_every=5))  # "interrupted" after 5 steps
    resumed = train.train(cfg(tmp_path, "part", steps=12, ckpt_every=100, resume=True))
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k
        assert torch.equal(full["ema"][k], resumed["ema"][k]), k


def test_resume_with_another_config_is_refused(tmp_path):
    train.train(cfg(tmp_path, steps=2))
    with pytest.raises(common.UserError, match="different config.*base"):
        train.train(cfg(tmp_path, steps=4, base=24, resume=True))
    with pytest.raises(common.UserError, match="exists; pass --resume"):
        train.train(cfg(tmp_path, steps=4))


def test_corrupted_checkpoint_is_refused(tmp_path):
    c = cfg(tmp_path, steps=2)
    train.train(c)
    path = os.path.join(c.out, "ckpt.pt")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])  # truncated
    with pytest.raises(common.UserError, match="truncated or corrupted"):
        train.load_trained(path)
    open(path, "wb").write(b"not a checkpoint")
    with pytest.raises(common.UserError, match="not a checkpoint"):
        train.load_trained(path)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = ddpm.Diffusion.loss, []

    def poisoned(self, *a, **k):  # finite for 3 steps, then NaN
        calls.append(1)
        out = real(self, *a, **k)
        return out * float("nan") if len(calls) > 3 else out

    monkeypatch.setattr(ddpm.Diffusion, "loss", poisoned)
    c = cfg(tmp_path, steps=10, ckpt_every=2)
    with pytest.raises(common.UserError, match="loss became nan at step 3.*last good checkpoint"):
        train.train(c)
    ck = common.load_checkpoint(os.path.join(c.out, "ckpt.pt"))
    assert ck["step"] == 2  # the checkpoint of step 2 survives intact


@pytest.mark.parametrize("args,needle", [
    (["--data", "/nonexistent/folder"], "nonexistent"),
    (["--n-train", "0"], "--n-train"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["--image-size", "12", "--mults", "1,2,2,2"], "--image-size"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, args, needle):
    r = cli("--out", str(tmp_path / "x"), "--steps", "1", *args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_bad_data_files_give_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"this is no png")
    np.savez(tmp_path / "noimages.npz", pixels=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "badlabels.npz", images=np.zeros((3, 8, 8, 3), np.uint8),
             labels=np.zeros(2))
    for spec, needle in [(empty, "empty"), (broken, "a.png"), (tmp_path / "noimages.npz", "images"),
                         (tmp_path / "badlabels.npz", "label")]:
        r = cli("--out", str(tmp_path / "x"), "--steps", "1", "--data", str(spec),
                "--image-size", "8")
        assert (r.returncode == 2 and needle in r.stderr
                and "Traceback" not in r.stderr), (spec, r.stderr)


def test_cli_trains_and_writes_samples(tmp_path):
    r = cli("--out", str(tmp_path / "m"), "--steps", "3", "--n-train", "4", "--image-size", "8",
            "--base", "16", "--attn-res", "4", "--T", "50", "--sample-n", "4",
            "--sample-steps", "5", "--batch", "4")
    assert r.returncode == 0, r.stderr
    assert (os.path.exists(tmp_path / "m" / "samples.png")
            and os.path.exists(tmp_path / "m" / "config.json"))


def test_grey_data_trains_a_one_channel_model(tmp_path):
    """Channels come from the data: a grey .npz (N, H, W) trains a 1-channel UNet that learns (its
    loss on the training images falls), stored in model_args, rebuilt by load_trained, sampled as
    grey."""
    import data
    rgb = data.load_data("faces", 8, n=8).images.astype(np.float64)
    # (N, H, W), no channel axis
    grey = np.round(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    np.savez(tmp_path / "grey.npz", images=grey)
    c = cfg(tmp_path, data=str(tmp_path / "grey.npz"), steps=150, lr=3e-3, warmup=10)
    state = train.train(c)
    assert state["model_args"]["channels"] == 1 and state["model"]["inp.weight"].shape[1] == 1
    x0 = data.to_tensor(grey[..., None])
    torch.manual_seed(c.seed)
    fresh, diffusion = train.build(c, 0, "cpu", channels=1)
    before, after = (fixed_loss(fresh, diffusion, x0),
                     fixed_loss(train.load_trained(os.path.join(c.out, "ckpt.pt"))[0],
                                diffusion, x0))
    assert after < 0.7 * before, (before, after)
    model, diffusion, _, _ = train.load_trained(os.path.join(c.out, "ckpt.pt"))
    x = diffusion.sample(model, 2, ddpm.sample_generators(0, range(2)), steps=3)
    assert model.channels == 1 and x.shape == (2, 1, 8, 8)
