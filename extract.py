"""Extract training images from a trained DDPM: SIDE and both Carlini baselines, end to end.

    python extract.py --ckpt runs/n64/ckpt.pt --out runs/n64/extract     # all three methods
    python extract.py --ckpt ... --sweep-lambda 0,1,3,10,30 --sweep-k 4,8,16  # pick λ, K first
    torchrun --nproc_per_node=4 extract.py --ckpt ... --out ...          # generations sharded
    python extract.py --ckpt ... --data TRAIN --repeats 3     # audit: AUDIT_REPORT.md (audit.py)

Methods, all at the same N_G, sampler, steps and generation seeds (SIDE Table 1's protocol):
  uncond       Carlini et al. 2023 "UnCond": plain unconditional sampling;
  cond         Carlini "Cond": guidance by an ordinary time-independent classifier on the
               training set's real labels (the built-in faces' attributes, or folder names);
  side         SIDE, the paper's Algorithm 1 (SIDE Alg. 1: side.extract, one line per step, each
               step cached here through its memo and sample hooks): N_syn unconditional samples ->
               features -> K-means -> cohesion filter (τ) -> surrogate labels -> time-dependent
               classifier p_φ(y|x_t,t) -> guided sampling toward a kept cluster drawn uniformly per
               generation;
  side_random  control: the same pipeline with the surrogate labels permuted at random over the
               synthetic images (the same clusters and cluster sizes; only the label-image
               association changes);
  uncond_budget  beyond the paper: SIDE's whole sampling budget (its N_syn synthetic images plus
               N_G) spent on plain unconditional sampling, so N_syn + N_G generations.

The methods are functions of (Target: model, diffusion, training data; Stages: config and cache)
that return arrays. Every stage is cached in OUT/cache under a name that hashes exactly the settings
it reads (Stages.reads) and the model's weights (Carlini Cond's also the training images), so a
rerun, a sweep or an interrupted run reuses what is done and a model retrained in place is
recomputed; generations are cached batch by batch. Cache files are data only (nothing in them runs
when read). Distributed plumbing lives in common.py, the output files in report.py. Outputs
(written atomically): samples.npz, metrics.json, REPORT.md, grids/*.png, and sweep_*.{json,png}.
A rerun into a folder with results adds its methods beside the earlier ones when every setting that
changes results (and the model's weights and training images) matches; otherwise it is refused
before any work unless --overwrite is given. A run holds a lock on --out while it writes.
Generation i of every method uses the noise of sample_generators(seed, [i]): each image can be
regenerated alone from its recorded seed and index.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

import audit
import data
import ddpm
import metrics
import models
import side
from common import (GIB, MAX_CLASSES, Progress, Ranks, UserError, array_digest,
                    atomic_write_bytes, autocast, check, check_fields,
                    check_memory, check_shared_folder, check_writable, fast_model, folder_lock,
                    load_checkpoint, local_device, option, parse_config, resolve_device, run_main,
                    save_checkpoint, setup_distributed, shutdown)
from report import write_extraction, write_sweep

METHODS = ("uncond", "cond", "side", "side_random", "uncond_budget")


@dataclass
class ExtractConfig:
    ckpt: str = option("runs/model/ckpt.pt",
                       "the model to audit: a train.py checkpoint or a diffusers UNet2DModel or "
                       "pipeline folder (read as data, no code runs), or a TorchScript ε-model "
                       "with a .json beside it (TorchScript is code: it runs when loaded; name "
                       "only files you trust)", nonempty=True)
    out: str = option("", "run folder (default: next to the checkpoint, extract/)")
    data: str = option("", "training data to evaluate against (default: a train.py checkpoint's "
                           "own --data; required for other models)")
    methods: str = option("uncond,cond,side", "comma-separated subset of uncond,cond,side,"
                          "side_random,uncond_budget", nonempty=True)
    n_gen: int = option(512, "N_G, generations per method (the paper: 5,120-51,200 at CelebA "
                             "scale)", lo=1)
    n_syn: int = option(1024, "N_syn, unconditional samples that SIDE clusters (SIDE Alg. 1, step "
                              "1)", lo=2)
    K: int = option(16, "K-means clusters (paper: 100 for 50k samples; scaled to N_syn)", lo=2)
    tau: float = option(0.5, "cohesion threshold τ: keep clusters whose mean cosine to the "
                             "centroid is >= τ (paper: 0.5)", lo=0.0, hi=1.0)
    drop_rejected: bool = option(False, "drop images of rejected clusters instead of relabelling "
                                        "them to the nearest kept centroid")
    features: str = option("ddpm", "clustering features: ddpm (own mid-block activations), "
                                   "pixels, or a TorchScript .pt file (code: it runs; name only "
                                   "files you trust)", nonempty=True)
    lam: float = option(3.0, "SIDE guidance scale λ (the paper sweeps 0-50, rising then falling; "
                             "choose it with --sweep-lambda)", lo=0.0)
    cond_scale: float = option(-1.0, "guidance scale of Carlini Cond; -1 = the same as λ",
                               lo=0.0, allow=(-1.0,))
    clf_steps: int = option(600, "classifier training steps (time-dependent for SIDE, "
                                 "time-independent for Cond)", lo=1)
    clf_lr: float = option(1e-3, "classifier AdamW lr; the paper's 1e-4 trains far too slowly in "
                                 "CPU-sized runs", gt=0.0)
    clf_width: int = option(32, "classifier ResNet base width (the paper: ResNet34 at 128 px, "
                                "widths 64-512)", lo=1, hi=1024)
    sampler: str = option("ddim", "sampler for every method", choices=["ddim", "ddpm"])
    sample_steps: int = option(50, "denoising steps (the same for every method)", lo=1)
    eta: float = option(1.0, "DDIM η; η=1 found about twice the copies of η=0 in "
                             "calibration", lo=0.0, hi=1.0)
    batch: int = option(128, "generations per batch (one cached unit; also the sharding "
                             "unit)", lo=1)
    seed: int = option(1, "generation seed of the reported run (tuning sweeps use "
                          "--sweep-seed)", lo=0)
    syn_seed: int = option(12345, "seed of SIDE's synthetic set, clustering and classifiers "
                                  "(never reused for generations)", lo=0)
    sweep_seed: int = option(2, "generation seed of the sweeps, kept apart from --seed so nothing "
                                "is tuned on the report", lo=0)
    sweep_lambda: tuple = option((), "λ values to sweep for SIDE (empty: no sweep)", elem=float,
                                 lo=0.0)
    sweep_k: tuple = option((), "K values to sweep for SIDE (empty: no sweep)", elem=int, lo=2)
    sweep_cond_scale: tuple = option((), "guidance scales to sweep for Carlini Cond, like λ for "
                                     "SIDE (empty: no sweep)", elem=float, lo=0.0)
    sweep_n_gen: int = option(0, "N_G for sweep points (0 = n_gen)", lo=0)
    curve_points: int = option(8, "points of the extraction-versus-budget curves over N_syn + N_G "
                                  "(0 = no curves)", lo=0)
    bands: str = option("", "similarity bands as name=lo:hi pairs, e.g. "
                            "low=0.08:0.095,mid=0.07:0.08,high=0:0.07 ('' = metrics.py's; "
                            "reproduce.py passes the pixel-L2 bands it calibrates on its data)")
    similarity: str = option("l2", "l2 (normalized pixel L2), sscd (the paper's SSCD cosine, "
                                   "offline; needs the extras; for real photographs) or a "
                                   "TorchScript embedding file for cosine similarity (code: it "
                                   "runs; name only files you trust)", nonempty=True)
    grid_top: int = option(16, "extracted generations shown per method in the grids", lo=0)
    device: str = option("auto", "auto, cpu or cuda[:N]", nonempty=True)
    amp: str = option("off", "sample under bf16 autocast (a GPU speed-up; off is exact fp32)",
                      choices=["off", "bf16"])
    channels_last: bool = option(False, "channels-last UNet for sampling (faster convolutions on "
                                        "tensor-core GPUs)")
    compile: str = option("off", "torch.compile the sampling UNet; cudagraphs also captures CUDA "
                          "graphs (CUDA only)", choices=["off", "on", "cudagraphs"])
    overwrite: bool = option(False, "replace the results in --out made with other settings "
                                    "(without it such a rerun is refused)")
    repeats: int = option(1, "independent attacks on this one model, each on its own seeds in "
                             "OUT/repeat-r; >= 2 adds the audit (audit.py: intervals over "
                             "repeats, leaked.csv, extrapolation, AUDIT_REPORT.md)", lo=1)


def validate(cfg):
    """Every option before any work (nothing sampled or written): declared ranges, then what links
    them to each other, to the model (loaded and, for TorchScript files, probed), to the sizes
    memory and disk allow, and to the results already in --out."""
    check_fields(cfg)
    check(cfg.n_syn >= cfg.K, f"--n-syn {cfg.n_syn} must be >= K = {cfg.K}")
    check(not cfg.sweep_k or max(cfg.sweep_k) <= cfg.n_syn,
          f"--sweep-k {','.join(map(str, cfg.sweep_k))}: every K must "
          f"be <= --n-syn {cfg.n_syn} (K-means needs at least K synthetic images)")
    check(cfg.curve_points <= cfg.n_syn + cfg.n_gen,
          f"--curve-points {cfg.curve_points} must be <= N_syn + N_G = "
          f"{cfg.n_syn + cfg.n_gen} (one point per extra sample at most)")
    bad = [m for m in cfg.methods.split(",") if m not in METHODS]
    check(not bad, f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    try:
        metrics.parse_bands(cfg.bands or None, "l2" if cfg.similarity == "l2" else "cos")
    except metrics.MetricsInputError as e:
        raise UserError(f"--bands: {e}") from None
    check(cfg.similarity in ("l2", "sscd") or os.path.isfile(cfg.similarity),
          f"--similarity {cfg.similarity!r} is neither l2, sscd nor an existing TorchScript "
          "embedding file")
    check(cfg.features in ("ddpm", "pixels") or os.path.isfile(cfg.features),
          f"--features {cfg.features!r} is neither ddpm, pixels nor an existing TorchScript file")
    check(cfg.data in ("", "faces", *data.DATASETS) or os.path.exists(cfg.data),
          f"--data {cfg.data!r} is neither faces, {', '.join(data.DATASETS)} nor an existing "
          "folder (images or IDX files) or .npz file")
    # a missing, foreign or corrupt checkpoint is refused here
    _, diffusion, info = models.load_model(cfg.ckpt)
    check(cfg.sample_steps <= diffusion.T, f"--sample-steps {cfg.sample_steps} must be <= the "
                                           f"model's T = {diffusion.T} ({cfg.ckpt})")
    if uses_side(cfg):
        check(cfg.features != "ddpm" or info.kind != "torchscript",
              "--features ddpm (the default) clusters the UNet's mid-block activations, which "
              f"the TorchScript model {cfg.ckpt} does not expose; pass --features pixels or a "
              "TorchScript feature file")
        if cfg.features not in ("ddpm", "pixels"):
            def features(x):
                return side.extract_features(x, cfg.features, preprocess=metrics.sscd_preprocess)
            probe(features, info, "--features", cfg.features)
    if cfg.similarity not in ("l2", "sscd"):
        def embed(x):
            return metrics.embed_images(metrics.load_embedder(cfg.similarity), data.to_uint8(x))
        probe(embed, info, "--similarity", cfg.similarity)
    check_writable(out_dir(cfg), "--out")
    check_sizes(cfg, info)
    check_previous(cfg)
    for c in audit.repeat_configs(cfg, out_dir(cfg))[1:]:  # each repeat's folder, before any work
        check_writable(out_dir(c), "--out")
        check_previous(c)


def uses_side(cfg):
    """Whether SIDE's pipeline (features, clusters, classifier) runs: a SIDE method or a λ / K
    sweep."""
    return bool({"side", "side_random"} & set(cfg.methods.split(",")) or cfg.sweep_lambda
                or cfg.sweep_k)


def probe(fn, info, flag, path):
    """Run a TorchScript file the user named (features or embeddings) on two blank images of the
    model's size before any work: a file that is no TorchScript or returns no (N, D) tensor is one
    line here, not after the generations."""
    x = torch.zeros(2, info.channels, info.image_size, info.image_size)
    try:
        z = fn(x)
        ok = (torch.is_tensor(z) and z.ndim == 2 and len(z) == 2
              or isinstance(z, np.ndarray) and z.shape[0] == 2)
    except (UserError, side.SideError, metrics.MetricsInputError) as e:
        text = str(e).removeprefix("features: ")
        text = text if text.startswith(path) else f"{path}: {text}"
        raise UserError(f"{flag} {text}") from None
    except Exception as e:  # noqa: BLE001 -- the user's TorchScript code can fail in any way
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag} {path}: calling it on 2 images of {info.image_size} px failed "
                        f"({why})") from None
    check(ok, f"{flag} {path}: it must return one (N, D) tensor for N images")


def check_sizes(cfg, info):
    """Lower bounds of the memory and disk space the generations need, checked before any work:
    memory holds every method's N_G images at once (and the synthetic set for uncond_budget) as
    uint8, plus one sampling batch; the cache on disk also every sweep point and the synthetic set,
    less what is cached."""
    methods = cfg.methods.split(",")
    image = info.channels * info.image_size ** 2
    held = len(methods) * cfg.n_gen + (cfg.n_syn if "uncond_budget" in methods else 0)
    # x_t, noise and ε of one batch, float32
    sampling = 3 * min(cfg.batch, max(cfg.n_gen, cfg.n_syn)) * image * 4
    check_memory(held * image + sampling, torch.device("cpu"),
                 f"{held} generations of {info.image_size} px (and a "
                 f"batch of {cfg.batch})", "lower --n-gen, --n-syn or --batch")
    n = len(methods) * cfg.n_gen
    n += cfg.n_syn if uses_side(cfg) or "uncond_budget" in methods else 0
    sweep_points = len(cfg.sweep_lambda) + len(cfg.sweep_k) + len(cfg.sweep_cond_scale)
    n += sweep_points * (cfg.sweep_n_gen or cfg.n_gen)
    cache = os.path.join(out_dir(cfg), "cache")
    folders = [d.path for d in (os.scandir(cache) if os.path.isdir(cache) else ()) if d.is_dir()]
    cached = sum(e.stat().st_size for d in folders for e in os.scandir(d))  # a rerun reuses these
    need, free = n * image - cached, shutil.disk_usage(existing_folder(out_dir(cfg))).free
    check(need <= free, f"the cached generations need at least {need / GIB:.1f} GiB more in --out "
                        f"{out_dir(cfg)}, but {free / GIB:.1f} GiB are free; lower --n-gen / "
                        "--n-syn or the sweeps, or choose another --out")


def existing_folder(path):
    """The nearest existing folder at or above `path` (where the disk space is measured)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def out_dir(cfg):
    return cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "extract")


