"""Extract training images from a trained DDPM: SIDE and both Carlini baselines, end to end.

    python extract.py --ckpt runs/n64/ckpt.pt --out runs/n64/extract            # all three methods
    python extract.py --ckpt ... --sweep-lambda 0,1,3,10,30 --sweep-k 4,8,16      # pick λ and K first
    torchrun --nproc_per_node=4 extract.py --ckpt ... --out ...                 # generations sharded
    python extract.py --ckpt ... --data TRAIN --repeats 3                       # audit: AUDIT_REPORT.md (audit.py)

Methods, all at the same N_G, sampler, steps and generation seeds (the paper's Table 1 protocol):
  uncond       Carlini et al. 2023 "UnCond": plain unconditional sampling;
  cond         Carlini "Cond": guidance by an ordinary time-independent classifier on the
               training set's real labels (the built-in faces' attributes, or folder names);
  side         SIDE, the paper's Algorithm 1 (side_extract, one line per step): N_syn unconditional
               samples -> features -> K-means -> cohesion filter (τ) -> surrogate labels -> time-
               dependent classifier p_φ(y|x_t,t) -> guided sampling toward a kept cluster drawn
               uniformly per generation (the maths in side.py);
  side_random  control: the same pipeline with random surrogate labels of the same K;
  uncond_budget  beyond the paper: SIDE's whole sampling budget (its N_syn synthetic images plus
               N_G) spent on plain unconditional sampling, so N_syn + N_G generations.

The methods are functions of (Target: model, diffusion, training data; Stages: config and cache) that
return arrays. Every stage is cached in OUT/cache under a name that hashes exactly the settings it
reads (Stages.reads), so a rerun, a sweep or an interrupted run reuses what is done; generations are
cached batch by batch. Distributed plumbing lives in runtime.py, the output files in report.py. Outputs
(written atomically): samples.npz, metrics.json, REPORT.md, grids/*.png, and sweep_*.{json,png}.
A rerun into a folder with results adds its methods beside the earlier ones when every setting that
changes results matches; otherwise it is refused before any work unless --overwrite is given.
Generation i of every method uses the noise of sample_generators(seed, [i]): each image can be
regenerated alone from its recorded seed and index.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

import audit
import data
import ddpm
import metrics
import models
import side
from common import (Progress, UserError, atomic_write_bytes, atomic_write_json, atomic_write_text, check,
                    check_fields, check_writable, option, load_checkpoint, parse_config, resolve_device, run_main, save_checkpoint)
from report import write_extraction
from runtime import Ranks, autocast, check_shared_folder, fast_model, local_device, setup_distributed
from sweeps import best_of, curves, sweep

METHODS = ("uncond", "cond", "side", "side_random", "uncond_budget")


@dataclass
class ExtractConfig:
    ckpt: str = option("runs/model/ckpt.pt", "the model to audit: a train.py checkpoint, a diffusers UNet2DModel or "
                      "pipeline folder, or a TorchScript ε-model with a .json beside it (models.py)", nonempty=True)
    out: str = option("", "run folder (default: next to the checkpoint, extract/)")
    data: str = option("", "training data to evaluate against (default: a train.py checkpoint's own --data; "
                      "required for other models)")
    methods: str = option("uncond,cond,side", "comma-separated subset of uncond,cond,side,side_random,uncond_budget", nonempty=True)
    n_gen: int = option(512, "N_G, generations per method (the paper: 5,120-51,200 at CelebA scale)", lo=1)
    n_syn: int = option(1024, "N_syn, unconditional samples that SIDE clusters (Alg. 1, step 1)", lo=2)
    K: int = option(16, "K-means clusters (paper: 100 for 50k samples; scaled to N_syn)", lo=2)
    tau: float = option(0.5, "cohesion threshold τ: keep clusters whose mean cosine to the centroid is >= τ (paper: 0.5)", lo=0.0, hi=1.0)
    drop_rejected: bool = option(False, "drop images of rejected clusters instead of relabelling them to the nearest kept centroid")
    features: str = option("ddpm", "clustering features: ddpm (own mid-block activations), pixels, or a TorchScript .pt file", nonempty=True)
    lam: float = option(3.0, "SIDE guidance scale λ (the paper sweeps 0-50, rising then falling; choose it with --sweep-lambda)", lo=0.0)
    cond_scale: float = option(-1.0, "guidance scale of Carlini Cond; -1 = the same as λ", lo=0.0, allow=(-1.0,))
    clf_steps: int = option(600, "classifier training steps (time-dependent for SIDE, time-independent for Cond)", lo=1)
    clf_lr: float = option(1e-3, "classifier AdamW lr; the paper's 1e-4 trains far too slowly in CPU-sized runs", gt=0.0)
    clf_width: int = option(32, "classifier ResNet base width (the paper: ResNet34 at 128 px)", lo=1)
    sampler: str = option("ddim", "sampler for every method", choices=["ddim", "ddpm"])
    sample_steps: int = option(50, "denoising steps (the same for every method)", lo=1)
    eta: float = option(1.0, "DDIM η; η=1 found about twice the copies of η=0 in calibration", lo=0.0, hi=1.0)
    batch: int = option(128, "generations per batch (one cached unit; also the sharding unit)", lo=1)
    seed: int = option(1, "generation seed of the reported run (tuning sweeps use --sweep-seed)", lo=0)
    syn_seed: int = option(12345, "seed of SIDE's synthetic set, clustering and classifiers (never reused for generations)", lo=0)
    sweep_seed: int = option(2, "generation seed of the sweeps, kept apart from --seed so nothing is tuned on the report", lo=0)
    sweep_lambda: tuple = option((), "λ values to sweep for SIDE (empty: no sweep)", elem=float, lo=0.0)
    sweep_k: tuple = option((), "K values to sweep for SIDE (empty: no sweep)", elem=int, lo=2)
    sweep_cond_scale: tuple = option((), "guidance scales to sweep for Carlini Cond, like λ for SIDE (empty: no sweep)",
                                    elem=float, lo=0.0)
    sweep_n_gen: int = option(0, "N_G for sweep points (0 = n_gen)", lo=0)
    curve_points: int = option(8, "points of the extraction-versus-budget curves over N_syn + N_G (0 = no curves)", lo=0)
    similarity: str = option("l2", "l2 (normalized pixel L2), sscd (the paper's SSCD cosine, offline; needs the extras; "
                            "for real photographs) or a TorchScript embedding file for cosine similarity", nonempty=True)
    grid_top: int = option(16, "extracted generations shown per method in the grids", lo=0)
    device: str = option("auto", "auto, cpu or cuda[:N]", nonempty=True)
    amp: str = option("off", "sample under bf16 autocast (a GPU speed-up; off is exact fp32)", choices=["off", "bf16"])
    channels_last: bool = option(False, "channels-last UNet for sampling (faster convolutions on tensor-core GPUs)")
    compile: str = option("off", "torch.compile the sampling UNet; cudagraphs also captures CUDA graphs (CUDA only)",
                         choices=["off", "on", "cudagraphs"])
    overwrite: bool = option(False, "replace the results in --out made with other settings (without it such a rerun is refused)")
    repeats: int = option(1, "independent attacks on this one model, each on its own seeds in OUT/repeat-r; >= 2 adds the audit "
                         "(audit.py: intervals over repeats, leaked.csv, extrapolation, AUDIT_REPORT.md)", lo=1)


def validate(cfg):
    """Every option before any work (nothing sampled or written): declared ranges, then what links them
    to each other, to the checkpoint and to the results already in --out."""
    check_fields(cfg)
    check(cfg.n_syn >= cfg.K, f"--n-syn {cfg.n_syn} must be >= K = {cfg.K}")
    bad = [m for m in cfg.methods.split(",") if m not in METHODS]
    check(not bad, f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    check(cfg.similarity in ("l2", "sscd") or os.path.isfile(cfg.similarity),
          f"--similarity {cfg.similarity!r} is neither l2, sscd nor an existing TorchScript embedding file")
    check(cfg.features in ("ddpm", "pixels") or os.path.isfile(cfg.features),
          f"--features {cfg.features!r} is neither ddpm, pixels nor an existing TorchScript file")
    check(cfg.data in ("", "faces") or os.path.exists(cfg.data),
          f"--data {cfg.data!r} is neither faces nor an existing image folder or .npz file")
    T = models.load_model(cfg.ckpt)[1].T  # a missing, foreign or corrupt checkpoint is refused here
    check(cfg.sample_steps <= T, f"--sample-steps {cfg.sample_steps} must be <= the model's T = {T} ({cfg.ckpt})")
    check_writable(out_dir(cfg), "--out")
    check_previous(cfg)
    for c in audit.repeat_configs(cfg, out_dir(cfg))[1:]:  # each repeat's folder, before any work
        check_writable(out_dir(c), "--out")
        check_previous(c)


def out_dir(cfg):
    return cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "extract")


# Options that do not change any method's results: a rerun differing only in them adds its methods.
PRESENTATION = {"methods", "out", "device", "amp", "channels_last", "compile", "batch", "grid_top", "overwrite",
                "sweep_lambda", "sweep_k", "sweep_cond_scale", "sweep_n_gen", "sweep_seed", "lam", "K",
                "cond_scale", "curve_points", "repeats"}


def previous(out):
    """metrics.json of the results already in `out`, or None."""
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); remove it or pass --overwrite") from None


def check_previous(cfg, chosen=None):
    """Refuse (unless --overwrite) to mix results made with other settings into one --out. Before
    the sweeps λ and K are compared only when no sweep will choose them; after, `chosen` is."""
    old = None if cfg.overwrite else previous(out_dir(cfg))
    if old is None:
        return
    new = dataclasses.asdict(cfg)
    diff = [k for k in new if k not in PRESENTATION and json.dumps(old["config"].get(k)) != json.dumps(new[k])]
    if chosen is None:
        chosen = dict(lam=None if cfg.sweep_lambda else cfg.lam, K=None if cfg.sweep_k else cfg.K,
                      cond_scale=None if cfg.sweep_cond_scale or cfg.cond_scale == -1 else cfg.cond_scale)
    diff += [k for k, v in chosen.items() if v is not None and old["chosen"].get(k) not in (None, v)]
    was = ", ".join(f"{k}={old['config'].get(k, old['chosen'].get(k))!r}" for k in diff)
    check(not diff, f"{out_dir(cfg)} holds results made with other settings ({was}); "
          "choose another --out, or pass --overwrite to replace them")


# ============================================================================ what is audited, and its stages

SAMPLING = ("sampler", "sample_steps", "eta", "batch", "amp", "channels_last", "compile")  # generate() reads these
CLASSIFYING = ("clf_steps", "clf_lr", "clf_width", "syn_seed")  # classifier() reads these


def key(**parts):
    """A short hash naming a cached stage by exactly the settings it depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Target:
    """The audited model and the training data it is compared against."""
    model: torch.nn.Module  # the ε/v UNet (the "ddpm" features read its mid-block)
    diffusion: ddpm.Diffusion
    ds: data.Dataset  # the training images (and real labels, if any)
    device: torch.device
    ident: str = "model"  # names these weights and this schedule in every cache key
    net: torch.nn.Module = None  # the UNet as the sampler calls it (runtime.fast_model); None = model
    num_classes: int = 0  # > 0: a class-conditional model, sampled with a uniform label per generation

    def __post_init__(self):
        self.net = self.model if self.net is None else self.net


