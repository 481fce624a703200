"""Extract training images from a trained DDPM: SIDE and both Carlini baselines, end to end.

    python extract.py --ckpt runs/n64/ckpt.pt --out runs/n64/extract            # all three methods
    python extract.py --ckpt ... --sweep-lambda 0,1,3,10,30 --sweep-k 4,8,16      # pick λ and K first
    torchrun --nproc_per_node=4 extract.py --ckpt ... --out ...                 # generations sharded

Methods, all at the same N_G, sampler, steps and generation seeds (the paper's Table 1 protocol):
  uncond       Carlini et al. 2023 "UnCond": plain unconditional sampling;
  cond         Carlini "Cond": guidance by an ordinary time-independent classifier on the
               training set's real labels (the built-in faces' attributes, or folder names);
  side         SIDE, Algorithm 1: N_syn unconditional samples -> features -> K-means -> cohesion
               filter (τ) -> surrogate labels -> time-dependent classifier p_φ(y|x_t,t) -> guided
               sampling toward a kept cluster drawn uniformly per generation (side.py);
  side_random  control: the same pipeline with random surrogate labels of the same K;
  uncond_budget  beyond the paper: SIDE's whole sampling budget (its N_syn synthetic images plus
               N_G) spent on plain unconditional sampling, so N_syn + N_G generations.

Every stage is cached in OUT/cache under a name that hashes the settings it depends on, so a rerun,
a sweep or an interrupted run reuses what is done; generations are cached batch by batch. Outputs
(written atomically): samples.npz, metrics.json, REPORT.md, grids/*.png, and sweep_*.{json,png}.
A rerun into a folder with results adds its methods beside the earlier ones when every setting that
changes results matches; otherwise it is refused before any work unless --overwrite is given.
Generation i of every method uses the noise of sample_generators(seed, [i]): each image can be
regenerated alone from its recorded seed and index.
"""
import copy
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import data
import ddpm
import metrics
import models
import side
from common import (Progress, UserError, atomic_write_bytes, atomic_write_json, atomic_write_text, check,
                    check_fields, check_writable, field, load_checkpoint, parse_config, resolve_device, run_main, save_checkpoint)
from report import extraction_table, grid_of_matches
from sweeps import best_of, curves, sweep
from runtime import autocast, local_device, setup_distributed

METHODS = ("uncond", "cond", "side", "side_random", "uncond_budget")


