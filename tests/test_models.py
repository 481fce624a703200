"""models.py, the loading boundary, and the diffusers-style schedules of ddpm.Diffusion (no extras
needed).

  - a train.py checkpoint stores `model_args`: ddpm.UNet(**model_args) alone rebuilds it; a
    checkpoint without the field is refused in one line;
  - schedules against closed forms written here: scaled_linear = (linspace of √β)²,
    squaredcos_cap_v2 = Nichol & Dhariwal's ᾱ(t) ratio capped at 0.999, a linear beta range;
    x_0-prediction inverts q_sample; diffusers' timestep spacings by hand; the old positional call
    still works;
  - unsupported settings are refused with one line naming the field; a diffusers folder without
    diffusers installed says how to install the extras;
  - a TorchScript export of a UNet with a JSON beside it is audited end to end by extract.py (uncond
    + SIDE): its uncond generations equal sampling the original nn.Module directly; the same for a
    1-channel (grey-scale) UNet whose JSON says "channels": 1, with grey data, grey samples and
    grids; a model audited against data of other channels is refused in one line naming both.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import ddpm
import metrics
import models
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_train=8, image_size=8, base=16, mults=(1, 2), attn_res=(4,), T=100, batch=8,
            sample_n=0, log_every=1e9)


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train.train(train.TrainConfig(out=str(out), steps=2, **TINY))
    return str(out / "ckpt.pt")


def probe(model, size=8, T=100, n=3):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, size, size, generator=g)
    t = torch.randint(T, (n,), generator=g)
    with torch.no_grad():
        return model(x, t)


def test_model_args_alone_rebuild_the_network(ckpt):
    ck = common.load_checkpoint(ckpt)
    net = ddpm.UNet(**ck["model_args"])
    net.load_state_dict(ck["ema"])
    model, diffusion, info = models.load_model(ckpt)
    ref, _, tcfg, _ = train.load_trained(ckpt)
    assert torch.equal(probe(net.eval()), probe(ref)) and torch.equal(probe(model), probe(ref))
    assert (info.kind, info.image_size, info.channels, info.num_classes) == ("train", 8, 3, 0)
    assert info.data == dict(spec="faces", n=8, seed=0, label_attr=None)
    assert torch.equal(diffusion.alphas_cumprod,
                       ddpm.Diffusion(tcfg.T, tcfg.schedule, tcfg.prediction).alphas_cumprod)


def test_a_train_run_folder_loads_its_checkpoint_and_other_folders_are_refused(ckpt, tmp_path):
    # holds ckpt.pt and train.py's config.json
    assert models.load_model(os.path.dirname(ckpt))[2].kind == "train"
    json.dump(dict(steps=3), open(tmp_path / "config.json", "w"))
    with pytest.raises(common.UserError, match="_class_name = None is not supported"):
        models.load_model(str(tmp_path))


def test_a_checkpoint_without_model_args_is_refused(ckpt, tmp_path):
    ck = common.load_checkpoint(ckpt)
    del ck["model_args"]
    old = str(tmp_path / "old.pt")
    common.save_checkpoint(ck, old)
    with pytest.raises(common.UserError, match="no model_args: an older train.py.*retrain it"):
        models.load_model(old)


def test_schedules_match_their_closed_forms():
    T = 1000
    d = ddpm.Diffusion(T, "scaled_linear", "epsilon", beta_start=0.00085, beta_end=0.012)
    ref = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2
    np.testing.assert_allclose(d.f64["betas"].numpy(), ref, rtol=1e-12)
    abar = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    # diffusers' betas_for_alpha_bar
    ref = np.minimum([1 - abar(i + 1) / abar(i) for i in range(T)], 0.999)
    np.testing.assert_allclose(ddpm.Diffusion(T, "squaredcos_cap_v2").f64["betas"].numpy(), ref,
                               rtol=1e-10)
    lin = ddpm.Diffusion(50, "linear", beta_start=0.001, beta_end=0.05).f64["betas"].numpy()
    np.testing.assert_allclose(lin, 0.001 + np.arange(50) * (0.049 / 49), rtol=1e-12)
    # the existing positional call, unchanged
    old = ddpm.Diffusion(100, "linear", "v", device="cpu")
    np.testing.assert_allclose(old.f64["betas"].numpy(), np.linspace(1e-3, 0.2, 100), rtol=1e-12)
    assert (old.prediction == "v" and old.clip_sample and old.variance == "fixed_small"
            and ddpm.Diffusion(10, prediction="v_prediction").prediction == "v")


def test_x0_prediction_inverts_the_forward_process():
    d = ddpm.Diffusion(100, "cosine", "sample")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    xt = d.q_sample(x0, t, noise)
    eps, x0_hat = d.eps_x0(x0, xt, t)
    assert torch.equal(x0_hat, x0) and torch.allclose(eps, noise, atol=1e-3)
    assert torch.allclose(d.loss(lambda x, t, y: x0, x0, t, noise), torch.zeros(4))


def test_timestep_spacings_are_diffusers_conventions():
    d = ddpm.Diffusion(1000)
    assert d.timesteps(50, "leading").tolist() == list(range(0, 1000, 20))
    assert d.timesteps(50, "trailing").tolist() == list(range(19, 1000, 20))
    assert d.timesteps(3, "trailing").tolist() == [332, 666, 999]  # round(1000 - k·333.3) - 1
    assert d.timesteps(4).tolist() == [0, 333, 666, 999]


@pytest.mark.parametrize("cfg,field", [
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(variance_type="learned"), "variance_type"),
    (dict(beta_schedule="sigmoid"), "beta_schedule"),
    (dict(prediction_type="flow"), "prediction_type"), (dict(thresholding=True), "thresholding"),
    (dict(_class_name="ScoreSdeVeScheduler"), "_class_name"),
    (dict(num_train_timesteps=1.5), "num_train_timesteps")])
def test_unsupported_scheduler_settings_are_refused_naming_the_field(cfg, field):
    with pytest.raises(common.UserError, match=f"^where: {field} ") as e:
        models.diffusion_from_config(cfg, "where")
    assert "\n" not in str(e.value)


def test_a_diffusers_folder_without_diffusers_says_how_to_install(tmp_path, monkeypatch):
    json.dump(dict(_class_name="UNet2DModel", sample_size=8, in_channels=3, out_channels=3),
              open(tmp_path / "config.json", "w"))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(common.UserError,
                       match="make extras .the two pip commands at the top of "
                             "requirements-extras.txt.$"):
        models.load_model(str(tmp_path))
    json.dump(dict(_class_name="UNet2DModel", sample_size=8, in_channels=3, out_channels=6),
              open(tmp_path / "config.json", "w"))
    # refused before diffusers is needed
    with pytest.raises(common.UserError, match="out_channels = 6"):
        models.load_model(str(tmp_path))


def test_sscd_without_the_extras_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(metrics.MetricsInputError, match="requirements-extras.txt"):
        metrics.evaluate(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8),
                         similarity="sscd")


class EpsOnly(torch.nn.Module):
    """A UNet as a plain ε-model of (x_t, t): the form any codebase can export."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t)