class Stages:
    """OUT/cache for one target: every stage's result is stored under a name that hashes exactly the
    settings the stage reads (reads() hands it those and nothing else), so a rerun, a sweep or an
    interrupted run reuses what is done and a changed setting never meets a stale result. Also
    records each stage's seconds and each classifier's training report."""

    def __init__(self, folder, cfg, ident, ranks=Ranks()):
        self.folder, self.cfg, self.ident, self.ranks = folder, cfg, ident, ranks
        self.seconds, self.reports = {}, {}
        os.makedirs(folder, exist_ok=True)

    def reads(self, *fields, **values):
        """Exactly these config fields, plus values of earlier stages (their settings, nested), as the
        namespace the stage reads from: a field it reads but did not name is an AttributeError."""
        return SimpleNamespace(**{f: getattr(self.cfg, f) for f in fields}, **values)

    def name(self, stage, s):
        return f"{stage}-{key(model=self.ident, **vars(s))}"

    @contextlib.contextmanager
    def timed(self, stage):
        """Adds the seconds spent in the block to the stage's total (metrics.json, REPORT.md)."""
        t0 = time.time()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.time() - t0

    def stored(self, stage, s, make):
        """The stage's result from OUT/cache/<name>.pt, or make() it and store it (rank 0 writes)."""
        path = os.path.join(self.folder, self.name(stage, s) + ".pt")
        if os.path.exists(path):
            return load_checkpoint(path)
        with self.timed(stage):
            out = make()
        if self.ranks.rank == 0:
            save_checkpoint(out, path)
        return out


