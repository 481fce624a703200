"""SIDE, Surrogate condItional Data Extraction (Chen et al., AAAI 2026; the paper's Algorithm 1).

Part 1 of Algorithm 1 (the surrogate condition) and the guidance function of Part 2:
  - extract_features   Alg. 1, step 2: Z = F(x) from the DDPM's own mid-block activations (default,
                       nothing to download), raw pixels, or any TorchScript embedding file (e.g. SSCD);
  - kmeans             Alg. 1, step 3: k-means++ initialisation, exact Lloyd iterations, restarts;
  - cluster_cohesion   Alg. 1, step 4: mean cosine similarity of the members to their centroid;
  - surrogate_labels   Alg. 1, steps 3-5: keep clusters with cohesion >= τ, label the images;
  - TimeResNet         Alg. 1, step 6: p_φ(y | x_t, t), a compact ResNet with ONE time module (FiLM)
                       right after the first BatchNorm (the paper's "refinement block");
                       time_dependent=False is the ordinary classifier of the "Carlini Cond" baseline;
  - train_classifier   Alg. 1, step 6: cross-entropy on forward-noised images x_t = q_sample(x, t, ε);
  - guidance           Part 2: cond_fn(x_t, t) = λ ∇_{x_t} log p_φ(c | x_t, t), which ddpm.Diffusion.sample
                       turns into ε̂ = ε_θ − sqrt(1−ᾱ_t) cond_fn (Dhariwal & Nichol 2021, Alg. 2).

A library of pure functions and one nn.Module; the pipeline that calls it is extract.py. Images are
float tensors in [-1, 1], NCHW; timesteps are the DDPM's 0-based indices {0..T-1} as long tensors.
Depends on torch, ddpm.py (timestep embedding), common.py (UserError, Progress) and metrics.py (SSCD's
input preprocessing, shared with its embeddings).
"""
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import metrics
from common import Progress, UserError, check
from ddpm import timestep_embedding

FEATURE_NOISE_SEED = 1234  # the one fixed ε of the "ddpm" features: Z depends on the image alone
FEATURE_POOL = 2  # the "ddpm" features add a 2×2 average-pooled grid to the global average: coarse layout
EVAL_BATCH = 256  # images per forward pass when only evaluating (memory, not maths)
TIME_EMB_DIM = 64  # sinusoidal time-embedding width of the classifier's time module
T_REF = 1000  # timesteps are rescaled to a 1000-step clock before embedding, so any T sees the same frequencies


# ============================================================================ Alg. 1, step 2: features


