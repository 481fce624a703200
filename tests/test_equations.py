"""Tests that catch wrong maths: each compares an equation-bearing function against an
independent reference on a case where a wrong coefficient, sign or operator changes the answer.
They were added until every mutant of `python tools/mutate.py` in these functions was killed.

  - samplers: Gaussian data N(μ, s²) and its exact denoiser E[x_0 | x_t] make every DDIM (any η)
    and DDPM step linear in x_t plus fresh noise, so the samples are exactly Gaussian with a mean
    and variance propagated here, step by step, from Song et al. Eq. 12/16 and Ho et al. Eq. 7 in
    float64; the sampler's empirical moments must match at several η, step counts and both network
    targets, with and without a constant guidance gradient (Dhariwal & Nichol's ε̂), at 3 and 1
    channels;
  - clipping: data outside [-1, 1] makes every step use the clamped x̂_0 and the ε it implies; the
    ancestral noise is the image's own generator's, step by step (hand-computed trajectories);
  - the training loss against its definition; the respaced timesteps; the schedules' length and
    clip;
  - the time-dependent classifier really trains on noised images: at large t only it can classify;
  - squared distances and cohesion (a singleton cluster) by hand; the L2 branch of AMS/UMS by hand.
Equivalent mutants (no test can kill them) are listed in tools/mutate.py's docstring.
"""
import math

import numpy as np
import pytest
import torch

import ddpm

# the data: every pixel i.i.d. N(MU, S²); x̂_0 stays well inside [-1, 1] (clipping never acts)
MU, S = 0.2, 0.15


class GaussianDenoiser(torch.nn.Module):
    """The exact E[x_0 | x_t] of N(MU, S²) data,
    x̂_0 = MU + sqrt(ᾱ) S² / (ᾱ S² + 1 - ᾱ) (x_t - sqrt(ᾱ) MU), output as ε or v for the
    diffusion's target."""

    def __init__(self, d, shape=(3, 4, 4)):
        super().__init__()
        self.d, self.channels, self.image_size = d, shape[0], shape[1]

    def forward(self, x, t, y=None):
        ab = self.d.f64["alphas_cumprod"][t].reshape(-1, 1, 1, 1).double()
        x = x.double()
        x0 = MU + ab.sqrt() * S ** 2 / (ab * S ** 2 + 1 - ab) * (x - ab.sqrt() * MU)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return (eps if self.d.prediction == "eps"
                else ab.sqrt() * eps - (1 - ab).sqrt() * x0).float()


def exact_moments(ab_seq, sampler, eta, g=0.0):
    """Mean and variance of the samples, propagated through the linear steps (x_T ~ N(0, 1)).
    ab_seq: ᾱ at the visited timesteps, increasing. g: a constant guidance gradient."""
    m, v = 0.0, 1.0
    for i in range(len(ab_seq) - 1, -1, -1):
        a, ap = ab_seq[i], (ab_seq[i - 1] if i > 0 else 1.0)
        A = math.sqrt(a) * S ** 2 / (a * S ** 2 + 1 - a)  # x̂_0 = A x + B
        B = MU - A * math.sqrt(a) * MU
        B += (1 - a) / math.sqrt(a) * g  # ε̂ = ε - sqrt(1-ᾱ) g  <=>  x̂_0 moves by (1-ᾱ)/sqrt(ᾱ) g
        # ε̂ = E x + F
        E, F = (1 - math.sqrt(a) * A) / math.sqrt(1 - a), -math.sqrt(a) * B / math.sqrt(1 - a)
        if sampler == "ddim":
            sig2 = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)  # Song et al. Eq. 16
            c0, ce = math.sqrt(ap), math.sqrt(1 - ap - sig2)  # Song et al. Eq. 12
            c, d = c0 * A + ce * E, c0 * B + ce * F
        else:
            beta = 1 - a / ap  # Ho et al. Eq. 7 on the respaced chain
            c1, c2 = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
            sig2 = beta * (1 - ap) / (1 - a)
            c, d = c1 * A + c2, c1 * B
        m, v = c * m + d, c * c * v + (sig2 if i > 0 else 0.0)
    return m, v