# Options that do not change any method's results: a rerun differing only in them adds its methods.
PRESENTATION = {"methods", "out", "device", "amp", "channels_last", "compile", "batch", "grid_top",
                "overwrite", "sweep_lambda", "sweep_k", "sweep_cond_scale", "sweep_n_gen",
                "sweep_seed", "lam", "K", "cond_scale", "curve_points", "repeats"}


def previous(out):
    """metrics.json of the results already in `out`, or None."""
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            old = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); remove it or pass --overwrite") from None
    check(isinstance(old, dict)
          and all(isinstance(old.get(k), dict) for k in ("config", "chosen", "methods")),
          f"{path} is not the metrics.json extract.py writes (no config / chosen / methods "
          "objects); remove it or pass --overwrite")
    samples = os.path.join(out, "samples.npz")
    # the earlier methods' images are kept beside the new ones: readable, without pickles
    if os.path.exists(samples):
        try:
            with np.load(samples, allow_pickle=False) as z:
                ok = ({"images", "method", "cluster", "index"} <= set(z.files)
                      and z["method"].dtype.kind == "U"
                      and z["images"].dtype == np.uint8)
        except (OSError, ValueError, EOFError):
            ok = False
        check(ok, f"{samples} is not the samples.npz extract.py writes (or holds pickled "
                  "objects); remove it or pass --overwrite")
    return old


