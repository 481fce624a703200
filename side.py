"""SIDE Alg. 1 whole: Surrogate condItional Data Extraction (Chen et al., AAAI 2026).

    s = side.Settings(n_syn=1024, K=16, lam=3.0)
    x, info = side.extract(model, diffusion, s, n=512, seed=1)  # 512 guided generations

`extract` reads as SIDE Alg. 1 (the paper's Algorithm 1), one line per step; its steps are below:
  - extract_features  step 2: Z = F(x) from the DDPM's own mid-block activations (default,
                      nothing to download), raw pixels, or any TorchScript embedding file (SSCD);
  - kmeans            step 3: k-means++ initialisation, exact Lloyd iterations, restarts;
  - cluster_cohesion  step 4: mean cosine similarity of the members to their centroid;
  - surrogate_labels  steps 3-5: keep clusters with cohesion >= τ, label the images;
  - TimeResNet        step 6: p_φ(y | x_t, t), a compact ResNet with ONE time module (FiLM) right
                      after the first BatchNorm (the paper's "refinement block");
                      time_dependent=False is the ordinary classifier of the "Carlini Cond"
                      baseline;
  - train_classifier  step 6: cross-entropy on forward-noised images x_t = q_sample(x, t, ε);
  - guidance          Part 2, classifier guidance:
                      cond_fn(x_t, t) = λ ∇_{x_t} log p_φ(c | x_t, t), which
                      ddpm.Diffusion.sample turns into ε̂ = ε_θ − sqrt(1−ᾱ_t) cond_fn
                      (Dhariwal & Nichol 2021, Sec. 4 and Alg. 2).

Images are float tensors in [-1, 1], NCHW; timesteps are the DDPM's 0-based indices {0..T-1} as long
tensors. Bad input or settings raise SideError (a ValueError) naming the problem and the fix.
Caching, sharding and I/O are the caller's: `extract` takes hooks for them (extract.py's cache wraps
each step from outside). Depends on torch, numpy and ddpm.py only: it runs from a folder that holds
just these two files.
"""
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm

FEATURE_NOISE_SEED = 1234  # the one fixed ε of the "ddpm" features: Z depends on the image alone
FEATURE_POOL = 2  # the "ddpm" features add a 2×2 average-pooled grid to the global average: layout
EVAL_BATCH = 256  # images per forward pass when only evaluating (memory, not maths)
TIME_EMB_DIM = 64  # sinusoidal time-embedding width of the classifier's time module
T_REF = 1000  # timesteps are put on a 1000-step clock before embedding: any T, same frequencies
HOLDOUT = 0.1  # share of the synthetic images held out to report the classifier's accuracy


class SideError(ValueError):
    """Bad input or settings (a wrong shape, an option out of range, no cluster passing τ, a
    diverging classifier); the message names the problem and the fix."""


def _check(cond, message):
    if not cond:
        raise SideError(message)


# ========================================================================== SIDE Alg. 1, end to end


@dataclass
class Settings:
    """The settings SIDE Alg. 1 reads (extract.py's flags of the same names and defaults)."""
    n_syn: int = 1024  # N_syn, unconditional samples that are clustered (step 1)
    syn_seed: int = 12345  # seed of the synthetic set, the clustering and the classifier
    features: str = "ddpm"  # F of step 2: ddpm, pixels or a TorchScript embedding file
    K: int = 16  # k-means clusters (step 3; the paper: 100 for 50k samples)
    tau: float = 0.5  # cohesion threshold τ (step 4; the paper: 0.5)
    # step 5: drop the images of rejected clusters instead of relabelling
    drop_rejected: bool = False
    clf_steps: int = 600  # step 6: classifier training steps
    clf_lr: float = 1e-3  # step 6: AdamW lr (the paper's 1e-4 trains far too slowly at CPU sizes)
    clf_width: int = 32  # step 6: the classifier ResNet's base width
    lam: float = 3.0  # guidance scale λ of Part 2 (SIDE sweeps 0-50)
    # How every sampling step samples (ddpm.Diffusion.sample's sampler, steps and η), plus whatever
    # else the caller's `sample` hook reads: all of it enters the settings of every later step.
    sampling: dict = field(default_factory=lambda: dict(sampler="ddim", sample_steps=50, eta=1.0))


