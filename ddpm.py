"""A compact DDPM: the UNet and the diffusion maths of Ho et al. 2020, with DDIM and guidance.

Implements, each on the line marked with its equation:
  - beta schedules, linear (Ho et al. 2020, Sec. 4) and cosine (Nichol & Dhariwal 2021, Eq. 17),
    computed in float64 and cast to float32 once;
  - q_sample, the forward process      x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε   (Ho et al. Eq. 4)
  - q_posterior, q(x_{t-1} | x_t, x_0)  mean and variance                    (Ho et al. Eq. 6-7)
  - the training loss, ε-prediction     ||ε - ε_θ(x_t, t)||²                 (Ho et al. Eq. 14)
    or v-prediction, v = sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x_0                     (Salimans & Ho 2022)
  - the ancestral DDPM step with the true posterior mean and variance (Ho et al. Eq. 6-7, Alg. 2),
    on any sub-sequence of timesteps (respaced chain: β'_t = 1 - ᾱ_t / ᾱ_prev)
  - the DDIM step with η                                                   (Song et al. Eq. 12)
  - classifier guidance through a `cond_fn` hook: ε̂ = ε_θ - sqrt(1-ᾱ_t) · cond_fn(x_t, t),
    where cond_fn returns s·∇_{x_t} log p(y | x_t, t)       (Dhariwal & Nichol 2021, Alg. 2)
  - an upper bound on -log p_θ(x) for x ~ q_ε (SIDE Definition 1): the variational bound
    (Ho et al. Eq. 5) of the sub-chain that starts at the step k with (1-ᾱ_k)/ᾱ_k = ε²
    (`subchain_nll`), estimated from timesteps drawn afresh per sample and stratified
    (`bound_draw`).

Timesteps are 0-based: index t in {0..T-1} is Ho's t+1. Images are float tensors in [-1, 1], NCHW.
Pure functions and an nn.Module; no I/O. Depends on torch and numpy only.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ============================================================================ the UNet


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017; Ho et al.,
    Sec. 4)."""
    half = dim // 2
    dtype = torch.get_default_dtype()  # float32 unless a test runs the whole model in float64
    k = torch.arange(half, device=t.device, dtype=dtype)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def norm(ch):
    """GroupNorm with up to 8 groups (32 in the paper's UNet is too many for our narrow widths)."""
    return nn.GroupNorm(math.gcd(8, ch), ch)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-dropout-conv, residual (Ho et al. 2020, App. B)."""

    def __init__(self, cin, cout, temb, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.temb = nn.Sequential(nn.SiLU(), nn.Linear(temb, cout))
        self.out_layers = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)  # each block starts as the identity
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.temb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Single-head self-attention over the spatial positions, residual."""

    def __init__(self, ch):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class UNet(nn.Module):
    """ε_θ(x_t, t[, y]): a compact UNet with residual blocks, GroupNorm and low-resolution
    attention.

    num_classes > 0 adds a label embedding to the time embedding (class conditioning, used for the
    informative- and random-label models); the label value num_classes means "no label".
    """

    def __init__(self, image_size=32, channels=3, base=64, mults=(1, 2, 2), num_res_blocks=1,
                 attn_res=(8,), num_classes=0, dropout=0.0):
        super().__init__()
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        temb = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.label_emb = nn.Embedding(num_classes + 1, temb) if num_classes > 0 else None
        self.inp = nn.Conv2d(channels, base, 3, padding=1)
        self.down, skips, ch, res = nn.ModuleList(), [base], base, image_size
        for level, m in enumerate(mults):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(ch, base * m, temb, dropout),
                                                Attention(base * m) if res in attn_res
                                                else nn.Identity()]))
                ch = base * m
                skips.append(ch)
            if level < len(mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, temb, dropout), Attention(ch),
                                  ResBlock(ch, ch, temb, dropout)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(ch + skips.pop(), base * m, temb, dropout),
                                              Attention(base * m) if res in attn_res
                                              else nn.Identity()]))
                ch = base * m
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _embed(self, t, y):
        emb = self.time_mlp(timestep_embedding(t, self.time_mlp[0].in_features))
        if self.label_emb is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x, t, y=None, return_mid=False):
        assert x.shape[1:] == (self.channels, self.image_size, self.image_size), x.shape
        emb = self._embed(t, y)
        h, hs = self.inp(x), []
        hs.append(h)
        for layer in self.down:
            h = layer[1](layer[0](h, emb)) if isinstance(layer, nn.ModuleList) else layer(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        if return_mid:  # encoder features for SIDE's clustering (SIDE Alg. 1, step 2)
            return h
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](torch.cat([h, hs.pop()], dim=1), emb))
            else:
                h = layer(h)
        return self.out(h)