def check_previous(cfg, chosen=None, target=None):
    """Refuse (unless --overwrite) to mix results made with other settings into one --out. Before
    the sweeps λ and K are compared only when no sweep will choose them; after, `chosen` is.
    `target` (target_record: hashes of the weights and the training images), when given, must match
    the one the earlier results recorded (a model retrained in place, or changed images, are other
    settings too)."""
    old = None if cfg.overwrite else previous(out_dir(cfg))
    if old is None:
        return
    # (results of an older extract.py record none)
    if target is not None and isinstance(old.get("target"), dict):
        what = [w for k, w in (("model", "model weights"), ("data", "training images"))
                if old["target"].get(k) != target[k]]
        check(not what, f"{out_dir(cfg)} holds results of other {' and '.join(what)} than "
                        f"{cfg.ckpt} and its data give now (retrained or changed in place?); pass "
                        "--overwrite to recompute them, or choose another --out")
    new = dataclasses.asdict(cfg)
    diff = [k for k in new if k not in PRESENTATION
            and json.dumps(old["config"].get(k)) != json.dumps(new[k])]
    if chosen is None:
        chosen = dict(lam=None if cfg.sweep_lambda else cfg.lam, K=None if cfg.sweep_k else cfg.K,
                      cond_scale=None if cfg.sweep_cond_scale or cfg.cond_scale == -1
                      else cfg.cond_scale)
    diff += [k for k, v in chosen.items()
             if v is not None and old["chosen"].get(k) not in (None, v)]
    was = ", ".join(f"{k}={old['config'].get(k, old['chosen'].get(k))!r}" for k in diff)
    check(not diff, f"{out_dir(cfg)} holds results made with other settings ({was}); "
          "choose another --out, or pass --overwrite to replace them")