def no_memo(stage, settings, make):
    """The default `memo` hook of extract: no caching, every step computed."""
    return make()


def extract(model, diffusion, s, n, seed, memo=no_memo, sample=None, relabel=None, preprocess=None,
            device=None, log=print, progress=None):
    """SIDE Alg. 1: n generations guided toward the DDPM's training data, which it never reads.

    model, diffusion: the trained unconditional DDPM ε_θ (ddpm.UNet-like, ddpm.Diffusion); s:
    Settings.
    memo(stage, settings, make): make()'s result, or a stored one made with the same `settings` (a
      dict of everything the step depends on, earlier steps' settings nested); no_memo: no caching.
    sample(stage, settings, guide=None, targets=None): the settings["n"] images of settings["seed"],
      image i from ddpm.sample_generators(seed, [i]), guide(targets of a batch) as their cond_fn
      (default: sampler(model, diffusion)); step 1's as float (N, C, H, W) in [-1, 1], Part 2's are
      returned as they come.
    relabel: None, or (name, fn): a control that trains the classifier on fn(surrogate labels)
      instead (extract.py's side_random: a seeded permutation); name enters its settings.
    preprocess: a TorchScript feature file's input transform (extract_features).
    Returns (generations, info: each one's cluster c, λ, K, kept clusters, sizes, cohesion)."""
    device = device or next(model.parameters()).device
    sample = sample or sampler(model, diffusion)
    syn = dict(s.sampling, n=s.n_syn, seed=s.syn_seed)
    x_syn = sample("syn", syn)                                              # SIDE Alg. 1, step 1
    s_z = dict(features=s.features, syn=syn)
    Z = memo("features", s_z, lambda: extract_features(                     # SIDE Alg. 1, step 2
        x_syn, s.features, model, diffusion, device=device, preprocess=preprocess))
    lab = surrogate_labels(Z, s.K, tau=s.tau, drop_rejected=s.drop_rejected,
                           seed=s.syn_seed)                                 # SIDE Alg. 1, steps 3-5
    y = relabel[1](lab.labels) if relabel else lab.labels
    s_c = dict(tau=s.tau, drop_rejected=s.drop_rejected, clf_steps=s.clf_steps, clf_lr=s.clf_lr,
               clf_width=s.clf_width, syn_seed=s.syn_seed, K=s.K,
               random=relabel[0] if relabel else False, z=s_z)
    clf = memo("clf-side", s_c, lambda: fit_classifier(                     # SIDE Alg. 1, step 6
        x_syn, y, diffusion, s, device, HOLDOUT, log, progress))
    clf = classifier_from(clf, lab.num_classes, x_syn, s.clf_width, diffusion.T, device)
    c = uniform_targets(n, seed, lab.num_classes)              # SIDE Alg. 1, Part 2: a cluster each
    s_g = dict(s.sampling, n=n, seed=seed, lam=s.lam, clf=s_c)
    x = sample("gen-side", s_g, lambda c_batch: guidance(clf, c_batch, s.lam), c)  # Part 2: ε̂
    return x, dict(cluster=c, scale=s.lam, K=s.K, kept=lab.num_classes, sizes=lab.sizes,
                   cohesion=lab.cohesion)


def sampler(model, diffusion, batch=EVAL_BATCH):
    """extract's default `sample` hook: the images in batches of `batch`, float on CPU, uncached."""
    def sample(stage, s, guide=None, targets=None):
        out, dev = [], diffusion.alphas_cumprod.device
        for a in range(0, s["n"], batch):
            idx = range(a, min(s["n"], a + batch))
            cond_fn = None
            if guide is not None:
                cond_fn = guide(torch.as_tensor(targets[idx.start:idx.stop], device=dev))
            out.append(diffusion.sample(model, len(idx), ddpm.sample_generators(s["seed"], idx),
                                        steps=s["sample_steps"], eta=s["eta"], sampler=s["sampler"],
                                        cond_fn=cond_fn).cpu())
        return torch.cat(out)
    return sample