@pytest.fixture(scope="module")
def scripted(ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ts")
    unet, diffusion, tcfg, _ = train.load_trained(ckpt)
    path = str(folder / "eps.pt")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 70])
    torch.jit.trace(EpsOnly(unet), (x, t)).save(path)
    meta = dict(image_size=8, num_train_timesteps=tcfg.T, beta_schedule="linear",
                beta_start=0.01, beta_end=0.2,
                prediction_type="v_prediction" if tcfg.prediction == "v" else "epsilon",
                clip_sample=True)
    json.dump(meta, open(folder / "eps.json", "w"))
    np.savez(folder / "train.npz", images=data.load_data("faces", 8, n=12).images)
    return path, unet, str(folder)


def test_a_torchscript_model_loads_with_its_json_schedule(scripted):
    path, unet, _ = scripted
    model, diffusion, info = models.load_model(path)
    assert torch.allclose(probe(model), probe(unet), atol=1e-6)
    assert (info.kind, info.image_size, info.data) == ("torchscript", 8, None)
    np.testing.assert_allclose(diffusion.f64["betas"].numpy(), np.linspace(0.01, 0.2, 100),
                               rtol=1e-12)


def test_extract_needs_data_for_an_external_model(scripted, tmp_path):
    path, _, _ = scripted
    r = run_cli("extract.py", "--ckpt", path, "--out", str(tmp_path), "--methods", "uncond",
                "--device", "cpu")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert (r.stderr.startswith("error:") and "--data" in r.stderr
            and not os.path.exists(tmp_path / "cache"))