# ================================================================== what is audited, and its stages

# generate() reads these
SAMPLING = ("sampler", "sample_steps", "eta", "batch", "amp", "channels_last", "compile")
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
    # the UNet as the sampler calls it (common.fast_model); None = model
    net: torch.nn.Module = None
    # > 0: a class-conditional model, sampled with a uniform label per generation
    num_classes: int = 0
    # names the training images and labels (stages that read them); "" = hash them
    data_ident: str = ""

    def __post_init__(self):
        self.net = self.model if self.net is None else self.net
        self.data_ident = self.data_ident or array_digest(self.ds.images, self.ds.labels)


def target_record(target):
    """What the results in --out were computed from (metrics.json's `target`): the model's and the
    data's hashes."""
    return dict(model=target.ident, data=target.data_ident)


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
        """Exactly these config fields, plus values of earlier stages (their settings, nested), as
        the namespace the stage reads from: a field it reads but did not name is an
        AttributeError."""
        return SimpleNamespace(**{f: getattr(self.cfg, f) for f in fields}, **values)

    def name(self, stage, s):
        return f"{stage}-{key(model=self.ident, **vars(s))}"

    @contextlib.contextmanager
    def timed(self, stage):
        """Adds the seconds spent in the block to the stage's total (metrics.json, REPORT.md)."""
        t0 = time.time()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.time() - t0

    def stored(self, stage, s, make, ok=lambda result: True):
        """The stage's result from OUT/cache/<name>.pt, or make() it and store it (rank 0 writes). A
        cache file is data only (common.load_checkpoint: nothing in it runs) and must pass
        ok(result), else it is refused in one line naming it."""
        path = os.path.join(self.folder, self.name(stage, s) + ".pt")
        if os.path.exists(path):
            out = load_checkpoint(path, fix=CACHE_FIX)
            check(ok(out), f"cache file {path} does not hold what stage {stage} makes; {CACHE_FIX}")
            return out
        with self.timed(stage):
            out = make()
        if self.ranks.rank == 0:
            save_checkpoint(out, path)
        return out


CACHE_FIX = "delete it and rerun (the stage is recomputed)"


def load_batch(path, n, size, channels=3):
    """A cached batch of generations: an .npy of uint8 (n, size, size, channels), read without
    pickles."""
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cache file {path} cannot be read as an array of images "
                        f"({str(e).splitlines()[0][:120]}); {CACHE_FIX}") from None
    check(isinstance(x, np.ndarray) and x.dtype == np.uint8
          and x.shape == (n, size, size, channels),
          f"cache file {path} holds {getattr(x, 'dtype', type(x).__name__)} "
          f"{getattr(x, 'shape', '')}, not {n} uint8 images of {size} px and {channels} channels; "
          f"{CACHE_FIX}")
    return x


# ================================================================== sampling, cached batch by batch