def uniform_targets(n, seed, k):
    """The class each generation is guided to (SIDE Alg. 1, Part 2): uniform over k, from
    (seed, index) alone."""
    return np.array([np.random.default_rng([seed, i, 2]).integers(k) for i in range(n)],
                    dtype=np.int64)


def fit_classifier(x, labels, diffusion, s, device, holdout, log=print, progress=None):
    """train_classifier with s's settings, as plain data (a memo hook can store it): the weights on
    CPU and the training report. diffusion None: the time-independent classifier of Carlini Cond."""
    clf, report = train_classifier(x, labels, diffusion, steps=s.clf_steps, lr=s.clf_lr,
                                   seed=s.syn_seed, device=device, width=s.clf_width,
                                   holdout=holdout, log=log, progress=progress)
    return dict(state={k: v.cpu() for k, v in clf.state_dict().items()}, report=report)


def classifier_from(stored, num_classes, x, width, T=None, device="cpu"):
    """The frozen classifier (eval mode) of fit_classifier's `stored` weights, for images like x;
    T None: time-independent. Weights that do not fit that network raise SideError."""
    clf = TimeResNet(num_classes, x.shape[-1], x.shape[1], width=width,
                     time_dependent=T is not None, T=T or T_REF)
    try:
        clf.load_state_dict(stored["state"])
    except (RuntimeError, TypeError, KeyError) as e:
        raise SideError(f"the stored classifier does not fit a {num_classes}-class TimeResNet "
                        f"({str(e).splitlines()[0][:120]}); delete the stored result and "
                        "rerun") from None
    return clf.to(device).eval().requires_grad_(False)


# ==================================================================== SIDE Alg. 1, step 2: features


@torch.no_grad()
def extract_features(x, kind="ddpm", model=None, diffusion=None, t_feat=None, batch=256,
                     device=None, preprocess=None):
    """Z = F(x) of SIDE Alg. 1, step 2: (N, D) float32 on CPU.

    kind="ddpm":   the UNet's mid-block activations at timestep t_feat (default T//50: a little
                   noise, as the network saw in training, but the image still dominates) on
                   x_t = q_sample(x, t_feat, ε) with one ε shared by all images and fixed by
                   FEATURE_NOISE_SEED (differences in Z are differences of the images; Z does not
                   depend on N or batch); features = [global average (C), 2×2 average grid (4C)] of
                   the (N, C, h, w) activations, so D = 5C.
    kind="pixels": the flattened pixels.
    otherwise:     a path to a TorchScript embedding (e.g. SSCD's sscd_disc_mixup.torchscript.pt)
                   run on preprocess(images mapped to [0, 1]) (None: the [0, 1] images as they are;
                   extract.py passes metrics.sscd_preprocess, SSCD's resize and normalisation).
    """
    _check(x.ndim == 4, f"features: expected images (N, C, H, W), got shape {tuple(x.shape)}")
    _check(batch >= 1, f"features: batch must be >= 1, got {batch}")
    if kind == "pixels":
        return x.detach().float().flatten(1).cpu()
    if kind == "ddpm":
        _check(model is not None and diffusion is not None,
               "features kind 'ddpm' needs the DDPM model and diffusion")
        t_feat = diffusion.T // 50 if t_feat is None else int(t_feat)
        _check(0 <= t_feat < diffusion.T,
               f"features: t_feat={t_feat} is outside 0..{diffusion.T - 1}")
        device = device or next(model.parameters()).device
        ddev = diffusion.alphas_cumprod.device
        noise = torch.randn((1, *x.shape[1:]),
                            generator=torch.Generator().manual_seed(FEATURE_NOISE_SEED))
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(x), batch):
            t = torch.full((len(x[i:i + batch]),), t_feat, dtype=torch.long, device=ddev)
            xt = diffusion.q_sample(x[i:i + batch].float().to(ddev), t,
                                    noise.to(ddev).expand(len(t), -1, -1, -1))
            h = model(xt.to(device), t.to(device), return_mid=True)  # SIDE Alg. 1, step 2: Z = F(x)
            out.append(torch.cat([h.mean((2, 3)),
                                  F.adaptive_avg_pool2d(h, FEATURE_POOL).flatten(1)],
                                 1).float().cpu())
        model.train(was_training)
        return torch.cat(out)
    if not os.path.isfile(str(kind)):
        raise SideError(f"features: {kind!r} is neither 'ddpm', 'pixels' nor an existing "
                        "TorchScript embedding file; pass one of those (nothing is downloaded)")
    device = device or "cpu"
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream but is SSCD's format
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(kind), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise SideError(f"features: {kind} is not a TorchScript file "
                        f"({str(e).splitlines()[0].split('. ')[0]})") from None
    out = []
    for i in range(0, len(x), batch):
        xb = (x[i:i + batch].float().to(device) + 1) / 2  # [-1, 1] -> [0, 1]
        z = net(xb if preprocess is None else preprocess(xb))
        out.append((z[0] if isinstance(z, (tuple, list)) else z).float().flatten(1).cpu())
    return torch.cat(out)