def test_extract_audits_a_torchscript_model_end_to_end(scripted, tmp_path):
    path, unet, folder = scripted
    out = str(tmp_path / "out")
    r = run_cli("extract.py", "--ckpt", path, "--data", os.path.join(folder, "train.npz"),
                "--out", out,
                "--methods", "uncond,side", "--features", "pixels", "--n-gen", "6",
                "--batch", "4", "--n-syn", "8", "--K", "2", "--tau", "0", "--clf-steps", "3",
                "--clf-width", "8", "--sample-steps", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(os.path.join(out, "samples.npz")) as z:
        images, method = z["images"], z["method"]
    assert (method == "side").sum() == 6 and os.path.exists(os.path.join(out, "REPORT.md"))
    d = ddpm.Diffusion(100, "linear", train.TrainConfig().prediction, beta_start=0.01, beta_end=0.2)
    # extract's defaults: seed 1, ddim
    ref = d.sample(unet, 6, ddpm.sample_generators(1, range(6)), steps=4, eta=1.0)
    got = images[method == "uncond"].astype(int)
    # a trace may round the last bit differently
    assert np.abs(got - data.to_uint8(ref).astype(int)).max() <= 1


@pytest.fixture(scope="module")
def grey_scripted(tmp_path_factory):
    """A 1-channel UNet exported as TorchScript with "channels": 1 in its JSON, and grey training
    data."""
    folder = tmp_path_factory.mktemp("ts-grey")
    torch.manual_seed(0)
    unet = ddpm.UNet(image_size=8, channels=1, base=16, mults=(1, 2), attn_res=(4,)).eval()
    path = str(folder / "grey.pt")
    torch.jit.trace(EpsOnly(unet), (torch.randn(2, 1, 8, 8), torch.tensor([3, 70]))).save(path)
    json.dump(dict(image_size=8, channels=1, num_train_timesteps=100),
              open(folder / "grey.json", "w"))
    faces = data.load_data("faces", 8, n=12).images
    np.savez(folder / "grey.npz", images=faces[..., 1])  # (N, H, W): grey
    np.savez(folder / "rgb.npz", images=faces)
    return path, unet, str(folder)


def test_extract_audits_a_grey_torchscript_model_end_to_end(grey_scripted, tmp_path):
    path, unet, folder = grey_scripted
    model, _, info = models.load_model(path)
    assert info.channels == 1 and model.channels == 1
    out = str(tmp_path / "out")
    r = run_cli("extract.py", "--ckpt", path, "--data", os.path.join(folder, "grey.npz"),
                "--out", out,
                "--methods", "uncond,side", "--features", "pixels", "--n-gen", "6",
                "--batch", "4", "--n-syn", "8", "--K", "2", "--tau", "0", "--clf-steps", "3",
                "--clf-width", "8", "--sample-steps", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(os.path.join(out, "samples.npz")) as z:
        images, method = z["images"], z["method"]
    assert images.shape == (12, 8, 8, 1) and (method == "side").sum() == 6
    # the JSON: DDPMScheduler defaults
    d = ddpm.Diffusion(100, "linear", "eps", beta_start=1e-4, beta_end=0.02)
    ref = d.sample(unet, 6, ddpm.sample_generators(1, range(6)), steps=4, eta=1.0)
    assert np.abs(images[method == "uncond"].astype(int)
                  - data.to_uint8(ref).astype(int)).max() <= 1
    with Image.open(os.path.join(out, "grids", "uncond.png")) as im:
        assert im.mode == "L"  # grey grids, not lifted to RGB


def test_a_model_and_data_of_other_channels_are_refused_naming_both(grey_scripted, scripted,
                                                                    tmp_path):
    (grey, _, folder), (rgb, _, _) = grey_scripted, scripted
    for ckpt, npz, words in ((grey, os.path.join(folder, "rgb.npz"),
                              ("1-channel (grey-scale)", "3-channel (RGB)")),
                             (rgb, os.path.join(folder, "grey.npz"),
                              ("3-channel (RGB)", "1-channel (grey-scale)"))):
        r = run_cli("extract.py", "--ckpt", ckpt, "--data", npz, "--out", str(tmp_path / "x"),
                    "--methods", "uncond", "--device", "cpu")
        assert (r.returncode == 2 and r.stderr.count("\n") == 1
                and r.stderr.startswith("error:")), r.stderr
        assert ckpt in r.stderr and npz in r.stderr and all(w in r.stderr for w in words), r.stderr
        assert not os.path.exists(tmp_path / "x" / "cache")


def test_extract_audits_a_torchscript_model_with_repeats(scripted, tmp_path):
    path, _, folder = scripted
    out = tmp_path / "out"
    r = run_cli("extract.py", "--ckpt", path, "--data", os.path.join(folder, "train.npz"),
                "--out", str(out),
                "--methods", "uncond,side", "--features", "pixels", "--n-gen", "6",
                "--batch", "4", "--n-syn", "8", "--K", "2", "--tau", "0", "--clf-steps", "3",
                "--clf-width", "8", "--sample-steps", "4", "--device", "cpu", "--repeats", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.load(open(out / "metrics.json"))["audit"]
    assert ([x["folder"] for x in rec["repeats"]]
            == [str(out), str(out / "repeat-1"), str(out / "repeat-2")])
    for x, est in zip(rec["repeats"], rec["extrapolation"]["per_repeat"]["side"]["any"]):
        assert est["estimate"][0] == json.load(
            open(os.path.join(x["folder"], "metrics.json")))["methods"]["side"]["distinct_any"]
    assert os.path.exists(out / "AUDIT_REPORT.md") and os.path.exists(out / "leaked.csv")