def generate(target, stages, stage, s, guide=None, targets=None):
    """s.n images, image i from sample_generators(s.seed, [i]), with s's sampler settings
    (SAMPLING). Batch b is cached as its own file and made by rank b % world; guide(targets of a
    batch) -> cond_fn.
    Returns uint8 NHWC."""
    ranks = stages.ranks
    folder = os.path.join(stages.folder, stages.name(stage, s))
    os.makedirs(folder, exist_ok=True)
    batches = [range(a, min(s.n, a + s.batch)) for a in range(0, s.n, s.batch)]
    files = [os.path.join(folder, f"{b:05d}.npy") for b in range(len(batches))]
    todo = [b for b in range(len(batches)) if b % ranks.world == ranks.rank
            and not os.path.exists(files[b])]
    prog = Progress(stage, sum(len(batches[b]) for b in todo), "img", enabled=ranks.rank == 0)
    for b in todo:
        idx = batches[b]
        y = None
        # a class-conditional target model: a label per generation, uniform
        if target.num_classes > 0:
            y = torch.as_tensor([np.random.default_rng([s.seed, i, 1]).integers(target.num_classes)
                                 for i in idx], device=target.device)
        cond_fn = None
        if guide is not None:
            cond_fn = guide(torch.as_tensor(targets[idx.start:idx.stop], device=target.device))
        try:
            with stages.timed(stage), autocast(s.amp, target.device):
                gens = ddpm.sample_generators(s.seed, idx)
                x = target.diffusion.sample(target.net, len(idx), gens, steps=s.sample_steps,
                                            eta=s.eta, sampler=s.sampler, y=y, cond_fn=cond_fn)
        except (UserError, side.SideError) as e:  # e.g. NaN guidance: name the stage and batch
            raise UserError(f"stage {stages.name(stage, s)}, batch {b}: {e}") from None
        if not torch.isfinite(x).all():
            raise UserError(f"generation {stage} produced NaN in batch {b}; lower the guidance "
                            "scale")
        buf = io.BytesIO()
        np.save(buf, data.to_uint8(x))
        atomic_write_bytes(files[b], buf.getvalue())
        prog.update(len(idx))
    ranks.barrier()  # every rank's batches are on disk (a shared folder across nodes)
    size = target.ds.images.shape[1]
    return np.concatenate([load_batch(f, len(batches[b]), size, target.ds.channels)
                           for b, f in enumerate(files)])


def memo(stages):
    """side.extract's `memo` hook (and Carlini Cond's): a stage's result from OUT/cache, or made and
    stored (Stages.stored, named by exactly the settings the step reports); a classifier made under
    torchrun is rank 0's on every rank (all guide with the same weights, bit for bit, even where GPU
    kernels differ); its training report is kept for metrics.json; side.py's errors name the
    stage."""
    def stored(stage, settings, make):
        s = SimpleNamespace(**settings)

        def made():
            try:
                out = make()
            except side.SideError as e:
                raise UserError(f"stage {stages.name(stage, s)}: {e}") from None
            if stage.startswith("clf"):
                out = dict(out, state=stages.ranks.agree(out["state"]))
            return out
        out = stages.stored(stage, s, made, lambda v: STORED[stage.split("-")[0]](v, settings))
        if stage.startswith("clf"):
            stages.reports[stages.name(stage, s)] = out["report"]
        return out
    return stored


STORED = {  # what a stage's cache file must hold (checked when read)
    "features": lambda v, s: torch.is_tensor(v) and v.ndim == 2 and len(v) == s["syn"]["n"],
    "clf": lambda v, s: (isinstance(v, dict) and isinstance(v.get("state"), dict)
                         and isinstance(v.get("report"), dict)),
}


def sampler(target, stages, gen_stage="gen-side"):
    """side.extract's `sample` hook: generate()'s cached, sharded batches; the synthetic set comes
    back as float tensors (what side.py's features and classifier read), the generations as
    uint8."""
    def sample(stage, settings, guide=None, targets=None):
        x = generate(target, stages, gen_stage if stage == "gen-side" else stage,
                     SimpleNamespace(**settings), guide, targets)
        return data.to_tensor(x) if stage == "syn" else x
    return sample


def progress(stage, unit, enabled):
    """side.py's `progress` hook: common.Progress lines (one every few seconds) on stderr."""
    bar = []

    def update(done, total, extra=""):
        if not bar:
            bar.append(Progress(stage, total, unit, enabled=enabled))
        bar[0].update(done - bar[0].done, extra=extra)
    return update


# ============================================================================ the methods

def synthetic(target, stages):
    """N_syn unconditional samples (uint8), on their own seed: side.extract's step 1, read from the
    cache."""
    return generate(target, stages, "syn",
                    stages.reads(*SAMPLING, n=stages.cfg.n_syn, seed=stages.cfg.syn_seed))