# ================================================================= SIDE Alg. 1, steps 3-5: clusters


def _sqdist(Z, C):
    """Squared Euclidean distances (N, K), clamped at 0 against rounding."""
    return ((Z * Z).sum(1, keepdim=True) - 2 * Z @ C.T + (C * C).sum(1)[None]).clamp_min(0)


def _kmeanspp(Z, K, gen):
    """k-means++ seeding (Arthur & Vassilvitskii 2007): next centre drawn with probability ∝
    D(z)²."""
    idx = [int(torch.randint(len(Z), (1,), generator=gen))]
    d2 = _sqdist(Z, Z[idx]).squeeze(1)
    for _ in range(1, K):
        w = d2.double().cpu()
        w = w if w.sum() > 0 else torch.ones_like(w)  # fewer distinct points than K: draw uniformly
        idx.append(int(torch.multinomial(w, 1, generator=gen)))
        d2 = torch.minimum(d2, _sqdist(Z, Z[idx[-1:]]).squeeze(1))
    return Z[idx].clone()


def _lloyd(Z, C, iters):
    """Exact Lloyd iterations until the assignment stops changing; an empty cluster is re-seeded
    with the point farthest from its centroid (each such point used once)."""
    assign = _sqdist(Z, C).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=len(C))
        C = torch.zeros_like(C).index_add_(0, assign, Z) / counts.clamp_min(1)[:, None].to(Z.dtype)
        if (counts == 0).any():
            far = ((Z - C[assign]) ** 2).sum(1)
            for k in torch.nonzero(counts == 0).flatten().tolist():
                j = int(far.argmax())
                C[k], far[j] = Z[j], -1.0
        new = _sqdist(Z, C).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return C, assign


def kmeans(Z, K, n_init=4, iters=100, seed=0):
    """K-means (SIDE Alg. 1, step 3) on the rows of Z (N, D), on Z's device.

    n_init restarts from k-means++ seeds drawn from one CPU torch.Generator(seed); the lowest
    inertia (sum of squared distances to the assigned centroid) wins. Returns (centroids (K, D),
    assign (N,), inertia).
    """
    _check(Z.ndim == 2, f"kmeans: expected features (N, D), got shape {tuple(Z.shape)}")
    _check(1 <= K <= len(Z), f"kmeans: K={K} clusters asked for {len(Z)} points; need 1 <= K <= N")
    _check(n_init >= 1 and iters >= 1, f"kmeans: n_init={n_init} and iters={iters} must be >= 1")
    _check(bool(torch.isfinite(Z).all()), "kmeans: the features contain NaN or inf")
    Z = Z.float()
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(n_init):
        C, assign = _lloyd(Z, _kmeanspp(Z, K, gen), iters)  # SIDE Alg. 1, step 3
        inertia = float(((Z - C[assign]).double() ** 2).sum())
        if best is None or inertia < best[2]:
            best = (C, assign, inertia)
    return best


def cluster_cohesion(Z, assign, centroids):
    """Cohesion (SIDE Alg. 1, step 4): (K,) mean cosine similarity of each cluster's members to its
    centroid; 0 for an empty cluster."""
    K = len(centroids)
    cos = F.cosine_similarity(Z.float(), centroids.float()[assign], dim=1)  # SIDE Alg. 1, step 4
    total = torch.zeros(K, device=Z.device).index_add_(0, assign, cos)
    return total / torch.bincount(assign, minlength=K).clamp_min(1).float()