def uniform_targets(n, seed, k):
    """The class each generation is guided to: uniform over k, from (seed, index) alone."""
    return np.array([np.random.default_rng([seed, i, 2]).integers(k) for i in range(n)], dtype=np.int64)


# ============================================================================ sampling, cached batch by batch

def generate(target, stages, stage, s, guide=None, targets=None):
    """s.n images, image i from sample_generators(s.seed, [i]), with s's sampler settings (SAMPLING).
    Batch b is cached as its own file and made by rank b % world; guide(targets of a batch) -> cond_fn.
    Returns uint8 NHWC."""
    ranks = stages.ranks
    folder = os.path.join(stages.folder, stages.name(stage, s))
    os.makedirs(folder, exist_ok=True)
    batches = [range(a, min(s.n, a + s.batch)) for a in range(0, s.n, s.batch)]
    files = [os.path.join(folder, f"{b:05d}.npy") for b in range(len(batches))]
    todo = [b for b in range(len(batches)) if b % ranks.world == ranks.rank and not os.path.exists(files[b])]
    prog = Progress(stage, sum(len(batches[b]) for b in todo), "img", enabled=ranks.rank == 0)
    for b in todo:
        idx = batches[b]
        y = None
        if target.num_classes > 0:  # a class-conditional target model: a label per generation, uniform
            y = torch.as_tensor([np.random.default_rng([s.seed, i, 1]).integers(target.num_classes) for i in idx],
                                device=target.device)
        cond_fn = None if guide is None else guide(torch.as_tensor(targets[idx.start:idx.stop], device=target.device))
        try:
            with stages.timed(stage), autocast(s.amp, target.device):
                x = target.diffusion.sample(target.net, len(idx), ddpm.sample_generators(s.seed, idx), steps=s.sample_steps,
                                            eta=s.eta, sampler=s.sampler, y=y, cond_fn=cond_fn)
        except UserError as e:  # e.g. NaN guidance: name the stage and batch, then the step side.py names
            raise UserError(f"stage {stages.name(stage, s)}, batch {b}: {e}") from None
        if not torch.isfinite(x).all():
            raise UserError(f"generation {stage} produced NaN in batch {b}; lower the guidance scale")
        buf = io.BytesIO()
        np.save(buf, data.to_uint8(x))
        atomic_write_bytes(files[b], buf.getvalue())
        prog.update(len(idx))
    ranks.barrier()  # every rank's batches are on disk (a shared folder across nodes)
    return np.concatenate([np.load(f) for f in files])