def side_extract(target, stages, n, seed, lam, K, random_labels=False):
    """SIDE Alg. 1 (side.extract), each step cached in OUT/cache: uint8 generations
    and how they were made. random_labels: the control, the same pipeline with the surrogate labels
    randomly permuted over the synthetic images (the same clusters' sizes; only which image carries
    which label changes)."""
    cfg, rank0 = stages.cfg, stages.ranks.rank == 0
    s = side.Settings(n_syn=cfg.n_syn, syn_seed=cfg.syn_seed, features=cfg.features, K=K,
                      tau=cfg.tau, drop_rejected=cfg.drop_rejected, clf_steps=cfg.clf_steps,
                      clf_lr=cfg.clf_lr, clf_width=cfg.clf_width, lam=lam,
                      sampling=vars(stages.reads(*SAMPLING)))
    relabel = None
    if random_labels:
        relabel = ("permuted", lambda y: torch.as_tensor(data.permuted_labels(y, cfg.syn_seed)))
    try:
        return side.extract(target.model, target.diffusion, s, n, seed, memo=memo(stages),
                            sample=sampler(target, stages,
                                           "gen-side_random" if random_labels else "gen-side"),
                            relabel=relabel, preprocess=metrics.sscd_preprocess,
                            device=target.device, log=stages.ranks.log if rank0 else None,
                            progress=progress("classifier", "step", rank0))
    except side.SideError as e:
        raise UserError(str(e)) from None


def cond_extract(target, stages, n, seed, scale):
    """Carlini et al. 2023's "Cond": guidance by a time-independent classifier of the training set's
    real labels, toward a label drawn uniformly among those some training image has. The classifier
    trains on every training image (none held out: a target class it never saw would be guidance
    toward nothing), so it reports its training accuracy only."""
    ds, rank0 = target.ds, stages.ranks.rank == 0
    check(ds.labels is not None,
          f"method cond needs the training data's real labels, and {ds.source} has none; "
          "use class subfolders, an .npz with labels, or drop cond from --methods")
    k, present = int(ds.labels.max()) + 1, np.unique(ds.labels)
    labels_id = hashlib.sha256(np.ascontiguousarray(ds.labels).tobytes()).hexdigest()[:12]
    s_c = stages.reads(*CLASSIFYING, data=ds.source, labels=labels_id, images=target.data_ident,
                       holdout=0.0)
    x = data.to_tensor(ds.images)
    stored = memo(stages)("clf-cond", vars(s_c), lambda: side.fit_classifier(
        x, torch.as_tensor(ds.labels), None, s_c, target.device, s_c.holdout,
        log=stages.ranks.log if rank0 else None, progress=progress("classifier", "step", rank0)))
    try:
        clf = side.classifier_from(stored, k, x, s_c.clf_width, None, target.device)
    except side.SideError as e:
        raise UserError(str(e)) from None
    c = present[side.uniform_targets(n, seed, len(present))]
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
        x = np.concatenate([synthetic(target, stages), uncond_extract(target, stages, n, seed)])
        return x, {}
    if m == "cond":
        return cond_extract(target, stages, n, seed, cond_scale)
    return side_extract(target, stages, n, seed, lam, K, random_labels=m == "side_random")


def evaluate(target, stages, x, embed=None):
    """metrics.evaluate of x against the training set, plus `distinct`: training images reached per
    band (UMS · N_G / 100), and over all bands (`distinct_any`, `ams_any`). Under torchrun each rank
    searches its shard of x and rank 0 merges them; the other ranks get None. embed: an SSCD
    session."""
    ranks, cfg = stages.ranks, stages.cfg
    sim = cfg.similarity
    shard = (ranks.rank, ranks.world) if 1 < ranks.world <= len(x) else None
    if shard is None and ranks.rank != 0:
        return None
    with stages.timed("metrics"):
        try:
            ev = metrics.evaluate(x, target.ds.images,
                                  similarity=sim if sim in ("l2", "sscd") else "embed",
                                  bands=cfg.bands or None,
                                  embed=sim if sim not in ("l2", "sscd") else embed,
                                  device=target.device, shard=shard)
        # e.g. an embedding file that returns the wrong shape
        except metrics.MetricsInputError as e:
            raise UserError(f"--similarity {sim}: {e}") from None
    if shard is not None:
        parts = ranks.gather(ev)
        if parts is None:
            return None
        ev = metrics.merge(parts)
    ev["distinct"] = {b: int(len(i)) for b, i in ev["ums_index"].items()}
    ev["distinct_any"] = len(set().union(*[set(np.asarray(i).tolist())
                                           for i in ev["ums_index"].values()]))
    # bands are disjoint: % of generations in any band
    ev["ams_any"] = float(sum(ev["ams"].values()))
    return ev


# ============================================================= one run: load, sweep, extract, write

@dataclass
class Job:
    """One run of extract.py: the target, its stages, the output folder; what the sweeps drive."""
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
        return synthetic(self.target, self.stages)


# ============================================================= tuning and budget curves
# Sweeps of SIDE's λ and K and of Carlini Cond's guidance scale on a separate generation seed
# (the paper sweeps λ and finds it rising then falling), and the extraction-versus-budget curves
# (distinct training images found against samples drawn, SIDE's synthetic set counted as spent
# budget). Each takes a Job; they write sweep_<name>.{json,png}.

# at most this many extra values beyond each end of a grid whose best value sits at that end
SWEEP_EXTEND = 3
# each extra value is the end value x3 (or /3): the grids are roughly geometric (1, 3, 10, 30)
SWEEP_FACTOR = 3.0