@dataclass
class ExtractConfig:
    ckpt: str = field("runs/model/ckpt.pt", "the model to audit: a train.py checkpoint, a diffusers UNet2DModel or "
                      "pipeline folder, or a TorchScript ε-model with a .json beside it (models.py)", nonempty=True)
    out: str = field("", "run folder (default: next to the checkpoint, extract/)")
    data: str = field("", "training data to evaluate against (default: a train.py checkpoint's own --data; "
                      "required for other models)")
    methods: str = field("uncond,cond,side", "comma-separated subset of uncond,cond,side,side_random,uncond_budget", nonempty=True)
    n_gen: int = field(512, "N_G, generations per method (the paper: 5,120-51,200 at CelebA scale)", lo=1)
    n_syn: int = field(1024, "N_syn, unconditional samples that SIDE clusters (Alg. 1, step 1)", lo=2)
    K: int = field(16, "K-means clusters (paper: 100 for 50k samples; scaled to N_syn)", lo=2)
    tau: float = field(0.5, "cohesion threshold τ: keep clusters whose mean cosine to the centroid is >= τ (paper: 0.5)", lo=0.0, hi=1.0)
    drop_rejected: bool = field(False, "drop images of rejected clusters instead of relabelling them to the nearest kept centroid")
    features: str = field("ddpm", "clustering features: ddpm (own mid-block activations), pixels, or a TorchScript .pt file", nonempty=True)
    lam: float = field(3.0, "SIDE guidance scale λ (the paper sweeps 0-50, rising then falling; choose it with --sweep-lambda)", lo=0.0)
    cond_scale: float = field(-1.0, "guidance scale of Carlini Cond; -1 = the same as λ", lo=0.0, allow=(-1.0,))
    clf_steps: int = field(600, "classifier training steps (time-dependent for SIDE, time-independent for Cond)", lo=1)
    clf_lr: float = field(1e-3, "classifier AdamW lr; the paper's 1e-4 trains far too slowly in CPU-sized runs", gt=0.0)
    clf_width: int = field(32, "classifier ResNet base width (the paper: ResNet34 at 128 px)", lo=1)
    sampler: str = field("ddim", "sampler for every method", choices=["ddim", "ddpm"])
    sample_steps: int = field(50, "denoising steps (the same for every method)", lo=1)
    eta: float = field(1.0, "DDIM η; η=1 found about twice the copies of η=0 in calibration", lo=0.0, hi=1.0)
    batch: int = field(128, "generations per batch (one cached unit; also the sharding unit)", lo=1)
    seed: int = field(1, "generation seed of the reported run (tuning sweeps use --sweep-seed)", lo=0)
    syn_seed: int = field(12345, "seed of SIDE's synthetic set, clustering and classifiers (never reused for generations)", lo=0)
    sweep_seed: int = field(2, "generation seed of the sweeps, kept apart from --seed so nothing is tuned on the report", lo=0)
    sweep_lambda: tuple = field((), "λ values to sweep for SIDE (empty: no sweep)", elem=float, lo=0.0)
    sweep_k: tuple = field((), "K values to sweep for SIDE (empty: no sweep)", elem=int, lo=2)
    sweep_cond_scale: tuple = field((), "guidance scales to sweep for Carlini Cond, like λ for SIDE (empty: no sweep)",
                                    elem=float, lo=0.0)
    sweep_n_gen: int = field(0, "N_G for sweep points (0 = n_gen)", lo=0)
    curve_points: int = field(8, "points of the extraction-versus-budget curves over N_syn + N_G (0 = no curves)", lo=0)
    similarity: str = field("l2", "l2 (normalized pixel L2), sscd (the paper's SSCD cosine, offline; needs the extras; "
                            "for real photographs) or a TorchScript embedding file for cosine similarity", nonempty=True)
    grid_top: int = field(16, "extracted generations shown per method in the grids", lo=0)
    device: str = field("auto", "auto, cpu or cuda[:N]", nonempty=True)
    amp: str = field("off", "sample under bf16 autocast (a GPU speed-up; off is exact fp32)", choices=["off", "bf16"])
    channels_last: bool = field(False, "channels-last UNet for sampling (faster convolutions on tensor-core GPUs)")
    compile: str = field("off", "torch.compile the sampling UNet; cudagraphs also captures CUDA graphs (CUDA only)",
                         choices=["off", "on", "cudagraphs"])
    overwrite: bool = field(False, "replace the results in --out made with other settings (without it such a rerun is refused)")


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


def out_dir(cfg):
    return cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "extract")


# Options that do not change any method's results: a rerun differing only in them adds its methods.
PRESENTATION = {"methods", "out", "device", "amp", "channels_last", "compile", "batch", "grid_top", "overwrite",
                "sweep_lambda", "sweep_k", "sweep_cond_scale", "sweep_n_gen", "sweep_seed", "lam", "K",
                "cond_scale", "curve_points"}


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