def classifier(target, stages, stage, s, x, labels, num_classes, time_dependent):
    """A classifier trained on (x, labels) with s's settings (CLASSIFYING), or loaded from the cache:
    p_φ(y | x_t, t) when time_dependent (SIDE), p(y | x) otherwise (Carlini Cond). Every rank trains
    it, then all guide with rank 0's weights, bit for bit, even where GPU kernels differ."""
    def train():
        try:
            clf, rep = side.train_classifier(x, labels, target.diffusion if time_dependent else None, steps=s.clf_steps,
                                             lr=s.clf_lr, seed=s.syn_seed, device=target.device, width=s.clf_width,
                                             log=stages.ranks.log if stages.ranks.rank == 0 else None)
        except UserError as e:
            raise UserError(f"stage {stages.name(stage, s)}: {e}") from None
        return dict(state=stages.ranks.agree({k: v.cpu() for k, v in clf.state_dict().items()}), report=rep)
    ck = stages.stored(stage, s, train)
    stages.reports[stages.name(stage, s)] = ck["report"]
    clf = side.TimeResNet(num_classes, target.ds.images.shape[1], width=s.clf_width, time_dependent=time_dependent,
                          T=target.diffusion.T)
    clf.load_state_dict(ck["state"])
    return clf.to(target.device).eval().requires_grad_(False)