@torch.no_grad()
def extract_features(x, kind="ddpm", model=None, diffusion=None, t_feat=None, batch=256, device=None,
                     embed_size=metrics.EMBED_SIZE, imagenet_norm=True):
    """Z = F(x) of Alg. 1, step 2: (N, D) float32 on CPU.

    kind="ddpm":   the UNet's mid-block activations at timestep t_feat (default T//50: a little noise, as
                   the network saw in training, but the image still dominates) on x_t = q_sample(x, t_feat,
                   ε) with one ε shared by all images and fixed by FEATURE_NOISE_SEED (differences in Z
                   are differences of the images; Z does not depend on N or batch); features = [global
                   average (C), 2×2 average grid (4C)] of the (N, C, h, w) activations, so D = 5C.
    kind="pixels": the flattened pixels.
    otherwise:     a path to a TorchScript embedding (e.g. SSCD's sscd_disc_mixup.torchscript.pt); images are
                   mapped to [0, 1], resized (bilinear, antialiased) to embed_size × embed_size and, with
                   imagenet_norm, normalised by the ImageNet mean/std, as SSCD expects (metrics.sscd_preprocess);
                   grey-scale images are replicated to three channels there, at the embedding's input only.
    """
    check(x.ndim == 4, f"features: expected images (N, C, H, W), got shape {tuple(x.shape)}")
    check(batch >= 1, f"features: batch must be >= 1, got {batch}")
    if kind == "pixels":
        return x.detach().float().flatten(1).cpu()
    if kind == "ddpm":
        check(model is not None and diffusion is not None, "features kind 'ddpm' needs the DDPM model and diffusion")
        t_feat = diffusion.T // 50 if t_feat is None else int(t_feat)
        check(0 <= t_feat < diffusion.T, f"features: t_feat={t_feat} is outside 0..{diffusion.T - 1}")
        device = device or next(model.parameters()).device
        ddev = diffusion.alphas_cumprod.device
        noise = torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(FEATURE_NOISE_SEED))
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(x), batch):
            t = torch.full((len(x[i:i + batch]),), t_feat, dtype=torch.long, device=ddev)
            xt = diffusion.q_sample(x[i:i + batch].float().to(ddev), t, noise.to(ddev).expand(len(t), -1, -1, -1))
            h = model(xt.to(device), t.to(device), return_mid=True)  # Alg. 1, step 2: Z = F(x)
            out.append(torch.cat([h.mean((2, 3)), F.adaptive_avg_pool2d(h, FEATURE_POOL).flatten(1)], 1).float().cpu())
        model.train(was_training)
        return torch.cat(out)
    if not os.path.isfile(str(kind)):
        raise UserError(f"features: {kind!r} is neither 'ddpm', 'pixels' nor an existing TorchScript embedding file; "
                        "pass one of those (nothing is downloaded)")
    device = device or "cpu"
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream but is the format SSCD ships in
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(kind), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise UserError(f"features: {kind} is not a TorchScript file ({str(e).splitlines()[0].split('. ')[0]})") from None
    out = []
    for i in range(0, len(x), batch):
        xb = (x[i:i + batch].float().to(device) + 1) / 2  # [-1, 1] -> [0, 1]
        z = net(metrics.sscd_preprocess(xb, embed_size, normalize=imagenet_norm))
        out.append((z[0] if isinstance(z, (tuple, list)) else z).float().flatten(1).cpu())
    return torch.cat(out)


# ============================================================================ Alg. 1, steps 3-5: clusters


def _sqdist(Z, C):
    """Squared Euclidean distances (N, K), clamped at 0 against rounding."""
    return ((Z * Z).sum(1, keepdim=True) - 2 * Z @ C.T + (C * C).sum(1)[None]).clamp_min(0)


def _kmeanspp(Z, K, gen):
    """k-means++ seeding (Arthur & Vassilvitskii 2007): next centre drawn with probability ∝ D(z)²."""
    idx = [int(torch.randint(len(Z), (1,), generator=gen))]
    d2 = _sqdist(Z, Z[idx]).squeeze(1)
    for _ in range(1, K):
        w = d2.double().cpu()
        w = w if w.sum() > 0 else torch.ones_like(w)  # fewer distinct points than K: draw uniformly
        idx.append(int(torch.multinomial(w, 1, generator=gen)))
        d2 = torch.minimum(d2, _sqdist(Z, Z[idx[-1:]]).squeeze(1))
    return Z[idx].clone()


def _lloyd(Z, C, iters):
    """Exact Lloyd iterations until the assignment stops changing; an empty cluster is re-seeded with the
    point farthest from its centroid (each such point used once)."""
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
    """K-means (Alg. 1, step 3) on the rows of Z (N, D), on Z's device.

    n_init restarts from k-means++ seeds drawn from one CPU torch.Generator(seed); the lowest inertia
    (sum of squared distances to the assigned centroid) wins. Returns (centroids (K, D), assign (N,), inertia).
    """
    check(Z.ndim == 2, f"kmeans: expected features (N, D), got shape {tuple(Z.shape)}")
    check(1 <= K <= len(Z), f"kmeans: K={K} clusters asked for {len(Z)} points; need 1 <= K <= N")
    check(n_init >= 1 and iters >= 1, f"kmeans: n_init={n_init} and iters={iters} must be >= 1")
    check(bool(torch.isfinite(Z).all()), "kmeans: the features contain NaN or inf")
    Z = Z.float()
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(n_init):
        C, assign = _lloyd(Z, _kmeanspp(Z, K, gen), iters)  # Alg. 1, step 3
        inertia = float(((Z - C[assign]).double() ** 2).sum())
        if best is None or inertia < best[2]:
            best = (C, assign, inertia)
    return best