@dataclass
class SurrogateLabels:
    labels: torch.Tensor  # (N,) long: new label 0..num_classes-1, or -1 (dropped: drop_rejected)
    kept: list  # original cluster ids of the kept clusters, in new-label order
    sizes: list  # members per original cluster (all K)
    cohesion: list  # cohesion per original cluster (all K)
    num_classes: int  # = len(kept)
    centroids: torch.Tensor  # (num_classes, D) kept centroids (of the L2-normalised features)


def surrogate_labels(Z, K, tau=0.5, drop_rejected=False, seed=0, n_init=4):
    """The surrogate condition of SIDE Alg. 1, steps 3-5: cluster, filter by cohesion, label.

    Features are L2-normalised first (cosine geometry, as SSCD embeddings are). Every image is
    labelled with its nearest kept centroid in that normalised space (the paper's reading; a member
    of a kept cluster keeps its own cluster), or, with drop_rejected, images of rejected clusters
    get label -1.
    """
    _check(0.0 <= tau <= 1.0,
           f"surrogate labels: tau={tau} must lie in [0, 1] (a cosine-similarity "
           "threshold)")
    _check(2 <= K <= len(Z),
           f"surrogate labels: K={K} clusters for {len(Z)} images; need 2 <= K <= N")
    Zn = F.normalize(Z.float(), dim=1)
    C, assign, _ = kmeans(Zn, K, n_init=n_init, seed=seed)  # SIDE Alg. 1, step 3
    coh = cluster_cohesion(Zn, assign, C).cpu()  # SIDE Alg. 1, step 4
    sizes = torch.bincount(assign, minlength=K).cpu()
    # SIDE Alg. 1, step 4: cohesion >= τ
    kept = [k for k in range(K) if coh[k] >= tau and sizes[k] > 0]
    if not kept:
        raise SideError(f"surrogate labels: no cluster reaches cohesion tau={tau} (best seen "
                        f"{float(coh.max()):.3f} of {K}); use a lower --tau, more clusters, or "
                        "other features")
    if drop_rejected:
        new_id = torch.full((K,), -1, dtype=torch.long)
        new_id[kept] = torch.arange(len(kept))
        labels = new_id[assign.cpu()]
    else:
        labels = _sqdist(Zn, C[kept]).argmin(1).cpu()  # SIDE Alg. 1, step 5: nearest kept centroid
    return SurrogateLabels(labels=labels, kept=kept, sizes=sizes.tolist(), cohesion=coh.tolist(),
                           num_classes=len(kept), centroids=C[kept].cpu())


# ============================================================ SIDE Alg. 1, step 6: p_φ(y | x_t, t)


class TimeFiLM(nn.Module):
    """The time module: sinusoidal embedding of t -> MLP -> per-channel (scale, shift) applied to
    the BN output as h (1 + scale) + shift (FiLM, Perez et al. 2018). The last layer starts at zero,
    so at initialisation the module is the identity and the network an ordinary ResNet."""

    def __init__(self, channels, T):
        super().__init__()
        self.T = T
        hidden = 4 * channels  # 4× widening, as the UNet's time MLP (Ho et al. 2020)
        self.mlp = nn.Sequential(nn.Linear(TIME_EMB_DIM, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, h, t):
        emb = ddpm.timestep_embedding(t.float() * (T_REF / self.T), TIME_EMB_DIM).to(h.dtype)
        scale, shift = self.mlp(emb).chunk(2, dim=1)
        return h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, ReLU (He et al. 2016, ResNet18/34 block)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TimeResNet(nn.Module):
    """p_φ(y | x_t, t): stem conv -> bn1 -> time_module -> ReLU -> residual stages -> global
    pool -> linear. Stage i has width·2^i channels and `blocks[i]` BasicBlocks, stride 2 from the
    second stage on (the paper's ResNet34 is blocks=(3, 4, 6, 3) at 128 px). time_dependent=False:
    no time module, t ignored."""

    def __init__(self, num_classes, image_size=16, channels=3, width=32, blocks=(1, 1, 1),
                 time_dependent=True, T=1000):
        super().__init__()
        self.config = dict(num_classes=num_classes, image_size=image_size, channels=channels,
                           width=width, blocks=tuple(blocks), time_dependent=time_dependent,
                           T=T)  # enough to rebuild it
        self.image_size, self.channels, self.T = image_size, channels, T
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.time_module = TimeFiLM(width, T) if time_dependent else None  # the "refinement block"
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stages += [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1)
                       for j in range(n)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x, t=None):
        assert x.shape[1:] == (self.channels, self.image_size, self.image_size), x.shape
        h = self.bn1(self.conv1(x))
        if self.time_module is not None:
            h = self.time_module(h, t)  # right after the first BatchNorm (SIDE Alg. 1, step 6)
        h = self.layers(F.relu(h))
        return self.fc(h.mean((2, 3)))