# ============================================================================ the methods

def synthetic(target, stages):
    """N_syn unconditional samples (uint8), on their own seed, and the settings that made them."""
    s = stages.reads(*SAMPLING, n=stages.cfg.n_syn, seed=stages.cfg.syn_seed)
    return generate(target, stages, "syn", s), s


def side_extract(target, stages, n, seed, lam, K, random_labels=False):
    """SIDE, the paper's Algorithm 1: uint8 generations and how they were made. random_labels: the
    control, the same pipeline with random surrogate labels of the same cardinality."""
    x_syn, s_syn = synthetic(target, stages)                                                   # Alg. 1, step 1
    s_z = stages.reads("features", syn=vars(s_syn))
    z = stages.stored("features", s_z, lambda: side.extract_features(
        data.to_tensor(x_syn), s_z.features, target.model, target.diffusion, device=target.device))  # Alg. 1, step 2
    s_c = stages.reads("tau", "drop_rejected", *CLASSIFYING, K=K, random=random_labels, z=vars(s_z))
    lab = side.surrogate_labels(z, s_c.K, tau=s_c.tau, drop_rejected=s_c.drop_rejected, seed=s_c.syn_seed)  # steps 3-5
    y = torch.as_tensor(data.random_labels(len(lab.labels), lab.num_classes, s_c.syn_seed)) if random_labels else lab.labels
    clf = classifier(target, stages, "clf-side", s_c, data.to_tensor(x_syn), y, lab.num_classes, True)  # Alg. 1, step 6
    c = uniform_targets(n, seed, lab.num_classes)                                  # Alg. 1, part 2: a kept cluster c
    s_g = stages.reads(*SAMPLING, n=n, seed=seed, lam=lam, clf=vars(s_c))
    x = generate(target, stages, "gen-side_random" if random_labels else "gen-side", s_g,  # Alg. 1, part 2: sampling with
                 lambda ct: side.guidance(clf, ct, lam), c)                          # ε̂ = ε_θ − λ√(1−ᾱ_t)∇log p_φ(c|x_t,t)
    return x, dict(cluster=c, scale=lam, K=K, kept=lab.num_classes, sizes=lab.sizes, cohesion=lab.cohesion)


def cond_extract(target, stages, n, seed, scale):
    """Carlini et al. 2023's "Cond": guidance by a time-independent classifier of the training set's
    real labels, toward a label drawn uniformly among those some training image has."""
    ds = target.ds
    check(ds.labels is not None, f"method cond needs the training data's real labels, and {ds.source} has none; "
          "use class subfolders, an .npz with labels, or drop cond from --methods")
    k, present = int(ds.labels.max()) + 1, np.unique(ds.labels)
    labels_id = hashlib.sha256(np.ascontiguousarray(ds.labels).tobytes()).hexdigest()[:12]
    s_c = stages.reads(*CLASSIFYING, data=ds.source, labels=labels_id)
    clf = classifier(target, stages, "clf-cond", s_c, data.to_tensor(ds.images), torch.as_tensor(ds.labels), k, False)
    c = present[uniform_targets(n, seed, len(present))]
    s_g = stages.reads(*SAMPLING, n=n, seed=seed, scale=scale, clf=vars(s_c))
    x = generate(target, stages, "gen-cond", s_g, lambda ct: side.guidance(clf, ct, scale), c)
    return x, dict(cluster=c, scale=scale, classes=k, classes_present=len(present))