def cluster_cohesion(Z, assign, centroids):
    """Cohesion (Alg. 1, step 4): (K,) mean cosine similarity of each cluster's members to its
    centroid; 0 for an empty cluster."""
    K = len(centroids)
    cos = F.cosine_similarity(Z.float(), centroids.float()[assign], dim=1)  # Alg. 1, step 4
    total = torch.zeros(K, device=Z.device).index_add_(0, assign, cos)
    return total / torch.bincount(assign, minlength=K).clamp_min(1).float()


@dataclass
class SurrogateLabels:
    labels: torch.Tensor  # (N,) long: new label 0..num_classes-1, or -1 (dropped, only with drop_rejected)
    kept: list  # original cluster ids of the kept clusters, in new-label order
    sizes: list  # members per original cluster (all K)
    cohesion: list  # cohesion per original cluster (all K)
    num_classes: int  # = len(kept)
    centroids: torch.Tensor  # (num_classes, D) centroids of the kept clusters (of the L2-normalised features)


def surrogate_labels(Z, K, tau=0.5, drop_rejected=False, seed=0, n_init=4):
    """The surrogate condition of Alg. 1, steps 3-5: cluster, filter by cohesion, label.

    Features are L2-normalised first (cosine geometry, as SSCD embeddings are). Every image is labelled
    with its nearest kept centroid in that normalised space (the paper's reading; a member of a kept
    cluster keeps its own cluster), or, with drop_rejected, images of rejected clusters get label -1.
    """
    check(0.0 <= tau <= 1.0, f"surrogate labels: tau={tau} must lie in [0, 1] (a cosine-similarity threshold)")
    check(2 <= K <= len(Z), f"surrogate labels: K={K} clusters for {len(Z)} images; need 2 <= K <= N")
    Zn = F.normalize(Z.float(), dim=1)
    C, assign, _ = kmeans(Zn, K, n_init=n_init, seed=seed)  # Alg. 1, step 3
    coh = cluster_cohesion(Zn, assign, C).cpu()  # Alg. 1, step 4
    sizes = torch.bincount(assign, minlength=K).cpu()
    kept = [k for k in range(K) if coh[k] >= tau and sizes[k] > 0]  # Alg. 1, step 4: keep if cohesion >= τ
    if not kept:
        raise UserError(f"surrogate labels: no cluster reaches cohesion tau={tau} (best seen {float(coh.max()):.3f} "
                        f"of {K}); use a lower --tau, more clusters, or other features")
    if drop_rejected:
        new_id = torch.full((K,), -1, dtype=torch.long)
        new_id[kept] = torch.arange(len(kept))
        labels = new_id[assign.cpu()]
    else:
        labels = _sqdist(Zn, C[kept]).argmin(1).cpu()  # Alg. 1, step 5: nearest kept centroid
    return SurrogateLabels(labels=labels, kept=kept, sizes=sizes.tolist(), cohesion=coh.tolist(),
                           num_classes=len(kept), centroids=C[kept].cpu())


# ============================================================================ Alg. 1, step 6: p_φ(y | x_t, t)