def _accuracy(model, x, y, t_value, diffusion, seed, device):
    """Accuracy of argmax p_φ(y | x_t, t) with t = t_value for every image and noise fixed by
    seed."""
    gen, hits = torch.Generator().manual_seed(seed), 0
    for i in range(0, len(x), EVAL_BATCH):
        xb = x[i:i + EVAL_BATCH]
        t = torch.full((len(xb),), t_value, dtype=torch.long)
        if diffusion is not None:
            xb = _noised(diffusion, xb, t, torch.randn(xb.shape, generator=gen))
        predicted = model(xb.to(device), t.to(device)).argmax(1).cpu()
        hits += int((predicted == y[i:i + EVAL_BATCH]).sum())
    return hits / max(len(x), 1)


def _noised(diffusion, x, t, noise):
    """q_sample on the diffusion's device, returned on CPU."""  # Ho et al. Eq. 4
    dev = diffusion.alphas_cumprod.device
    return diffusion.q_sample(x.to(dev), t.to(dev), noise.to(dev)).cpu()


def train_classifier(x, labels, diffusion=None, steps=500, batch=64, lr=1e-3, weight_decay=0.01,
                     seed=0, device=None, width=32, holdout=0.1, log=print, progress=None):
    """Fit p_φ(y | x_t, t) of SIDE Alg. 1, step 6 by cross-entropy.

    With `diffusion`, each example is x_t = q_sample(x, t, ε), t uniform over {0..T-1}
    (time-dependent, SIDE); without, clean x (time-independent, the "Carlini Cond" baseline). Labels
    -1 are excluded. AdamW; the paper's lr is 1e-4, but at our CPU-sized step counts 1e-4 trains far
    too slowly, hence 1e-3. weight_decay 0.01 is AdamW's usual default (the paper gives none). No
    augmentation: the classifier should learn the DDPM's own clusters. log(line): the summary line
    (None: silent); progress(done, total, extra): called after every step. Returns (model in eval
    mode, frozen; report dict) with train_acc (training split at t = 0), heldout_acc_by_t {t: acc}
    at t in {0, T/10, T/4, T/2, 3T/4} (only {0: clean accuracy} without diffusion; {} if holdout =
    0), both at fixed noise (seed + 1), n_train, n_holdout, num_classes, steps, seconds. Labels must
    be 0..C-1 (C = max + 1).
    """
    _check(x.ndim == 4 and labels.shape == (len(x),), f"classifier: x {tuple(x.shape)} and labels "
           f"{tuple(labels.shape)} must be (N, C, H, W) and (N,)")
    _check(steps >= 1 and batch >= 2,
           f"classifier: steps={steps} must be >= 1 and batch={batch} >= 2 "
           "(BatchNorm)")
    _check(0.0 <= holdout < 1.0, f"classifier: holdout={holdout} must lie in [0, 1)")
    t0, device = time.time(), torch.device(device or x.device)
    x, y, num_classes, gen, tr, ho = _labelled_split(x, labels, holdout, seed)
    T = diffusion.T if diffusion is not None else T_REF
    with torch.random.fork_rng(devices=[]):  # initialisation from `seed`, the global RNG untouched
        torch.manual_seed(int(seed))
        model = TimeResNet(num_classes, x.shape[-1], x.shape[1], width,
                           time_dependent=diffusion is not None, T=T).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for step in range(steps):
        idx = tr[torch.randint(len(tr), (batch,), generator=gen)]
        xb, t = x[idx], torch.randint(T, (batch,), generator=gen)
        if diffusion is not None:
            xb = _noised(diffusion, xb, t,
                         torch.randn(xb.shape, generator=gen))  # Ho et al. Eq. 4: x_t
        loss = F.cross_entropy(model(xb.to(device), t.to(device)),
                               y[idx].to(device))  # SIDE Alg. 1, step 6
        if not torch.isfinite(loss):
            raise SideError(f"classifier training: loss is {loss.item()} at step {step}; lower "
                            "--lr or check the images")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, steps, f"loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    train_acc, heldout_acc_by_t = _accuracies(model, x, y, tr, ho, diffusion, T, seed, device)
    report = dict(train_acc=train_acc, heldout_acc_by_t=heldout_acc_by_t, n_train=len(tr),
                  n_holdout=len(ho), num_classes=num_classes, steps=steps,
                  seconds=time.time() - t0)
    if log is not None:
        log(f"[classifier] {num_classes} classes, train acc {report['train_acc']:.3f}, held-out "
            "acc by t "
            + " ".join(f"{t}:{a:.3f}" for t, a in report["heldout_acc_by_t"].items()))
    return model, report