def sweep(job, name, values, cfg, method, point):
    """The metrics of `method` at each swept value on the sweep seed (point(v) -> job.method
    kwargs), then, while the best value (best_of) sits at an end of the grid, one more value
    beyond that end (x3 above, /3 below; 0 is a lower end that stays, e.g. unguided Cond), at most
    SWEEP_EXTEND per end; writes sweep_<name>.{json,png}. Returns the rows in value order."""
    n = cfg.sweep_n_gen or cfg.n_gen
    rows, todo, added = [], sorted(set(values)), {"up": 0, "down": 0}
    while todo:
        for v in todo:
            x, info = job.method(method, n, cfg.sweep_seed, **point(v))
            ev = job.evaluate(x)  # every rank searches a shard; rank 0 gets the result
            if job.ranks.rank == 0:
                rows.append(dict(value=v, ams=ev["ams"], ums=ev["ums"], distinct=ev["distinct"],
                                 p95=ev["p95"], distinct_any=ev["distinct_any"],
                                 kept=info.get("kept"), added=v not in values))
                job.ranks.log(f"[sweep {name}] {v}: AMS {ev['ams']} UMS {ev['ums']}")
        todo = job.ranks.agree(beyond(rows, added) if job.ranks.rank == 0 else None)
    if job.ranks.rank == 0:
        rows.sort(key=lambda r: r["value"])
        write_sweep(job.out, name, rows)
    return rows


def beyond(rows, added):
    """[the next value past the end of the grid where the best value sits], or [] (counts in
    `added`)."""
    vals, best = sorted(r["value"] for r in rows), best_of(rows)
    if best == vals[-1] and added["up"] < SWEEP_EXTEND:
        added["up"] += 1
        return [vals[-1] * SWEEP_FACTOR if vals[-1] > 0 else 1.0]
    if best == vals[0] and vals[0] > 0 and added["down"] < SWEEP_EXTEND and len(vals) > 1:
        added["down"] += 1
        return [vals[0] / SWEEP_FACTOR]
    return []


def curve(job, x, budgets, offset=0):
    """Distinct training images reached (per band and in any band) by the first b - offset images
    of x, for each total budget b in `budgets` (b > offset): the extraction-versus-budget curve of
    one method."""
    pts = []
    for b in budgets:
        if b - offset < 1 or b - offset > len(x):
            continue
        ev = job.evaluate(x[:b - offset])
        if ev is not None:
            pts.append(dict(budget=int(b), distinct=ev["distinct"],
                            distinct_any=ev["distinct_any"]))
    return pts


def curves(job, cfg, samples):
    """Curves of every method over the budget N_syn + N_G (the attacker's total number of samples):
    UnCond from the compute-matched draw (synthetic set then plain samples), Cond and the SIDE
    variants after their own N_G; SIDE starts at N_syn (its synthetic set is spent budget) and
    `side_union` counts the synthetic set and the guided generations together (an attacker keeps
    both)."""
    total = cfg.n_syn + cfg.n_gen
    grid = sorted({int(round(total * j / cfg.curve_points)) for j in range(1, cfg.curve_points + 1)}
                  | {cfg.n_syn, cfg.n_gen})
    out = {}
    for m, (x, _) in samples.items():
        if m in ("side", "side_random"):
            out[m] = curve(job, x, grid, offset=cfg.n_syn)
        elif m != "uncond":
            out[m] = curve(job, x, grid)
    if "side" in samples:
        out["side_union"] = curve(job, np.concatenate([job.synthetic(), samples["side"][0]]), grid)
    return out


def best_of(rows):
    """The sweep value reaching the most distinct training images in any band (UMS), then the
    highest hit rate in any band (AMS). Any band, not the high band first: a sweep point's
    high-band count is a handful of images (6 or fewer of 256 generations in the first
    reproduction), too few to rank scales by."""
    return max(rows, key=lambda r: (r["distinct_any"], sum(r["ams"].values())))["value"]