class TimeFiLM(nn.Module):
    """The time module: sinusoidal embedding of t -> MLP -> per-channel (scale, shift) applied to the BN
    output as h (1 + scale) + shift (FiLM, Perez et al. 2018). The last layer starts at zero, so at
    initialisation the module is the identity and the network an ordinary ResNet."""

    def __init__(self, channels, T):
        super().__init__()
        self.T = T
        hidden = 4 * channels  # 4× widening, as the UNet's time MLP (Ho et al. 2020)
        self.mlp = nn.Sequential(nn.Linear(TIME_EMB_DIM, hidden), nn.SiLU(), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, h, t):
        emb = timestep_embedding(t.float() * (T_REF / self.T), TIME_EMB_DIM).to(h.dtype)
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
    """p_φ(y | x_t, t): stem conv -> bn1 -> time_module -> ReLU -> residual stages -> global pool -> linear.
    Stage i has width·2^i channels and `blocks[i]` BasicBlocks, stride 2 from the second stage on (the
    ResNet34 of the paper is blocks=(3, 4, 6, 3) at 128 px). time_dependent=False: no time module, t ignored."""

    def __init__(self, num_classes, image_size=16, channels=3, width=32, blocks=(1, 1, 1), time_dependent=True, T=1000):
        super().__init__()
        self.config = dict(num_classes=num_classes, image_size=image_size, channels=channels, width=width,
                           blocks=tuple(blocks), time_dependent=time_dependent, T=T)  # enough to rebuild it
        self.image_size, self.channels, self.T = image_size, channels, T
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.time_module = TimeFiLM(width, T) if time_dependent else None  # the paper's refinement block
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stages += [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x, t=None):
        assert x.shape[1:] == (self.channels, self.image_size, self.image_size), x.shape
        h = self.bn1(self.conv1(x))
        if self.time_module is not None:
            h = self.time_module(h, t)  # right after the first BatchNorm (Alg. 1, step 6)
        h = self.layers(F.relu(h))
        return self.fc(h.mean((2, 3)))


def _accuracy(model, x, y, t_value, diffusion, seed, device):
    """Accuracy of argmax p_φ(y | x_t, t) with t = t_value for every image and noise fixed by seed."""
    gen, hits = torch.Generator().manual_seed(seed), 0
    for i in range(0, len(x), EVAL_BATCH):
        xb = x[i:i + EVAL_BATCH]
        t = torch.full((len(xb),), t_value, dtype=torch.long)
        if diffusion is not None:
            xb = _noised(diffusion, xb, t, torch.randn(xb.shape, generator=gen))
        hits += int((model(xb.to(device), t.to(device)).argmax(1).cpu() == y[i:i + EVAL_BATCH]).sum())
    return hits / max(len(x), 1)


def _noised(diffusion, x, t, noise):
    """q_sample on the diffusion's device, returned on CPU."""  # Eq. (4)
    dev = diffusion.alphas_cumprod.device
    return diffusion.q_sample(x.to(dev), t.to(dev), noise.to(dev)).cpu()