def our_timesteps(T, steps):
    """Evenly spaced integers from T-1 down to 0, rounded (the respacing Song et al. use)."""
    return (sorted({int(round(T - 1 - k * (T - 1) / (steps - 1))) for k in range(steps)})
            if steps > 1 else [T - 1])


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler,eta,steps,g", [
    ("ddim", 0.0, 10, 0.0), ("ddim", 0.5, 4, 0.0), ("ddim", 1.0, 25, 0.0), ("ddim", 1.0, 3, 0.0),
    ("ddpm", 1.0, 8, 0.0), ("ddpm", 1.0, 100, 0.0), ("ddim", 0.5, 6, 0.3), ("ddpm", 1.0, 5, -0.4)])
def test_samples_of_gaussian_data_have_the_exact_moments(prediction, sampler, eta, steps, g):
    T, n = 100, 2000
    d = ddpm.Diffusion(T, "linear", prediction)
    cond = None if g == 0 else (lambda x, t: torch.full_like(x, g))
    x = d.sample(GaussianDenoiser(d), n, ddpm.sample_generators(0, range(n)), steps=steps,
                 eta=eta, sampler=sampler, cond_fn=cond,
                 clip_x0=cond is None).double()  # a constant g pushes x̂_0 far out at large t
    ab = d.f64["alphas_cumprod"].numpy()
    assert d.timesteps(steps).tolist() == our_timesteps(T, steps)
    m, v = exact_moments([float(ab[t]) for t in our_timesteps(T, steps)], sampler, eta, g)
    # pixels are i.i.d. given the model
    assert abs(x.mean().item() - m) < 5 * math.sqrt(v / x.numel())
    assert x.var().item() == pytest.approx(v, rel=5 * math.sqrt(2 / x.numel()))


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler,eta,steps,g", [("ddim", 0.5, 6, 0.3), ("ddpm", 1.0, 8, 0.0),
                                                 ("ddim", 1.0, 3, 0.0)])
def test_one_channel_samples_have_the_exact_moments(prediction, sampler, eta, steps, g):
    """The same closed form for grey-scale images (1 x 4 x 4): the sampler's shapes follow the
    model's channels, and the moments are those of every step's exact recursion."""
    T, n = 100, 6000  # 3x the images of the 3-channel test: the same number of i.i.d. pixels
    d = ddpm.Diffusion(T, "linear", prediction)
    cond = None if g == 0 else (lambda x, t: torch.full_like(x, g))
    x = d.sample(GaussianDenoiser(d, shape=(1, 4, 4)), n, ddpm.sample_generators(0, range(n)),
                 steps=steps, eta=eta, sampler=sampler, cond_fn=cond,
                 clip_x0=cond is None).double()
    assert x.shape == (n, 1, 4, 4)
    ab = d.f64["alphas_cumprod"].numpy()
    m, v = exact_moments([float(ab[t]) for t in our_timesteps(T, steps)], sampler, eta, g)
    assert abs(x.mean().item() - m) < 5 * math.sqrt(v / x.numel())
    assert x.var().item() == pytest.approx(v, rel=5 * math.sqrt(2 / x.numel()))


def test_the_reference_recursion_recovers_the_data_distribution():
    """A check of exact_moments itself: with all T = 1000 steps DDIM η=0 (the probability-flow ODE)
    returns N(MU, S²) within 3 % (the discretization; x_T ~ N(0, 1) is not quite q(x_T)), DDPM's
    fixed β̃ variance within 6 %."""
    ab = [float(a) for a in ddpm.Diffusion(1000).f64["alphas_cumprod"]]
    m, v = exact_moments(ab, "ddim", 0.0)
    assert m == pytest.approx(MU, abs=1e-3) and v == pytest.approx(S ** 2, rel=0.03)
    m, v = exact_moments(ab, "ddpm", 1.0)
    assert m == pytest.approx(MU, abs=1e-3) and v == pytest.approx(S ** 2, rel=0.06)