# ============================================================================ schedules


# the last is diffusers' name for cosine
SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2")
PREDICTIONS = {"eps": "eps", "v": "v", "x0": "x0",  # ours, and diffusers' prediction_type names:
               "epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def beta_schedule(kind, T, beta_start=None, beta_end=None):
    """β_1..β_T in float64. linear: Ho et al. (1e-4 .. 0.02 at T=1000, rescaled for other T), or
    beta_start .. beta_end when given (diffusers' "linear"); scaled_linear: (linspace of √β)²,
    as in diffusers / latent diffusion; cosine (= diffusers' "squaredcos_cap_v2"): Nichol &
    Dhariwal 2021, Eq. 17, ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2)."""
    if kind in ("linear", "scaled_linear") and (beta_start is None) != (beta_end is None):
        raise ValueError("give both beta_start and beta_end, or neither")
    if kind == "linear":
        if beta_start is not None:
            return np.linspace(beta_start, beta_end, T, dtype=np.float64)
        scale = 1000.0 / T  # keeps ᾱ_T ≈ 4e-5 whatever T is
        # T < 50 would pass 1
        return np.clip(np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64), 0.0, 0.999)
    if kind == "scaled_linear":
        # Stable Diffusion's range
        b0, b1 = (0.00085, 0.012) if beta_start is None else (beta_start, beta_end)
        return np.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=np.float64) ** 2
    if kind in ("cosine", "squaredcos_cap_v2"):
        s = 0.008  # offset so β_1 is not vanishingly small (Nichol & Dhariwal, Sec. 3.2)
        f = np.cos((np.arange(T + 1, dtype=np.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        # clip at 0.999, as Nichol & Dhariwal do below their Eq. 17
        return np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; use one of {', '.join(SCHEDULES)}")


def _gather(a, t, ndim):
    """a[t] reshaped to broadcast against a batch of rank ndim."""
    return a[t].reshape(-1, *([1] * (ndim - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


# ============================================================================ the diffusion


class Diffusion:
    """Schedule constants and the DDPM/DDIM maths. `prediction` is what the network outputs:
    "eps" (Ho et al.), "v" (Salimans & Ho 2022) or "x0"; diffusers' names epsilon / v_prediction /
    sample are accepted too. beta_start/beta_end: the range of a linear or scaled_linear schedule;
    betas: explicit β_1..β_T (diffusers' trained_betas), overriding the schedule. clip_sample:
    clamp the predicted x_0 to ±clip_sample_range while sampling (the default of `sample`).
    variance: the DDPM step's σ_t², fixed_small = β̃_t (Ho et al. Eq. 7) or fixed_large = β_t
    (Ho et al. Sec. 3.2 found both alike)."""

    def __init__(self, T=1000, schedule="linear", prediction="eps", device="cpu", beta_start=None,
                 beta_end=None, clip_sample=True, clip_sample_range=1.0, betas=None,
                 variance="fixed_small"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; use one of "
                             f"{', '.join(PREDICTIONS)}")
        self.T, self.schedule, self.prediction = T, schedule, PREDICTIONS[prediction]
        self.clip_sample, self.clip_sample_range = bool(clip_sample), float(clip_sample_range)
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown variance {variance!r}; use fixed_small or fixed_large")
        self.variance = variance
        b = (beta_schedule(schedule, T, beta_start, beta_end) if betas is None
             else np.asarray(betas, np.float64))
        if b.shape != (T,) or not (np.all(b > 0) and np.all(b < 1)):
            raise ValueError(f"betas must be {T} values in (0, 1)")
        ab = np.cumprod(1.0 - b)
        ab_prev = np.append(1.0, ab[:-1])
        post_var = b * (1.0 - ab_prev) / (1.0 - ab)  # β̃_t, Ho et al. Eq. 7
        consts = dict(
            betas=b, alphas_cumprod=ab, alphas_cumprod_prev=ab_prev,
            sqrt_alphas_cumprod=np.sqrt(ab), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ab),
            posterior_variance=post_var,
            # β̃_1 = 0: use β̃_2
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=b * np.sqrt(ab_prev) / (1.0 - ab),  # Ho et al. Eq. 7: of x_0
            posterior_mean_coef2=(1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab),  # and of x_t
        )
        # exact copies, for tests and sampling
        self.f64 = {k: torch.from_numpy(v) for k, v in consts.items()}
        for k, v in consts.items():  # cast once
            setattr(self, k, torch.tensor(v, dtype=torch.float32, device=device))

    def to(self, device):
        for k in self.f64:
            setattr(self, k, getattr(self, k).to(device))
        return self

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0, t, noise):
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""  # Ho et al. Eq. 4
        return _gather(self.sqrt_alphas_cumprod, t, x0.ndim) * x0 + \
            _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise

    def q_posterior(self, x0, xt, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""  # Ho et al. Eq. 6-7
        mean = (_gather(self.posterior_mean_coef1, t, xt.ndim) * x0
                + _gather(self.posterior_mean_coef2, t, xt.ndim) * xt)
        return (mean, _gather(self.posterior_variance, t, xt.ndim),
                _gather(self.posterior_log_variance_clipped, t, xt.ndim))

    # ---------------------------------------------------------------- network output <-> (ε, x_0)
    def eps_x0(self, out, xt, t, ab=None):
        """(ε, x_0) implied by the network output at x_t; ab = ᾱ_t broadcastable (default:
        schedule)."""
        ab = _gather(self.alphas_cumprod, t, xt.ndim) if ab is None else ab
        if self.prediction == "eps":
            return out, (xt - (1 - ab).sqrt() * out) / ab.sqrt()
        if self.prediction == "x0":
            return (xt - ab.sqrt() * out) / (1 - ab).sqrt(), out
        # v-param.
        return (1 - ab).sqrt() * xt + ab.sqrt() * out, ab.sqrt() * xt - (1 - ab).sqrt() * out

    def loss(self, model, x0, t, noise, y=None):
        """Per-image mean squared error of the prediction target (Ho et al. Eq. 14, or the
        v-target)."""
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, y)
        if self.prediction == "eps":
            target = noise
        elif self.prediction == "x0":
            target = x0
        else:
            target = _gather(self.sqrt_alphas_cumprod, t, x0.ndim) * noise - \
                _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
        return ((out - target) ** 2).flatten(1).mean(1)

    # ---------------------------------------------------------------- sampling
    def timesteps(self, steps, spacing="linspace"):
        """An increasing sub-sequence of {0..T-1} with `steps` entries. linspace (ours): evenly
        spaced from 0 to T-1; leading: 0, k, 2k, ... with k = T // steps; trailing: T-1,
        T-1-T/steps, ... rounded (diffusers' timestep_spacing values of the same names; its
        schedulers default to leading)."""
        assert 1 <= steps <= self.T, steps
        if spacing == "linspace":
            # steps=1 -> [T-1]
            return np.unique(np.round(np.linspace(self.T - 1, 0, steps)).astype(np.int64))
        if spacing == "leading":
            return np.arange(steps, dtype=np.int64) * (self.T // steps)
        if spacing == "trailing":
            return np.round(np.arange(self.T, 0, -self.T / steps)).astype(np.int64)[::-1] - 1
        raise ValueError(f"unknown timestep spacing {spacing!r}; use linspace, leading or trailing")

    @torch.no_grad()
    def sample(self, model, n, generators, steps=50, eta=0.0, sampler="ddim", cond_fn=None, y=None,
               clip_x0=None, callback=None, spacing="linspace"):
        """Draw n images. generators[i] (a CPU torch.Generator) drives all the noise of image i, so
        an image depends only on its own generator, never on its batch. Returns x_0 in [-1, 1].

        sampler "ddim" uses Song et al. Eq. 12 with `eta` (0: deterministic, 1: DDPM-like);
        sampler "ddpm" uses the ancestral step with the true posterior of the (respaced) chain.
        cond_fn(x_t, t) returns s·∇ log p(y | x_t, t); it enters as
        ε̂ = ε - sqrt(1-ᾱ_t) cond_fn.
        callback(i, t, x_t, x0_hat) is called after every step (for tests and trajectories).
        clip_x0 (default: the schedule's clip_sample) clamps x̂_0 to ±clip_sample_range and
        re-derives ε from it; spacing picks the timesteps (see `timesteps`).
        """
        assert len(generators) == n, (len(generators), n)
        shape = (model.channels, model.image_size, model.image_size)
        dev = self.alphas_cumprod.device
        randn = lambda: torch.stack([torch.randn(shape, generator=g)  # noqa: E731
                                     for g in generators]).to(dev)
        x = randn()  # x_T ~ N(0, I)
        seq = self.timesteps(steps, spacing)
        clip_x0 = self.clip_sample if clip_x0 is None else clip_x0
        r = self.clip_sample_range
        ab64 = self.f64["alphas_cumprod"]
        for i in range(len(seq) - 1, -1, -1):
            t = torch.full((n,), int(seq[i]), device=dev, dtype=torch.long)
            ab_t = float(ab64[seq[i]])
            ab_prev = float(ab64[seq[i - 1]]) if i > 0 else 1.0
            eps, x0 = self.eps_x0(model(x, t, y), x, t)
            if cond_fn is not None:
                g = cond_fn(x, t)
                eps = eps - math.sqrt(1 - ab_t) * g  # Dhariwal & Nichol Alg. 2: ε̂
                # = (x_t - sqrt(1-ᾱ_t) ε̂) / sqrt(ᾱ_t); g = 0 changes no bit
                x0 = x0 + (1 - ab_t) / math.sqrt(ab_t) * g
            if clip_x0:
                x0 = x0.clamp(-r, r)
                eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
            if sampler == "ddim":
                # Song et al. Eq. 16
                sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
                # Song et al. Eq. 12
                mean = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
            elif sampler == "ddpm":
                beta = 1 - ab_t / ab_prev  # β of the respaced chain; equals β_t when steps == T
                # Ho et al. Eq. 7, μ̃_t
                mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + \
                    (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x
                sigma = math.sqrt(beta * (1 - ab_prev) / (1 - ab_t))  # Ho et al. Eq. 7, β̃_t
                # Ho et al. Sec. 3.2: σ_t² = β_t
                sigma = math.sqrt(beta) if self.variance == "fixed_large" else sigma
            else:
                raise ValueError(f"unknown sampler {sampler!r}; use ddim or ddpm")
            x = mean + sigma * randn() if i > 0 and sigma > 0 else mean
            if callback is not None:
                callback(i, t, x, x0)
        return x

    # ------------------------------------------------------ the bound on log p_θ at noise level ε
    def top(self):
        """The last step of the chain the bound evaluates: T-1, or T-2 when the schedule clipped
        β_{T-1} at its 0.999 cap (cosine: ᾱ_T = 0 before clipping). There
        ᾱ_{T-1} ≈ 1e-3 ᾱ_{T-2}, and x̂_0 = (x_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ) multiplies
        any error of ε̂ by ~30 (the sampler clamps it): on the smoke model that single term
        measured 50,000 ± 7,600 nats, ~50x all the others together. The chain then starts from
        N(0, I) at step T-2 (ᾱ = 2.4e-4 at T = 100), the model the clamped sampler draws from."""
        return self.T - 2 if float(self.f64["betas"][-1]) >= 0.999 else self.T - 1

    def level(self, eps):
        """(k, ε_k): the step whose noise-to-signal ratio (1-ᾱ_k)/ᾱ_k is nearest ε² (nearest
        in log), and ε_k = sqrt((1-ᾱ_k)/ᾱ_k), the ε at which sqrt(ᾱ_k) x, x ~ q_ε, is
        exactly a forward sample at step k: M is reported at ε_k."""
        ratio = (1.0 - self.f64["alphas_cumprod"]) / self.f64["alphas_cumprod"]
        k = int(torch.argmin((ratio.log() - 2.0 * math.log(eps)).abs()))
        if k >= self.top():
            raise ValueError(f"ε = {eps} matches step {k}, at or past the chain's last step "
                             f"{self.top()}: no chain is left to bound")
        return k, float(ratio[k].sqrt())

    def bound_draw(self, n, k, n_t, shape, generator):
        """Timesteps and forward noise for `subchain_nll`, drawn afresh per sample and stratified:
        the decoder term t = k+1 (the largest, and of another kind) is always evaluated; the terms
        t = k+2..top are cut into n_t - 1 contiguous strata of near-equal size, one t drawn
        uniformly in each, weighted by its stratum's size (an unbiased estimate of the sum; n_t = 1:
        one stratum over all terms). Returns t (n, n_t) long, w (n, n_t) float64, noise (n, n_t,
        *shape) float32."""
        m = self.top() - k  # terms t = k+1 .. top
        n_t = max(1, min(int(n_t), m))
        if n_t == 1:
            edges = torch.tensor([k + 1, self.top() + 1])
        else:  # {k+1}, then n_t - 1 near-equal strata of k+2..top
            inner = k + 2 + torch.div(torch.arange(n_t) * (m - 1), n_t - 1, rounding_mode="floor")
            edges = torch.cat([torch.tensor([k + 1]), inner])
        size = (edges[1:] - edges[:-1]).double()
        u = torch.rand((n, n_t), generator=generator, dtype=torch.float64)
        t = edges[:-1] + (u * size).floor().long()
        noise = torch.randn((n, n_t) + tuple(shape), generator=generator)
        return t, size.expand(n, n_t).clone(), noise

    def prior_kl(self, z, k):
        """L_T of the sub-chain: KL(q(z_top | z_k) || N(0, I)) per sample, nats, float64 (see
        `top`)."""
        a = float(self.f64["alphas_cumprod"][self.top()] / self.f64["alphas_cumprod"][k])
        mean = math.sqrt(a) * z.double()
        return normal_kl(mean, torch.tensor(math.log(1.0 - a), dtype=torch.float64),
                         torch.zeros((), dtype=torch.float64),
                         torch.zeros((), dtype=torch.float64)).flatten(1).sum(1)

    def _subchain_term(self, model, zk, k, t, noise, y):
        """One term of the sub-chain bound per row (float64 nats): the KL (A) of subchain_nll's
        bound for t > k+1, the decoder -log p_θ(z_k | z_{k+1}) for t = k+1. zk float64, t long
        (n,), noise (n, ...)."""
        f = {name: v.to(zk.device) for name, v in self.f64.items()}
        g = lambda a: a[t].reshape(-1, *([1] * (zk.ndim - 1)))  # noqa: E731
        ab_k = f["alphas_cumprod"][k]
        a_t, a_prev, beta = (g(f["alphas_cumprod"]) / ab_k, g(f["alphas_cumprod_prev"]) / ab_k,
                             g(f["betas"]))
        # Ho et al. Eq. 4 on the sub-chain, ᾱ'_t = ᾱ_t / ᾱ_k
        zt = a_t.sqrt() * zk + (1 - a_t).sqrt() * noise.double()
        _, x0_hat = self.eps_x0(model(zt.float(), t, y), zt.float(), t)
        # Ho et al. Eq. 6-7, μ̃_t(x̂_0, z_t)
        mean_p = g(f["posterior_mean_coef1"]) * x0_hat.double() + g(f["posterior_mean_coef2"]) * zt
        # β̃_t, Ho et al. Eq. 7: the model's own reverse variance
        var_p = g(f["posterior_variance"])
        # Ho et al. Eq. 7 on the sub-chain
        mean_q = (beta * a_prev.sqrt() * zk + (1 - beta).sqrt() * (1 - a_prev) * zt) / (1 - a_t)
        var_q = beta * (1 - a_prev) / (1 - a_t)
        kl = 0.5 * ((var_p / var_q.clamp(min=1e-300)).log() + var_q / var_p - 1
                    + (mean_q - mean_p) ** 2 / var_p)
        dec = 0.5 * ((2 * math.pi * var_p).log() + (zk - mean_p) ** 2 / var_p)
        is_decoder = t.reshape(-1, *([1] * (zk.ndim - 1))) == k + 1
        return torch.where(is_decoder, dec, kl).flatten(1).sum(1)

    @torch.no_grad()
    def subchain_nll(self, model, x, k, draw, y=None, batch=512):
        """An upper bound on -log p_θ(x) per sample (nats, float64) for x of q_ε at ε = ε_k,
        where p_θ(x) is the density of x = z_k / sqrt(ᾱ_k) when z_k is drawn by the model's
        ancestral chain down to step k.

        A sample x of q_ε(x) = (1/N) Σ_i N(x | x_i, ε² I) (SIDE Definition 1) scaled by
        sqrt(ᾱ_k) is exactly a sample of the forward marginal at step k when
        (1-ᾱ_k)/ᾱ_k = ε² (Ho et al. Eq. 4):
            z_k = sqrt(ᾱ_k) x = sqrt(ᾱ_k) x_i + sqrt(1-ᾱ_k) ε',  ε' ~ N(0, I)
        so the model's distribution of x is p_θ(x) = ᾱ_k^{d/2} p_θ(z_k), and z_k is the data of
        the sub-chain z_k -> z_{k+1} -> ... -> z_top, a diffusion with ᾱ'_t = ᾱ_t / ᾱ_k
        (top = T-1, or T-2 for a clipped schedule, see `top`). Its variational bound (Ho et al.
        Eq. 5, read from step k instead of 0) is
            -log p_θ(x) <= KL(q(z_top|z_k) || N(0,I))                                        L_T
                + Σ_{t=k+2}^{top} E_q KL(q(z_{t-1}|z_t, z_k) || p_θ(z_{t-1}|z_t))            (A)
                + E_q[-log p_θ(z_k | z_{k+1})] - (d/2) log ᾱ_k,                decoder, Jacobian
        with q(z_{t-1}|z_t, z_k) = N((β_t sqrt(ᾱ'_{t-1}) z_k + sqrt(1-β_t)(1-ᾱ'_{t-1}) z_t) /
        (1-ᾱ'_t), β_t (1-ᾱ'_{t-1}) / (1-ᾱ'_t) I) (Ho et al. Eq. 6-7 with ᾱ'), and
        p_θ(z_{t-1}|z_t) = N(μ̃_t(x̂_0, z_t), β̃_t I), the model's own ancestral step
        (Ho et al. Eq. 6-7 with its prediction x̂_0, no clamping). The decoder is this same
        Gaussian at step k+1 (variance β̃_{k+1}, not β_1). The gap of the bound is
        E KL(q(z_{k+1:top}|z_k) || p_θ(z_{k+1:top}|z_k)) >= 0; nothing below step k enters, so
        the model is not charged for reproducing the ε-noise. The top-k terms are estimated from
        `draw` (see bound_draw)."""
        t, w, noise = draw
        n, n_t = t.shape
        assert x.shape[0] == n and noise.shape[2:] == x.shape[1:], (x.shape, t.shape, noise.shape)
        ab_k = float(self.f64["alphas_cumprod"][k])
        zk = math.sqrt(ab_k) * x.double()
        rows = torch.arange(n, device=x.device).repeat_interleave(n_t)
        tt, nn_ = t.reshape(-1).to(x.device), noise.reshape(n * n_t, *x.shape[1:]).to(x.device)
        y_of = lambda s: None if y is None else y[rows[s:s + batch]]  # noqa: E731
        terms = torch.cat([self._subchain_term(model, zk[rows[s:s + batch]], k, tt[s:s + batch],
                                               nn_[s:s + batch], y_of(s))
                           for s in range(0, n * n_t, batch)])
        total = self.prior_kl(zk, k) + (terms.reshape(n, n_t) * w.to(x.device)).sum(1)
        return total - 0.5 * x[0].numel() * math.log(ab_k)  # change of variables x -> z_k


def sample_generators(seed, indices):
    """One CPU torch.Generator per generation index, seeded from (seed, index) alone, so image i can
    be regenerated by itself from its recorded seed and index whatever batch or process made it."""
    def state(i):
        return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0])
    return [torch.Generator().manual_seed(state(i)) for i in indices]