def _labelled_split(x, labels, holdout, seed):
    """train_classifier's data: the labelled images (labels -1 dropped; on CPU, float / long), the
    number of classes, the generator of the whole run (seeded by `seed`; its first draw is this
    split) and the indices of the training and held-out images."""
    keep = labels >= 0
    x, y = x[keep].detach().float().cpu(), labels[keep].long().cpu()
    num_classes = int(y.max()) + 1 if len(y) else 0
    _check(num_classes >= 2, f"classifier: need images of at least 2 classes, got {num_classes}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(x), generator=gen)
    n_hold = int(round(holdout * len(x)))
    _check(len(x) - n_hold >= 2,
           f"classifier: only {len(x) - n_hold} training images after the held-out "
           "split")
    return x, y, num_classes, gen, perm[n_hold:], perm[:n_hold]


def _accuracies(model, x, y, tr, ho, diffusion, T, seed, device):
    """train_classifier's accuracies of the trained `model` (in eval mode), at fixed noise (seed +
    1): (on the training split at t = 0, {t: on the held-out split} at t in {0, T/10, T/4, T/2,
    3T/4} with `diffusion`, else {0: clean}; {} without a held-out split)."""
    eval_ts = sorted({0, T // 10, T // 4, T // 2, 3 * T // 4}) if diffusion is not None else [0]
    train_acc = _accuracy(model, x[tr], y[tr], 0, diffusion, seed + 1, device)
    heldout_acc_by_t = {t: _accuracy(model, x[ho], y[ho], t, diffusion, seed + 1, device)
                        for t in eval_ts} if len(ho) else {}
    return train_acc, heldout_acc_by_t


# ==================================================================== SIDE Alg. 1, Part 2: guidance


def guidance(classifier, target, scale):
    """cond_fn(x_t, t) = scale · ∇_{x_t} log p_φ(target_i | x_t_i, t_i) per sample, for
    ddpm.Diffusion.sample.

    With BatchNorm in eval mode the samples of a batch do not interact, so the gradient of the
    summed log-probability is the per-sample gradient. scale == 0 returns exact zeros (unguided
    sampling)."""
    def cond_fn(x, t):
        if scale == 0:
            return torch.zeros_like(x)
        if any(m.training for m in classifier.modules()):
            raise RuntimeError("guidance: the classifier is in training mode; call .eval() "
                               "(BatchNorm would mix samples)")
        y = torch.as_tensor(target, dtype=torch.long, device=x.device).expand(len(x))
        with torch.enable_grad():
            xt = x.detach().requires_grad_(True)
            logp = F.log_softmax(classifier(xt, t), dim=1)
            grad = torch.autograd.grad(logp[torch.arange(len(x), device=x.device), y].sum(), xt)[0]
        if not torch.isfinite(grad).all():
            raise SideError("guidance: non-finite classifier gradient at timestep "
                            f"{int(t.flatten()[0])}; lower the guidance scale or retrain the "
                            "classifier")
        return scale * grad  # λ ∇_{x_t} log p_φ(c | x_t, t): SIDE Alg. 1, Part 2
    return cond_fn