def test_timesteps_and_linear_clip():
    d = ddpm.Diffusion(10)
    assert d.timesteps(10).tolist() == list(range(10)) and d.timesteps(1).tolist() == [9]
    assert d.timesteps(4).tolist() == [0, 3, 6, 9]
    b = ddpm.beta_schedule("linear", 10)  # scaled x100: 0.01 .. 2.0, clipped at 0.999
    assert b[0] == pytest.approx(0.01) and b.max() == 0.999 and b.min() > 0
    assert float(ddpm.Diffusion(10).f64["posterior_log_variance_clipped"][0]) == pytest.approx(
        math.log(float(d.f64["posterior_variance"][1])))  # β̃_0 = 0 is replaced by β̃_1


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_is_the_mse_of_its_target(prediction):
    d = ddpm.Diffusion(100, "cosine", prediction)
    gen = torch.Generator().manual_seed(0)
    x0, noise = (torch.rand(4, 3, 2, 2, generator=gen) * 2 - 1,
                 torch.randn(4, 3, 2, 2, generator=gen))
    t = torch.tensor([0, 10, 50, 99])
    ab = d.f64["alphas_cumprod"][t].reshape(-1, 1, 1, 1)
    xt_ref = (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double())
    target = (noise.double() if prediction == "eps"
              else ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double())
    seen = {}

    def model(xt, tt, y=None):
        seen["xt"] = xt
        return torch.full_like(xt, 0.25)
    loss = d.loss(model, x0, t, noise)
    assert torch.allclose(seen["xt"].double(), xt_ref, atol=1e-6)
    assert torch.allclose(loss.double(), ((0.25 - target) ** 2).flatten(1).mean(1), atol=1e-6)


def test_schedules_have_one_beta_per_step():
    for kind in ("linear", "cosine"):
        for T in (10, 100):
            assert ddpm.beta_schedule(kind, T).shape == (T,)


# ----------------------------------------------------------------- SIDE's time-dependent classifier

def test_time_dependent_classifier_is_trained_on_noised_images():
    """Two classes of flat images at ±0.3 (+ small pixel noise). At t = T/4 (ᾱ ≈ 0.5) the pixel mean
    of x_t still separates them (signal 0.21 vs noise 0.05 over 192 pixels), but only a classifier
    that saw noised images during training knows that: one trained on clean images meets inputs with
    ~40x its training variance (BatchNorm statistics of clean images) and fails."""
    import side
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = ((0.6 * y - 0.3).float().reshape(-1, 1, 1, 1)
         + 0.05 * torch.randn(200, 3, 8, 8, generator=gen))
    d = ddpm.Diffusion(100)
    _, report = side.train_classifier(x, y, diffusion=d, steps=120, batch=32, width=8, holdout=0.3,
                                      log=None, seed=1)
    assert report["heldout_acc_by_t"][25] > 0.9 and report["heldout_acc_by_t"][0] > 0.9


@pytest.mark.parametrize("prediction,level", [("eps", 3.0), ("v", 3.0), ("eps", -3.0)])
def test_clipped_x0_and_the_eps_it_implies_drive_every_step(prediction, level):
    """Data at ±3 (outside [-1, 1]): with clip_x0 every x̂_0 is clamped to c = ±1 and ε recomputed
    from it, so DDIM η=0 follows x_prev = sqrt(ᾱ_prev)·c + sqrt(1-ᾱ_prev)·(x - sqrt(ᾱ)·c)/sqrt(1-ᾱ)
    exactly, from the same x_T, and ends at c; without clipping it ends at ±3."""
    T, steps = 50, 5
    d = ddpm.Diffusion(T, "linear", prediction)
    c = math.copysign(1.0, level)

    class Three(torch.nn.Module):
        channels, image_size = 3, 2

        def forward(self, x, t, y=None):
            ab = d.f64["alphas_cumprod"][t].reshape(-1, 1, 1, 1).double()
            eps = (x.double() - ab.sqrt() * level) / (1 - ab).sqrt()
            return (eps if prediction == "eps"
                    else ab.sqrt() * eps - (1 - ab).sqrt() * level).float()
    seen = []
    x = d.sample(Three(), 2, ddpm.sample_generators(4, range(2)), steps=steps, eta=0.0,
                 callback=lambda i, t, xt, x0: seen.append(xt.double().clone()))
    assert torch.equal(x, torch.full_like(x, c))
    ref = torch.stack([torch.randn((3, 2, 2), generator=g)
                       for g in ddpm.sample_generators(4, range(2))]).double()
    ab = d.f64["alphas_cumprod"].numpy()
    seq = our_timesteps(T, steps)
    for i in range(len(seq) - 1, -1, -1):
        a, ap = ab[seq[i]], (ab[seq[i - 1]] if i else 1.0)
        ref = math.sqrt(ap) * c + math.sqrt(1 - ap) * (ref - math.sqrt(a) * c) / math.sqrt(1 - a)
        assert torch.allclose(seen[len(seq) - 1 - i], ref, atol=1e-4), i
    free = d.sample(Three(), 2, ddpm.sample_generators(4, range(2)), steps=steps, eta=0.0,
                    clip_x0=False)
    assert torch.allclose(free, torch.full_like(free, level), atol=1e-3)