def train_classifier(x, labels, diffusion=None, steps=500, batch=64, lr=1e-3, weight_decay=0.01, seed=0, device=None,
                     width=32, holdout=0.1, log=print):
    """Fit p_φ(y | x_t, t) of Alg. 1, step 6 by cross-entropy.

    With `diffusion`, each example is x_t = q_sample(x, t, ε), t uniform over {0..T-1} (time-dependent,
    SIDE); without, clean x (time-independent, the "Carlini Cond" baseline). Labels -1 are excluded.
    AdamW; the paper's lr is 1e-4, but at our CPU-sized step counts 1e-4 trains far too slowly, hence 1e-3.
    weight_decay 0.01 is AdamW's usual default (the paper gives none). No augmentation: the classifier
    should learn the DDPM's own clusters. Returns (model in eval mode, frozen; report dict) with
    train_acc (training split at t = 0), heldout_acc_by_t {t: acc} at t in {0, T/10, T/4, T/2, 3T/4}
    (only {0: clean accuracy} without diffusion; {} if holdout = 0), both at fixed noise (seed + 1),
    n_train, n_holdout, num_classes, steps, seconds. Labels must be 0..C-1 (C = max + 1).
    """
    check(x.ndim == 4 and labels.shape == (len(x),), f"classifier: x {tuple(x.shape)} and labels "
          f"{tuple(labels.shape)} must be (N, C, H, W) and (N,)")
    check(steps >= 1 and batch >= 2, f"classifier: steps={steps} must be >= 1 and batch={batch} >= 2 (BatchNorm)")
    check(0.0 <= holdout < 1.0, f"classifier: holdout={holdout} must lie in [0, 1)")
    t0, device = time.time(), torch.device(device or x.device)
    keep = labels >= 0
    x, y = x[keep].detach().float().cpu(), labels[keep].long().cpu()
    num_classes = int(y.max()) + 1 if len(y) else 0
    check(num_classes >= 2, f"classifier: need images of at least 2 classes, got {num_classes}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(x), generator=gen)
    n_hold = int(round(holdout * len(x)))
    check(len(x) - n_hold >= 2, f"classifier: only {len(x) - n_hold} training images after the held-out split")
    tr, ho = perm[n_hold:], perm[:n_hold]
    T = diffusion.T if diffusion is not None else T_REF
    with torch.random.fork_rng(devices=[]):  # initialisation from `seed` without touching the global RNG
        torch.manual_seed(int(seed))
        model = TimeResNet(num_classes, x.shape[-1], x.shape[1], width, time_dependent=diffusion is not None,
                           T=T).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    prog = Progress("classifier", steps, "step", enabled=log is not None)
    model.train()
    for step in range(steps):
        idx = tr[torch.randint(len(tr), (batch,), generator=gen)]
        xb, t = x[idx], torch.randint(T, (batch,), generator=gen)
        if diffusion is not None:
            xb = _noised(diffusion, xb, t, torch.randn(xb.shape, generator=gen))  # Eq. (4): x_t
        loss = F.cross_entropy(model(xb.to(device), t.to(device)), y[idx].to(device))  # Alg. 1, step 6
        if not torch.isfinite(loss):
            raise UserError(f"classifier training: loss is {loss.item()} at step {step}; lower --lr or check the images")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        prog.update(extra=f"loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    eval_ts = sorted({0, T // 10, T // 4, T // 2, 3 * T // 4}) if diffusion is not None else [0]
    report = dict(
        train_acc=_accuracy(model, x[tr], y[tr], 0, diffusion, seed + 1, device),
        heldout_acc_by_t={t: _accuracy(model, x[ho], y[ho], t, diffusion, seed + 1, device) for t in eval_ts}
        if n_hold else {},
        n_train=len(tr), n_holdout=n_hold, num_classes=num_classes, steps=steps, seconds=time.time() - t0)
    if log is not None:
        log(f"[classifier] {num_classes} classes, train acc {report['train_acc']:.3f}, held-out acc by t "
            + " ".join(f"{t}:{a:.3f}" for t, a in report["heldout_acc_by_t"].items()))
    return model, report


# ============================================================================ Part 2: guidance


def guidance(classifier, target, scale):
    """cond_fn(x_t, t) = scale · ∇_{x_t} log p_φ(target_i | x_t_i, t_i) per sample, for ddpm.Diffusion.sample.

    With BatchNorm in eval mode the samples of a batch do not interact, so the gradient of the summed
    log-probability is the per-sample gradient. scale == 0 returns exact zeros (unguided sampling)."""
    def cond_fn(x, t):
        if scale == 0:
            return torch.zeros_like(x)
        if any(m.training for m in classifier.modules()):
            raise RuntimeError("guidance: the classifier is in training mode; call .eval() (BatchNorm would mix samples)")
        y = torch.as_tensor(target, dtype=torch.long, device=x.device).expand(len(x))
        with torch.enable_grad():
            xt = x.detach().requires_grad_(True)
            logp = F.log_softmax(classifier(xt, t), dim=1)
            grad = torch.autograd.grad(logp[torch.arange(len(x), device=x.device), y].sum(), xt)[0]
        if not torch.isfinite(grad).all():
            raise UserError(f"guidance: non-finite classifier gradient at timestep {int(t.flatten()[0])}; "
                            "lower the guidance scale or retrain the classifier")
        return scale * grad  # λ ∇_{x_t} log p_φ(c | x_t, t) (Algorithm 1, part 2; Dhariwal & Nichol 2021, Sec. 4)
    return cond_fn