def uncond_extract(target, stages, n, seed):
    """Carlini et al. 2023's "UnCond": plain unconditional sampling."""
    return generate(target, stages, "gen-uncond", stages.reads(*SAMPLING, n=n, seed=seed))


def method(target, stages, m, n, seed, lam=None, K=None, cond_scale=None):
    """uint8 generations of method m (METHODS) and a dict describing how they were made; None takes
    --lam, --K and --cond-scale (λ where that is -1)."""
    cfg = stages.cfg
    lam = cfg.lam if lam is None else lam
    K = cfg.K if K is None else K
    if cond_scale is None:
        cond_scale = lam if cfg.cond_scale == -1 else cfg.cond_scale
    if m == "uncond":
        return uncond_extract(target, stages, n, seed), {}
    if m == "uncond_budget":  # the synthetic set is N_syn unconditional samples already: reuse it
        return np.concatenate([synthetic(target, stages)[0], uncond_extract(target, stages, n, seed)]), {}
    if m == "cond":
        return cond_extract(target, stages, n, seed, cond_scale)
    return side_extract(target, stages, n, seed, lam, K, random_labels=m == "side_random")


def evaluate(target, stages, x, embed=None):
    """metrics.evaluate of x against the training set, plus `distinct`: training images reached per
    band (UMS · N_G / 100), and over all bands (`distinct_any`, `ams_any`). Under torchrun each rank
    searches its shard of x and rank 0 merges them; the other ranks get None. embed: an SSCD session."""
    ranks, sim = stages.ranks, stages.cfg.similarity
    shard = (ranks.rank, ranks.world) if 1 < ranks.world <= len(x) else None
    if shard is None and ranks.rank != 0:
        return None
    with stages.timed("metrics"):
        ev = metrics.evaluate(x, target.ds.images, similarity=sim if sim in ("l2", "sscd") else "embed",
                              embed=sim if sim not in ("l2", "sscd") else embed, device=target.device, shard=shard)
    if shard is not None:
        parts = ranks.gather(ev)
        if parts is None:
            return None
        ev = metrics.merge(parts)
    ev["distinct"] = {b: int(len(i)) for b, i in ev["ums_index"].items()}
    ev["distinct_any"] = len(set().union(*[set(np.asarray(i).tolist()) for i in ev["ums_index"].values()]))
    ev["ams_any"] = float(sum(ev["ams"].values()))  # bands are disjoint: % of generations in any band
    return ev


# ============================================================================ one run: load, sweep, extract, write

@dataclass
class Audit:
    """One run of extract.py: the target, its stages, the output folder; what sweeps.py drives."""
    target: Target
    stages: Stages
    out: str
    embed: object = None  # the SSCD session of --similarity sscd

    @property
    def ranks(self):
        return self.stages.ranks

    def method(self, m, n, seed, **kw):
        return method(self.target, self.stages, m, n, seed, **kw)

    def evaluate(self, x):
        return evaluate(self.target, self.stages, x, self.embed)

    def synthetic(self):
        return synthetic(self.target, self.stages)[0]