def test_ddpm_steps_add_the_noise_of_the_images_own_generator():
    """generators[i] gives x_T first, then one N(0, I) draw per step but the last: the ancestral
    trajectory of the one-image denoiser (x̂_0 = 0) is x_prev = μ̃(0, x) + σ̃ z, recomputed here by
    hand."""
    T, steps = 20, 4
    d = ddpm.Diffusion(T, "linear", "eps")

    class Zero(torch.nn.Module):
        channels, image_size = 3, 2

        def forward(self, x, t, y=None):  # ε̂ = x_t / sqrt(1-ᾱ): the exact denoiser of data at 0
            return (x.double()
                    / (1 - d.f64["alphas_cumprod"][t].reshape(-1, 1, 1, 1)).sqrt()).float()
    seen = []
    d.sample(Zero(), 2, ddpm.sample_generators(5, range(2)), steps=steps, sampler="ddpm",
             callback=lambda i, t, xt, x0: seen.append(xt.double().clone()))
    gens = ddpm.sample_generators(5, range(2))
    draw = lambda: torch.stack([torch.randn((3, 2, 2), generator=g)  # noqa: E731
                                for g in gens]).double()
    x, ab, seq = draw(), d.f64["alphas_cumprod"].numpy(), our_timesteps(T, steps)
    for i in range(len(seq) - 1, -1, -1):
        a, ap = ab[seq[i]], (ab[seq[i - 1]] if i else 1.0)
        beta = 1 - a / ap
        x = (math.sqrt(1 - beta) * (1 - ap) / (1 - a) * x
             + (math.sqrt(beta * (1 - ap) / (1 - a)) * draw() if i else 0))
        assert torch.allclose(seen[len(seq) - 1 - i], x, atol=1e-5), i


def test_squared_distances_and_singleton_cohesion_by_hand():
    import side
    gen = torch.Generator().manual_seed(0)
    # distances well below 1
    Z, C = 0.1 * torch.randn(7, 3, generator=gen), 0.1 * torch.randn(2, 3, generator=gen)
    ref = ((Z[:, None].double() - C[None].double()) ** 2).sum(-1)
    assert torch.allclose(side._sqdist(Z, C).double(), ref, atol=1e-6)
    assign = torch.tensor([0, 0, 0, 0, 0, 0, 1])  # cluster 1 has a single member
    coh = side.cluster_cohesion(Z, assign, C)
    cos = torch.nn.functional.cosine_similarity(Z.double(), C.double()[assign], dim=1)
    assert coh[1].item() == pytest.approx(cos[6].item(), abs=1e-6)
    assert coh[0].item() == pytest.approx(cos[:6].mean().item(), abs=1e-6)


def test_guidance_error_names_the_first_timestep_of_the_batch():
    import side
    clf = side.TimeResNet(2, image_size=8, width=8, T=100).eval()
    clf.fc.weight.data.fill_(float("nan"))
    with pytest.raises(side.SideError, match="timestep 7;"):
        side.guidance(clf, 0, 1.0)(torch.randn(2, 3, 8, 8), torch.tensor([7, 9]))


def test_ams_ums_on_a_hand_made_distance_matrix():
    """The L2 branch of SIDE's AMS and UMS: the nearest match is the smallest distance; bands (lo,
    hi], [0, hi]."""
    import metrics
    D = np.array([[0.05, 0.075, 0.5],
                  [0.09, 0.06, 0.2],
                  [0.3, 0.2, 0.0]])
    ams, ums = metrics.ams_ums(D, metrics.L2_BANDS, "l2")
    # nearest: 0.05 (high), 0.06 (high), 0.0 (high); AMS high 100 %
    assert ams == pytest.approx({"low": 0.0, "mid": 0.0, "high": 100.0})
    # high (<= 0.07): items 0, 1, 2; mid (0.07, 0.08]: item 1 (0.075);
    # low (0.08, 0.095]: item 0 (0.09)
    assert ums == pytest.approx({"low": 100 / 3, "mid": 100 / 3, "high": 100.0})