def key(**parts):
    """A short hash naming a cached stage by exactly the settings it depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Run:
    """One extraction run: the model, its training data, the cache folder, distributed rank."""

    def __init__(self, cfg):
        self.cfg, self.t = cfg, {}
        self.device = local_device(resolve_device(cfg.device))
        check(cfg.compile != "cudagraphs" or self.device.type == "cuda", "--compile cudagraphs needs a CUDA device")
        self.rank, self.world = setup_distributed(self.device)
        self.model, self.diffusion, self.info = models.load_model(cfg.ckpt, self.device)
        info = self.info
        check(cfg.data or info.data, f"{cfg.ckpt} holds no training-data spec (a {info.kind} model): pass --data, "
              "the training images to audit against (a folder of images or an .npz)")
        check(info.channels == 3, f"{cfg.ckpt} makes {info.channels}-channel images; only RGB (3) models are supported")
        try:  # fail before any sampling when the SSCD extras are missing
            self.sscd = metrics.load_sscd() if cfg.similarity == "sscd" else None
        except metrics.MetricsInputError as e:
            raise UserError(str(e)) from None
        self.sampler_model = self.fast(self.model)
        self.out = cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "extract")
        self.cache = os.path.join(self.out, "cache")
        os.makedirs(self.cache, exist_ok=True)
        self.check_shared_cache()
        own = info.data or dict(spec=cfg.data, n=None, seed=0, label_attr=None)  # an external model: all of --data
        spec = cfg.data or own["spec"]
        self.ds = data.load_data(spec, info.image_size, n=own["n"], seed=own["seed"], label_attr=own["label_attr"])
        hw = self.ds.images.shape[1:3]
        if cfg.data and cfg.data != "faces" and (info.data is None or
                                                 os.path.realpath(cfg.data) != os.path.realpath(own["spec"])):
            try:  # other images than the training run's are compared as stored: load_data resized them
                hw = metrics.load_images(cfg.data)[0].shape[1:3]
            except metrics.MetricsInputError:
                pass  # a folder of mixed sizes: only the resized copy has one size
        check(hw == (info.image_size,) * 2,
              f"data {spec} is {hw[0]}x{hw[1]} px but {cfg.ckpt} was trained at {info.image_size} px")
        self.ckpt_id = key(**info.ident)
        self.reports = {}
        self.num_classes = info.num_classes

    def fast(self, model):
        """The UNet the sampler calls: --channels-last (a copy), --compile; the default is `model` itself."""
        cfg = self.cfg
        if cfg.channels_last:
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if cfg.compile != "off":  # "reduce-overhead" is torch.compile's CUDA-graphs mode
            model = torch.compile(model, mode="reduce-overhead" if cfg.compile == "cudagraphs" else None)
        return model

    def check_shared_cache(self):
        """Every rank reads every rank's batch files: the cache must be one folder seen by all nodes."""
        if self.world == 1:
            return
        box = [os.urandom(8).hex()]
        dist.broadcast_object_list(box, src=0)
        probe = os.path.join(self.cache, f".shared-{box[0]}")
        if self.rank == 0:
            atomic_write_text(probe, "")
        dist.barrier()
        seen = [None] * self.world
        dist.all_gather_object(seen, os.path.exists(probe))  # a fresh name: no stale NFS negative lookup
        if self.rank == 0:
            os.unlink(probe)
        check(all(seen), f"the cache folder {self.cache} is not shared by all {self.world} processes (a rank "
              "cannot see rank 0's files); under torchrun across nodes --out must be on a shared filesystem")

    def agree(self, obj):
        """Rank 0's value of obj, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def log(self, msg):
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def timed(self, stage, fn):
        t0 = time.time()
        out = fn()
        self.t[stage] = self.t.get(stage, 0.0) + time.time() - t0
        return out

    # ------------------------------------------------------------------ generation (cached by batch, sharded)
    def generate(self, name, n, seed, cond_fn_for=None, targets=None):
        """n images, image i from sample_generators(seed, [i]); batch b is cached as its own file and
        made by rank b % world. cond_fn_for(target_batch) -> cond_fn. Returns uint8 NHWC."""
        cfg = self.cfg
        fast = [f"{k}={v}" for k, v in (("amp", cfg.amp), ("cl", cfg.channels_last), ("compile", cfg.compile))
                if v not in ("off", False)]
        folder = os.path.join(self.cache, "-".join([name] + fast))  # the fast path changes bits: its own cache
        os.makedirs(folder, exist_ok=True)
        batches = [(b, range(b * cfg.batch, min(n, (b + 1) * cfg.batch))) for b in range((n + cfg.batch - 1) // cfg.batch)]
        todo = [(b, idx) for b, idx in batches if b % self.world == self.rank
                and not os.path.exists(os.path.join(folder, f"{b:05d}.npy"))]
        prog = Progress(name, sum(len(i) for _, i in todo), "img", enabled=self.rank == 0)
        for b, idx in todo:
            tgt = None if targets is None else torch.as_tensor(targets[idx.start:idx.stop], device=self.device)
            y = None
            if self.num_classes > 0:  # a class-conditional target model: a label per generation, uniform
                y = torch.as_tensor([np.random.default_rng([seed, i, 1]).integers(self.num_classes) for i in idx],
                                    device=self.device)
            try:
                with autocast(cfg.amp, self.device):
                    x = self.diffusion.sample(self.sampler_model, len(idx), ddpm.sample_generators(seed, idx),
                                              steps=cfg.sample_steps, eta=cfg.eta, sampler=cfg.sampler, y=y,
                                              cond_fn=None if cond_fn_for is None else cond_fn_for(tgt))
            except UserError as e:  # e.g. NaN guidance: name the stage and batch, then the step side.py names
                raise UserError(f"stage {name}, batch {b}: {e}") from None
            if not torch.isfinite(x).all():
                raise UserError(f"generation {name} produced NaN in batch {b}; lower the guidance scale")
            buf = io.BytesIO()
            np.save(buf, data.to_uint8(x))
            atomic_write_bytes(os.path.join(folder, f"{b:05d}.npy"), buf.getvalue())
            prog.update(len(idx))
        if self.world > 1:
            dist.barrier()  # every rank's batches are on disk (a shared folder across nodes)
        return np.concatenate([np.load(os.path.join(folder, f"{b:05d}.npy")) for b, _ in batches])

    # ------------------------------------------------------------------ SIDE, Algorithm 1 part 1
    def syn_key(self):
        cfg = self.cfg
        fast = {} if (cfg.amp, cfg.channels_last, cfg.compile) == ("off", False, "off") else \
            dict(amp=cfg.amp, cl=cfg.channels_last, c=cfg.compile)  # fast-path samples feed their own features/classifier
        return key(ckpt=self.ckpt_id, n=cfg.n_syn, seed=cfg.syn_seed, s=cfg.sampler, st=cfg.sample_steps, eta=cfg.eta, **fast)

    def synthetic(self):
        """Alg. 1, step 1: N_syn unconditional samples (uint8), on their own seed."""
        cfg = self.cfg
        return self.timed("side: synthetic set", lambda: self.generate(f"syn-{self.syn_key()}", cfg.n_syn, cfg.syn_seed))

    def surrogate(self, K, random_labels=False):
        """(classifier p_φ(y|x_t,t), SurrogateLabels): Alg. 1 steps 1-6, every step cached."""
        cfg = self.cfg
        syn_key = self.syn_key()
        x_syn = data.to_tensor(self.synthetic())  # step 1
        feat_path = os.path.join(self.cache, f"features-{key(syn=syn_key, f=cfg.features)}.pt")
        if not os.path.exists(feat_path):  # step 2
            z = self.timed("side: features", lambda: side.extract_features(
                x_syn, cfg.features, self.model, self.diffusion, device=self.device))
            if self.rank == 0:
                save_checkpoint(z, feat_path)
        else:
            z = load_checkpoint(feat_path)
        lab = self.timed("side: k-means", lambda: side.surrogate_labels(  # steps 3-5
            z, K, tau=cfg.tau, drop_rejected=cfg.drop_rejected, seed=cfg.syn_seed))
        labels = lab.labels
        if random_labels:  # the control: same cardinality, no information
            labels = torch.as_tensor(data.random_labels(len(labels), lab.num_classes, cfg.syn_seed), dtype=torch.long)
        clf_path = os.path.join(self.cache, f"clf-side-{key(syn=syn_key, f=cfg.features, K=K, tau=cfg.tau, d=cfg.drop_rejected, r=random_labels, s=cfg.clf_steps, lr=cfg.clf_lr, w=cfg.clf_width)}.pt")
        clf = self.timed("side: classifier", lambda: self.classifier(clf_path, x_syn, labels, lab.num_classes, self.diffusion))  # step 6
        return clf, lab

    def classifier(self, path, x, labels, num_classes, diffusion):
        """Train (or load from cache) a classifier; time-dependent iff diffusion is given."""
        cfg = self.cfg
        if os.path.exists(path):
            ck = load_checkpoint(path)
            clf = side.TimeResNet(num_classes, self.info.image_size, width=cfg.clf_width,
                                  time_dependent=diffusion is not None, T=self.diffusion.T)
            clf.load_state_dict(ck["state"])
            self.reports[os.path.basename(path)] = ck["report"]
            return clf.to(self.device).eval().requires_grad_(False)
        try:  # every rank trains the same classifier (no rank idles at a barrier meanwhile)
            clf, rep = side.train_classifier(x, labels, diffusion, steps=cfg.clf_steps, lr=cfg.clf_lr, seed=cfg.syn_seed,
                                             device=self.device, width=cfg.clf_width,
                                             log=self.log if self.rank == 0 else None)
        except UserError as e:
            raise UserError(f"stage {os.path.basename(path)[:-3]}: {e}") from None
        if self.world > 1:  # then all guide with rank 0's weights, bit for bit, even where GPU kernels differ
            clf.load_state_dict(self.agree({k: v.cpu() for k, v in clf.state_dict().items()}))
        if self.rank == 0:
            save_checkpoint(dict(state=clf.state_dict(), report=rep), path)
        self.reports[os.path.basename(path)] = rep
        return clf

    def targets(self, n, seed, k):
        """The class each generation is guided to: uniform over k, from (seed, index) alone."""
        return np.array([np.random.default_rng([seed, i, 2]).integers(k) for i in range(n)], dtype=np.int64)

    # ------------------------------------------------------------------ one method
    def method(self, m, n, seed, lam=None, K=None, cond_scale=None):
        """uint8 generations of method m, and a dict describing how they were made. cond_scale None:
        --cond-scale (or λ if that is -1)."""
        cfg = self.cfg
        lam = cfg.lam if lam is None else lam
        if cond_scale is None and cfg.cond_scale != -1:
            cond_scale = cfg.cond_scale
        K = cfg.K if K is None else int(K)
        base = dict(ckpt=self.ckpt_id, n=n, seed=seed, s=cfg.sampler, st=cfg.sample_steps, eta=cfg.eta)
        if m == "uncond":
            return self.timed("uncond: generate", lambda: self.generate(f"gen-uncond-{key(**base)}", n, seed)), {}
        if m == "uncond_budget":  # the synthetic set is N_syn unconditional samples already: reuse it
            return np.concatenate([self.synthetic(), self.method("uncond", n, seed)[0]]), {}
        if m == "cond":
            check(self.ds.labels is not None, f"method cond needs the training data's real labels, and {self.ds.source} "
                  "has none; use class subfolders, an .npz with labels, or drop cond from --methods")
            k = int(self.ds.labels.max()) + 1
            present = np.unique(self.ds.labels)  # targets only over labels some training image has
            scale = lam if cond_scale is None else cond_scale
            labels_id = hashlib.sha256(np.ascontiguousarray(self.ds.labels).tobytes()).hexdigest()[:12]
            path = os.path.join(self.cache, f"clf-cond-{key(ckpt=self.ckpt_id, data=self.ds.source, labels=labels_id, seed=cfg.syn_seed, s=cfg.clf_steps, lr=cfg.clf_lr, w=cfg.clf_width)}.pt")
            clf = self.timed("cond: classifier", lambda: self.classifier(
                path, data.to_tensor(self.ds.images), torch.as_tensor(self.ds.labels), k, None))
            tg = present[self.targets(n, seed, len(present))]
            x = self.timed("cond: generate", lambda: self.generate(
                f"gen-cond-{key(**base, lam=scale, clf=os.path.basename(path))}", n, seed, lambda t: side.guidance(clf, t, scale), tg))
            return x, dict(cluster=tg, scale=scale, classes=k, classes_present=len(present))
        rnd = m == "side_random"
        clf, lab = self.surrogate(K, random_labels=rnd)
        tg = self.targets(n, seed, lab.num_classes)  # Alg. 1 part 2: a kept cluster, uniformly
        x = self.timed(f"{m}: generate", lambda: self.generate(
            f"gen-{m}-{key(**base, lam=lam, K=K, tau=cfg.tau, d=cfg.drop_rejected, f=cfg.features, syn=cfg.syn_seed, ns=cfg.n_syn, cs=cfg.clf_steps, lr=cfg.clf_lr, w=cfg.clf_width)}",
            n, seed, lambda t: side.guidance(clf, t, lam), tg))
        return x, dict(cluster=tg, scale=lam, K=K, kept=lab.num_classes, sizes=lab.sizes, cohesion=lab.cohesion)

    def evaluate(self, x):
        """metrics.evaluate plus `distinct`: training images reached per band (UMS · N_G / 100), and over
        all bands (`distinct_any`, `ams_any`). Under
        torchrun each rank searches its shard of x and rank 0 merges them; the other ranks get None."""
        sim = self.cfg.similarity
        shard = (self.rank, self.world) if 1 < self.world <= len(x) else None
        if shard is None and self.rank != 0:
            return None
        ev = self.timed("metrics", lambda: metrics.evaluate(
            x, self.ds.images, similarity=sim if sim in ("l2", "sscd") else "embed",
            embed={"l2": None, "sscd": self.sscd}.get(sim, sim),
            device=self.device, shard=shard))
        if shard is not None:
            parts = [None] * self.world if self.rank == 0 else None
            dist.gather_object(ev, parts, dst=0)
            if self.rank != 0:
                return None
            ev = metrics.merge(parts)
        ev["distinct"] = {b: int(len(i)) for b, i in ev["ums_index"].items()}
        ev["distinct_any"] = len(set().union(*[set(np.asarray(i).tolist()) for i in ev["ums_index"].values()]))
        ev["ams_any"] = float(sum(ev["ams"].values()))  # bands are disjoint: % of generations in any band
        return ev


def main(argv=None):
    cfg = parse_config(ExtractConfig, argv, __doc__.split("\n\n")[0])
    validate(cfg)
    t0 = time.time()
    run = Run(cfg)
    chosen = dict(lam=cfg.lam, K=cfg.K, cond_scale=None if cfg.cond_scale == -1 else cfg.cond_scale)
    sweeps = {}
    if cfg.sweep_lambda:
        sweeps["lambda"] = sweep(run, "lambda", cfg.sweep_lambda, cfg, "side", lambda v: dict(lam=v, K=cfg.K))
        chosen["lam"] = run.agree(best_of(sweeps["lambda"]) if run.rank == 0 else None)  # rank 0 evaluated
    if cfg.sweep_k:
        sweeps["K"] = sweep(run, "K", [int(k) for k in cfg.sweep_k], cfg, "side", lambda v: dict(lam=chosen["lam"], K=v))
        chosen["K"] = run.agree(best_of(sweeps["K"]) if run.rank == 0 else None)
    if cfg.sweep_cond_scale:  # Carlini Cond's guidance scale, swept like λ
        sweeps["cond_scale"] = sweep(run, "cond_scale", cfg.sweep_cond_scale, cfg, "cond", lambda v: dict(cond_scale=v))
        chosen["cond_scale"] = run.agree(best_of(sweeps["cond_scale"]) if run.rank == 0 else None)
    if sweeps:
        check_previous(cfg, chosen)
    results, samples = {}, {}
    for m in cfg.methods.split(","):
        x, info = run.method(m, cfg.n_gen, cfg.seed, lam=chosen["lam"], K=chosen["K"], cond_scale=chosen["cond_scale"])
        samples[m] = (x, info)
        ev = run.evaluate(x)  # every rank searches a shard; rank 0 gets the result
        if run.rank == 0:
            results[m] = dict(ev, **{k: v for k, v in info.items() if k not in ("cluster",)})
            run.log(f"[{m}] AMS {ev['ams']} UMS {ev['ums']} p95 {ev['p95']:.4f}")
    budget = curves(run, cfg, samples) if cfg.curve_points > 0 else {}
    if run.rank == 0:
        write_outputs(run, cfg, chosen, results, samples, sweeps, time.time() - t0, budget)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


def write_outputs(run, cfg, chosen, results, samples, sweeps, seconds, budget=None):
    """samples.npz, metrics.json, REPORT.md and grids/ of every method run in run.out with these settings:
    the methods of earlier runs there are kept beside the new ones (check_previous made sure they match);
    with --overwrite, whatever was there (grids and sweeps of methods not rerun included) goes."""
    ms = list(samples)
    old = None if cfg.overwrite else previous(run.out)
    kept = [m for m in (old or {}).get("methods", {}) if m not in ms]
    kept = kept if os.path.exists(os.path.join(run.out, "samples.npz")) else []  # their images are gone
    cols = dict(images=[samples[m][0] for m in ms], method=[[m] * len(samples[m][0]) for m in ms],
                cluster=[samples[m][1].get("cluster", np.full(len(samples[m][0]), -1)) for m in ms],
                index=[np.arange(len(samples[m][0])) for m in ms])
    if kept:
        with np.load(os.path.join(run.out, "samples.npz")) as z:
            rows = np.isin(z["method"], kept)
            for k in cols:
                cols[k].append(z[k][rows])
    cols = {k: np.concatenate(v) for k, v in cols.items()}
    buf = io.BytesIO()
    np.savez(buf, **cols, seed=np.full(len(cols["images"]), cfg.seed))
    atomic_write_bytes(os.path.join(run.out, "samples.npz"), buf.getvalue())
    public = {m: {k: v for k, v in r.items() if k not in ("nn_index", "nn_value", "carlini_ratio", "yoon_ratio", "ums_index")}
              for m, r in results.items()}
    public = dict({m: old["methods"][m] for m in kept}, **json.loads(json.dumps(public, default=_plain)))
    atomic_write_json(os.path.join(run.out, "metrics.json"), dict(
        config=dict(dataclasses.asdict(cfg), methods=",".join(public)), chosen=chosen, methods=public,
        classifiers=dict((old or {}).get("classifiers", {}), **run.reports),
        curves=dict((old or {}).get("curves", {}), **(budget or {})),
        seconds=dict(run.t, total=seconds), device=str(run.device)))
    grids = os.path.join(run.out, "grids")
    os.makedirs(grids, exist_ok=True)
    for f in os.listdir(grids):  # a grid never outlives its method's results
        if f.endswith(".png") and f[:-4] not in public:
            os.unlink(os.path.join(grids, f))
    if cfg.overwrite:
        for name in ("lambda", "K", "cond_scale"):
            for ext in ("json", "png"):
                path = os.path.join(run.out, f"sweep_{name}.{ext}")
                if name not in sweeps and os.path.exists(path):
                    os.unlink(path)
    for m in ms:
        grid_of_matches(os.path.join(grids, f"{m}.png"), samples[m][0], run.ds.images, results[m], top=cfg.grid_top)
    text = [f"# Extraction report: {cfg.ckpt}", "",
            f"N_G = {cfg.n_gen} per method, {cfg.sampler} {cfg.sample_steps} steps, η = {cfg.eta}, seed {cfg.seed}; "
            f"training set: {len(run.ds.images)} images ({run.ds.source}); λ = {chosen['lam']}, K = {chosen['K']}, τ = {cfg.tau}.", "",
            extraction_table(public), "", "Stage times of this run (s): " + ", ".join(f"{k} {v:.1f}" for k, v in run.t.items()) +
            f"; total {seconds:.1f}." + (f" Methods {', '.join(kept)} come from an earlier run with these settings." if kept else ""), ""]
    atomic_write_text(os.path.join(run.out, "REPORT.md"), "\n".join(text))
    print("\n".join(text))


def _plain(v):
    """numpy scalars and arrays as JSON values (what atomic_write_json would do through json.dumps)."""
    return v.tolist() if hasattr(v, "tolist") else str(v)


if __name__ == "__main__":
    run_main(main)