def load_target(cfg):
    """(Ranks, Target): the model of --ckpt on its device, and the training data it is audited
    against (a train.py checkpoint's own sample of --data, else all of --data), checked to match."""
    device = local_device(resolve_device(cfg.device))
    check(cfg.compile != "cudagraphs" or device.type == "cuda", "--compile cudagraphs needs a CUDA device")
    ranks = setup_distributed(device)
    model, diffusion, info = models.load_model(cfg.ckpt, device)
    check(cfg.data or info.data, f"{cfg.ckpt} holds no training-data spec (a {info.kind} model): pass --data, "
          "the training images to audit against (a folder of images or an .npz)")
    check(info.channels == 3, f"{cfg.ckpt} makes {info.channels}-channel images; only RGB (3) models are supported")
    own = info.data or dict(spec=cfg.data, n=None, seed=0, label_attr=None)  # an external model: all of --data
    spec = cfg.data or own["spec"]
    ds = data.load_data(spec, info.image_size, n=own["n"], seed=own["seed"], label_attr=own["label_attr"])
    hw = ds.images.shape[1:3]
    if cfg.data and cfg.data != "faces" and (info.data is None or
                                             os.path.realpath(cfg.data) != os.path.realpath(own["spec"])):
        try:  # other images than the training run's are compared as stored: load_data resized them
            hw = metrics.load_images(cfg.data)[0].shape[1:3]
        except metrics.MetricsInputError:
            pass  # a folder of mixed sizes: only the resized copy has one size
    check(hw == (info.image_size,) * 2, f"data {spec} is {hw[0]}x{hw[1]} px but {cfg.ckpt} was trained at {info.image_size} px")
    return ranks, Target(model, diffusion, ds, device, ident=key(**info.ident),
                         net=fast_model(model, cfg.channels_last, cfg.compile), num_classes=info.num_classes)


def run(cfg, target, ranks=Ranks()):
    """Sweeps (if asked), then every method of --methods at N_G on --seed, evaluated, with budget
    curves; rank 0 writes the outputs into out_dir(cfg). Returns {method: metrics} (rank 0)."""
    t0 = time.time()
    try:  # fail before any sampling when the SSCD extras are missing
        embed = metrics.load_sscd() if cfg.similarity == "sscd" else None
    except metrics.MetricsInputError as e:
        raise UserError(str(e)) from None
    audit = Audit(target, Stages(os.path.join(out_dir(cfg), "cache"), cfg, target.ident, ranks), out_dir(cfg), embed)
    check_shared_folder(audit.stages.folder, ranks)
    chosen = dict(lam=cfg.lam, K=cfg.K, cond_scale=None if cfg.cond_scale == -1 else cfg.cond_scale)
    sweeps = {}
    for name, values, m, point in (("lambda", cfg.sweep_lambda, "side", lambda v: dict(lam=v, K=cfg.K)),
                                   ("K", cfg.sweep_k, "side", lambda v: dict(lam=chosen["lam"], K=v)),
                                   ("cond_scale", cfg.sweep_cond_scale, "cond", lambda v: dict(cond_scale=v))):
        if values:  # λ first, then K at the chosen λ; Carlini Cond's scale swept like λ
            sweeps[name] = sweep(audit, name, values, cfg, m, point)
            chosen[{"lambda": "lam"}.get(name, name)] = ranks.agree(best_of(sweeps[name]) if ranks.rank == 0 else None)
    if sweeps:
        check_previous(cfg, chosen)
    results, samples = {}, {}
    for m in cfg.methods.split(","):
        x, info = audit.method(m, cfg.n_gen, cfg.seed, lam=chosen["lam"], K=chosen["K"], cond_scale=chosen["cond_scale"])
        samples[m] = (x, info)
        ev = audit.evaluate(x)  # every rank searches a shard; rank 0 gets the result
        if ranks.rank == 0:
            results[m] = dict(ev, **{k: v for k, v in info.items() if k not in ("cluster",)})
            ranks.log(f"[{m}] AMS {ev['ams']} UMS {ev['ums']} p95 {ev['p95']:.4f}")
    budget = curves(audit, cfg, samples) if cfg.curve_points > 0 else {}
    if ranks.rank == 0:
        write_extraction(audit.out, cfg, None if cfg.overwrite else previous(audit.out), chosen, results, samples,
                         sweeps, budget, target.ds, audit.stages.reports, dict(audit.stages.seconds, total=time.time() - t0),
                         target.device)
    return results


def main(argv=None):
    """extract.run's results; with --repeats >= 2, the audit of every repeat (audit.py) on rank 0."""
    cfg = parse_config(ExtractConfig, argv, __doc__.split("\n\n")[0])
    validate(cfg)  # every option, before any work
    ranks, target = load_target(cfg)
    try:
        results = run(cfg, target, ranks)
        return audit.run_repeats(cfg, out_dir(cfg), target, ranks, run, check_previous) or results
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