def load_sweep(out, name):
    path = os.path.join(out, f"sweep_{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def load_target(cfg):
    """(Ranks, Target): the model of --ckpt on its device, and the training data it is audited
    against (a train.py checkpoint's own sample of --data, else all of --data), checked to match."""
    device = local_device(resolve_device(cfg.device))
    check(cfg.compile != "cudagraphs" or device.type == "cuda",
          "--compile cudagraphs needs a CUDA device")
    ranks = setup_distributed(device)
    model, diffusion, info = models.load_model(cfg.ckpt, device)
    check(cfg.data or info.data,
          f"{cfg.ckpt} holds no training-data spec (a {info.kind} model): pass --data, "
          "the training images to audit against (a folder of images or an .npz)")
    # an external model: all of --data
    own = info.data or dict(spec=cfg.data, n=None, seed=0, label_attr=None)
    spec = cfg.data or own["spec"]
    origin = "the --data it was trained with" if info.kind == "train" else "data in its JSON"
    check(spec in ("faces", *data.DATASETS) or os.path.exists(spec),
          f"{cfg.ckpt} names its training data {spec} "
          f"({origin}), which does not exist here; pass --data with those training images")
    ds = data.load_data(spec, info.image_size, n=own["n"], seed=own["seed"],
                        label_attr=own["label_attr"])
    kinds = {1: "grey-scale", 3: "RGB"}
    check(info.channels == ds.channels,
          f"{cfg.ckpt} makes {info.channels}-channel "
          f"({kinds.get(info.channels, 'neither grey nor RGB')}) images but data {spec} is "
          f"{ds.channels}-channel ({kinds[ds.channels]}); audit a model against the images it was "
          "trained on")
    hw = ds.images.shape[1:3]
    other = info.data is None or os.path.realpath(cfg.data) != os.path.realpath(own["spec"])
    if cfg.data and cfg.data != "faces" and other:
        # other images than the training run's are compared as stored
        hw = data.stored_size(cfg.data) or hw
    check(hw == (info.image_size,) * 2,
          f"data {spec} is {hw[0]}x{hw[1]} px but {cfg.ckpt} was trained at {info.image_size} px")
    return ranks, Target(model, diffusion, ds, device, ident=key(**info.ident),
                         net=fast_model(model, cfg.channels_last, cfg.compile),
                         num_classes=info.num_classes)


def check_target(cfg, target):
    """What needs the loaded data, before any work: Carlini Cond's real labels (at least two
    classes, class indices under common.MAX_CLASSES)."""
    if "cond" not in cfg.methods.split(",") and not cfg.sweep_cond_scale:
        return
    ds = target.ds
    flag = "--methods cond" if "cond" in cfg.methods.split(",") else "--sweep-cond-scale"
    check(ds.labels is not None,
          f"{flag} needs the training data's real labels, and {ds.source} has none; use class "
          "subfolders, an .npz with labels, or drop cond from --methods (and --sweep-cond-scale)")
    present = np.unique(ds.labels)
    check(len(present) >= 2,
          f"{flag}: every training image of {ds.source} has the same label ({present[0]}), so a "
          "classifier has nothing to tell apart; Carlini Cond needs >= 2 classes: drop cond from "
          "--methods")
    check(present[-1] < MAX_CLASSES,
          f"{flag}: the largest label of {ds.source} is {present[-1]} (at most "
          f"{MAX_CLASSES - 1}); labels are class indices 0..K-1: renumber them")


def run(cfg, target, ranks=Ranks()):
    """Sweeps (if asked), then every method of --methods at N_G on --seed, evaluated, with budget
    curves; rank 0 writes the outputs into out_dir(cfg). Returns {method: metrics} (rank 0)."""
    t0 = time.time()
    try:  # fail before any sampling when the SSCD extras are missing
        embed = metrics.load_sscd() if cfg.similarity == "sscd" else None
    except metrics.MetricsInputError as e:
        raise UserError(str(e)) from None
    job = Job(target, Stages(os.path.join(out_dir(cfg), "cache"), cfg, target.ident, ranks),
              out_dir(cfg), embed)
    check_shared_folder(job.stages.folder, ranks)
    chosen = dict(lam=cfg.lam, K=cfg.K, cond_scale=None if cfg.cond_scale == -1 else cfg.cond_scale)
    sweeps = {}
    grids = (("lambda", cfg.sweep_lambda, "side", lambda v: dict(lam=v, K=cfg.K)),
             ("K", cfg.sweep_k, "side", lambda v: dict(lam=chosen["lam"], K=v)),
             ("cond_scale", cfg.sweep_cond_scale, "cond", lambda v: dict(cond_scale=v)))
    for name, values, m, point in grids:
        if values:  # λ first, then K at the chosen λ; Carlini Cond's scale swept like λ
            sweeps[name] = sweep(job, name, values, cfg, m, point)
            best = best_of(sweeps[name]) if ranks.rank == 0 else None
            chosen[{"lambda": "lam"}.get(name, name)] = ranks.agree(best)
    if sweeps:
        check_previous(cfg, chosen)
    results, samples = {}, {}
    for m in cfg.methods.split(","):
        x, info = job.method(m, cfg.n_gen, cfg.seed, lam=chosen["lam"], K=chosen["K"],
                             cond_scale=chosen["cond_scale"])
        samples[m] = (x, info)
        ev = job.evaluate(x)  # every rank searches a shard; rank 0 gets the result
        if ranks.rank == 0:
            results[m] = dict(ev, **{k: v for k, v in info.items() if k not in ("cluster",)})
            ranks.log(f"[{m}] AMS {ev['ams']} UMS {ev['ums']} p95 {ev['p95']:.4f}")
    budget = curves(job, cfg, samples) if cfg.curve_points > 0 else {}
    if ranks.rank == 0:
        earlier = None if cfg.overwrite else previous(job.out)
        write_extraction(job.out, cfg, earlier, chosen, results, samples, sweeps, budget,
                         target.ds, job.stages.reports,
                         dict(job.stages.seconds, total=time.time() - t0), target.device,
                         target=target_record(target))
    return results


def main(argv=None):
    """extract.run's results; with --repeats >= 2, the audit of every repeat (audit.py), on
    rank 0."""
    cfg = parse_config(ExtractConfig, argv, __doc__.split("\n\n")[0])
    validate(cfg)  # every option, before any work
    ranks, target = load_target(cfg)
    check_target(cfg, target)
    # results of other weights or images are not mixed in
    check_previous(cfg, target=target_record(target))
    finished = False
    try:
        lock = (folder_lock(out_dir(cfg), "--out", "extract.py") if ranks.rank == 0
                else contextlib.nullcontext())
        with lock:
            # again under the lock: another run may have just ended
            check_previous(cfg, target=target_record(target))
            results = run(cfg, target, ranks)
            repeats = audit.run_repeats(cfg, out_dir(cfg), target, ranks, run, check_previous)
        finished = True
        return repeats or results
    finally:
        shutdown(finished)


if __name__ == "__main__":
    run_main(main, interrupted="rerun the same command to continue: finished batches and stages "
                               "are reused")
