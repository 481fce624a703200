"""ddpm.py against independent references: closed forms, Bayes' rule, the exact optimal denoiser."""
import math

import numpy as np
import pytest
import torch

import ddpm


def test_linear_schedule_closed_form():
    b = ddpm.beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999)
    d = ddpm.Diffusion(1000, "linear")
    ab = np.prod(1 - b)  # ᾱ_T by direct product
    assert float(d.f64["alphas_cumprod"][-1]) == pytest.approx(ab, rel=1e-12)
    assert ab < 1e-4  # the chain ends near N(0, I)


def test_cosine_schedule_closed_form():
    T, s = 100, 0.008
    d = ddpm.Diffusion(T, "cosine")
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 10, 50, 90]:  # unclipped region: ᾱ_t = f(t+1)/f(0) (0-based index)
        assert float(d.f64["alphas_cumprod"][t]) == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert float(d.f64["betas"].max()) <= 0.999


def test_posterior_matches_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): multiply the two Gaussians by hand."""
    d = ddpm.Diffusion(200, "linear")
    b, ab = d.f64["betas"].numpy(), d.f64["alphas_cumprod"].numpy()
    x0, xt = torch.tensor([[0.3, -0.7]]), torch.tensor([[1.1, 0.2]])
    for t in [1, 5, 100, 199]:
        prec = 1 / (1 - ab[t - 1]) + (1 - b[t]) / b[t]
        var = 1 / prec
        mean = var * (math.sqrt(ab[t - 1]) * x0.double() / (1 - ab[t - 1])
                      + math.sqrt(1 - b[t]) * xt.double() / b[t])
        m, v, logv = d.q_posterior(x0, xt, torch.tensor([t]))
        assert (torch.allclose(m.double(), mean, atol=1e-5)
                and float(v) == pytest.approx(var, rel=1e-5))
        assert float(logv) == pytest.approx(math.log(var), rel=1e-4)


def test_q_sample_moments():
    d = ddpm.Diffusion(1000)
    x0 = torch.full((200_000, 1), 0.5)
    t = torch.full((200_000,), 300)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    ab = float(d.f64["alphas_cumprod"][300])
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02)


class OptimalDenoiser(torch.nn.Module):
    """The exact minimiser of Ho et al. Eq. 14 (or its v-form) when the data is one image x*:
    ε* = (x_t - sqrt(ᾱ)x*)/sqrt(1-ᾱ)."""

    def __init__(self, target, diffusion):
        super().__init__()
        self.target, self.d = target, diffusion
        self.channels, self.image_size = target.shape[0], target.shape[1]

    def forward(self, x, t, y=None):
        ab = self.d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.target) / (1 - ab).sqrt()
        return (eps if self.d.prediction == "eps"
                else ab.sqrt() * eps - (1 - ab).sqrt() * self.target)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler,eta,steps", [("ddpm", 1.0, 100), ("ddpm", 1.0, 10),
                                               ("ddim", 0.0, 10), ("ddim", 1.0, 20)])
def test_optimal_denoiser_returns_the_training_image(prediction, sampler, eta, steps, channels):
    d = ddpm.Diffusion(100, "linear", prediction)
    target = torch.rand((channels, 8, 8), generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    x = d.sample(OptimalDenoiser(target, d), 4, ddpm.sample_generators(0, range(4)), steps=steps,
                 eta=eta, sampler=sampler)
    assert torch.allclose(x, target.expand_as(x), atol=1e-4)


def test_ddim_eta0_is_the_deterministic_ode():
    """Re-derive Song et al. Eq. 12 with σ=0 by hand from the same x_T; the sampler must agree."""
    torch.manual_seed(0)
    net = ddpm.UNet(image_size=8, base=16, mults=(1, 2), attn_res=(4,)).eval()
    for p in net.parameters():  # make the zero-initialised output layers do something
        p.data.add_(0.05 * torch.randn_like(p))
    d = ddpm.Diffusion(50)
    x = d.sample(net, 2, ddpm.sample_generators(3, range(2)), steps=5, eta=0.0, clip_x0=False)
    xt = torch.stack([torch.randn((3, 8, 8), generator=g)
                      for g in ddpm.sample_generators(3, range(2))])
    ab = d.f64["alphas_cumprod"].numpy()
    seq = d.timesteps(5)
    with torch.no_grad():
        for i in reversed(range(len(seq))):
            a, ap = ab[seq[i]], (ab[seq[i - 1]] if i else 1.0)
            eps = net(xt, torch.full((2,), int(seq[i])))
            x0 = (xt - math.sqrt(1 - a) * eps) / math.sqrt(a)
            xt = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps
    assert torch.allclose(x, xt, atol=1e-5)
    again = d.sample(net, 2, ddpm.sample_generators(3, range(2)), steps=5, eta=0.0, clip_x0=False)
    assert torch.equal(x, again)


def test_zero_cond_fn_is_bit_identical_and_images_ignore_their_batch():
    torch.manual_seed(0)
    net = ddpm.UNet(image_size=8, base=16, mults=(1, 2), attn_res=(4,)).eval()
    d = ddpm.Diffusion(50)
    gens = lambda: ddpm.sample_generators(7, range(3))  # noqa: E731
    plain = d.sample(net, 3, gens(), steps=10, eta=1.0)
    zero = d.sample(net, 3, gens(), steps=10, eta=1.0, cond_fn=lambda x, t: torch.zeros_like(x))
    assert torch.equal(plain, zero)
    alone = d.sample(net, 1, ddpm.sample_generators(7, [2]), steps=10, eta=1.0)
    assert torch.allclose(alone[0], plain[2], atol=1e-5)  # image 2 depends only on (seed, 2)


def test_guidance_shifts_eps_by_the_dhariwal_nichol_formula():
    """With a constant cond_fn g and the exact denoiser, x_0 moves by sqrt(1-ᾱ)·g·sqrt(1-ᾱ)/sqrt(ᾱ)
    per step at a single step from t to 0: x0_hat = (x - sqrt(1-ᾱ) ε̂)/sqrt(ᾱ),
    ε̂ = ε - sqrt(1-ᾱ) g."""
    d = ddpm.Diffusion(100, "linear", "eps")
    target = torch.zeros(3, 4, 4)
    g = 0.01
    x = d.sample(OptimalDenoiser(target, d), 1, ddpm.sample_generators(0, [0]), steps=1, eta=0.0,
                 cond_fn=lambda x, t: torch.full_like(x, g), clip_x0=False)
    ab = float(d.f64["alphas_cumprod"][99])
    assert torch.allclose(x, torch.full_like(x, (1 - ab) * g / math.sqrt(ab)), atol=1e-5)


def test_prior_kl_closed_form():
    """L_T of the sub-chain from step k:
    q(z_{T-1} | z_k) = N(sqrt(ᾱ_{T-1}/ᾱ_k) z_k, 1 - ᾱ_{T-1}/ᾱ_k)."""
    d = ddpm.Diffusion(100)
    z = torch.full((1, 3, 2, 2), 0.7)
    for k in (0, 10, 98):  # k = 98: a = 1 - β_99, far from 0, where log(1 - a) and log(1 + a) part
        a = float(d.f64["alphas_cumprod"][-1] / d.f64["alphas_cumprod"][k])
        m, v = math.sqrt(a) * 0.7, 1 - a
        kl = 0.5 * (v + m * m - 1 - math.log(v)) * 12  # KL(N(m,v)||N(0,1)) per dim, 12 dims
        assert d.prior_kl(z, k).item() == pytest.approx(kl, rel=1e-6)


def test_normal_kl_against_torch_distributions():
    """ddpm.normal_kl (means and log-variances) against torch.distributions' Gaussian KL, an
    independent implementation, with both variances away from 1."""
    g = torch.Generator().manual_seed(0)
    m1, m2 = (torch.randn(50, generator=g, dtype=torch.float64),
              torch.randn(50, generator=g, dtype=torch.float64))
    lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64),
                torch.randn(50, generator=g, dtype=torch.float64))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(ddpm.normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10, atol=1e-12)
