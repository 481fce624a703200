"""Train the target model: a DDPM (ddpm.py) on the built-in faces, IDX files (fashion-mnist), an
image folder or an .npz.

    python train.py --out runs/n64 --n-train 64 --steps 2000    # unconditional
    python train.py --out runs/n64-lab --labels true            # informative labels
    python train.py --out runs/n64 --resume                     # continue an interrupted run
    torchrun --nproc_per_node=2 train.py --out runs/n64 ...     # several processes (DDP)

The model is the ε- (or v-) prediction DDPM of Ho et al. 2020 (loss: Ho et al. Eq. 14); `--labels`
trains it unconditionally, with the data's true labels (SIDE Definition 2, "informative label") or
with random labels of the same cardinality. AdamW with linear warm-up, gradient clipping, an EMA of
the weights (used for sampling). A checkpoint (`OUT/ckpt.pt`, written atomically with a checksum)
holds model, EMA, optimiser, step, RNG state, the whole config and a hash of the training images, so
`load_trained` rebuilds the model from it alone and `--resume` continues bit-for-bit where a run
stopped (and refuses images that changed). Every check runs before anything is written; the run then
holds a lock on --out (a second run into it is refused), and `--overwrite` replaces the earlier
run's files only once its first checkpoint exists, so an interrupted overwrite leaves the old run
whole. Under torchrun the global batch is split across ranks; every rank draws the same global batch
from the same RNG and takes its slice, so N processes follow the 1-process run up to float reduction
order (with --dropout 0, the default; dropout masks are drawn per rank). `--amp bf16`,
`--channels-last` and `--compile` are the GPU fast path (bf16 autocast over fp32 master weights),
all off by default so the default is exact fp32.
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

import data
import ddpm
import models
from common import (MAX_CLASSES, MAX_IMAGE_SIZE, MAX_T, Progress, UserError, array_digest,
                    atomic_write_json, autocast, check, check_fields, check_memory,
                    check_writable, folder_lock, load_checkpoint, local_device, option,
                    parse_config, resolve_device, run_main, save_checkpoint, setup_distributed,
                    shutdown)


# UNet base width: DDPMs use 64-256 (ADM's widest base, 256); beyond, parameters alone are GBs
MAX_WIDTH = 1024
MAX_MULT = 16  # width multiplier of a level (DDPMs use 1-8)
MAX_RES_BLOCKS = 16  # residual blocks per level (DDPMs use 1-3)
MAX_SAMPLE_N = 1024  # samples.png is a preview drawn in one batch; more would not be looked at
# a ResBlock keeps at least 4 activations of its output's size for backward (GN, SiLU, conv in/out)
ACT_TENSORS = 4


@dataclass
class TrainConfig:
    out: str = option("runs/model", "output folder: ckpt.pt, config.json, samples.png",
                      nonempty=True)
    data: str = option("faces", "faces (built-in), fashion-mnist, mnist, a folder of images or IDX "
                       "files, or an .npz with an `images` array; the model's channels are the "
                       "data's (grey 1, colour 3)", nonempty=True)
    n_train: int = option(64, "training-set size (a folder/npz: a nested random sample drawn with "
                          "--data-seed); small sets are what DDPMs memorize", lo=1)
    image_size: int = option(16, "resolution (reproduce.py trains at 8 px: at 16 px its CPU-budget "
                             "models did not memorize)", lo=8, hi=MAX_IMAGE_SIZE)
    data_seed: int = option(0, "seed of the training set: the built-in faces, or the sample of a "
                            "folder/npz", lo=0)
    label_attr: str = option("", "built-in faces: attribute(s) forming the true label, e.g. "
                             "hair_color,skin_tone; '' = data.py default")
    labels: str = option("none", "class conditioning: none, true (informative labels) or random "
                         "(a seeded permutation of the true labels: the same classes and class "
                         "sizes)", choices=["none", "true", "random"])
    base: int = option(32, "UNet base width; 32 keeps a 16-px model near 0.7M parameters", lo=8,
                       hi=MAX_WIDTH)
    mults: tuple = option((1, 2), "width multiplier per resolution level (one downsampling between "
                          "levels)", elem=int, lo=1, hi=MAX_MULT, nonempty=True)
    num_res_blocks: int = option(1, "residual blocks per level (Ho et al. use 2; 1 halves the "
                                 "cost)", lo=1, hi=MAX_RES_BLOCKS)
    attn_res: tuple = option((8,), "resolutions with self-attention (Ho et al.: 16 at 32 px)",
                             elem=int, lo=1)
    dropout: float = option(0.0, "dropout in residual blocks; 0 since memorization is what we "
                            "study", lo=0.0, lt=1.0)
    T: int = option(1000, "diffusion steps (Ho et al. 2020)", lo=2, hi=MAX_T)
    schedule: str = option("linear", "beta schedule", choices=["linear", "cosine"])
    prediction: str = option("v", "network target: eps (Ho et al.) or v (Salimans & Ho 2022); "
                             "reproduce.py uses eps with the cosine schedule, which memorized "
                             "sooner in its CPU calibration", choices=["eps", "v"])
    steps: int = option(1500, "optimiser steps (reproduce's cpu profile: 800 epochs at batch "
                        "min(128, n) partly memorize 16-64 faces at 8 px)", lo=1)
    batch: int = option(32, "global batch (split across torchrun ranks)", lo=1)
    lr: float = option(2e-3, "AdamW learning rate; 2e-3 trains a 0.7M-param model in 1-2k steps "
                       "(2e-4 is typical at scale)", gt=0.0)
    warmup: int = option(100, "linear learning-rate warm-up steps", lo=0)
    weight_decay: float = option(0.0, "AdamW weight decay; 0 does not fight memorization", lo=0.0)
    grad_clip: float = option(1.0, "gradient-norm clip (Ho et al. 2020)", gt=0.0)
    ema_decay: float = option(0.995, "EMA decay per step; short runs need a short EMA horizon "
                              "(~200 steps)", lo=0.0, lt=1.0)
    seed: int = option(0, "seed of initialisation, batches, timesteps and noise", lo=0)
    ckpt_every: int = option(250, "steps between checkpoints", lo=1)
    sample_n: int = option(64, "EMA samples drawn into samples.png at the end (0 = none), in one "
                           "batch", lo=0, hi=MAX_SAMPLE_N)
    sample_steps: int = option(50, "DDIM steps for that grid", lo=1, hi="T")
    device: str = option("auto", "auto, cpu or cuda[:N]", nonempty=True)
    resume: bool = option(False, "continue from OUT/ckpt.pt (config must match, except steps and "
                          "logging)")
    overwrite: bool = option(False, "start afresh in an --out that holds a run, replacing its "
                             "checkpoint and samples")
    log_every: float = option(10.0, "seconds between progress lines", lo=0.0)
    amp: str = option("off", "mixed precision: bf16 autocast with fp32 master weights (a GPU "
                      "speed-up; off is exact fp32)", choices=["off", "bf16"])
    channels_last: bool = option(False, "channels-last memory layout (faster convolutions on "
                                 "tensor-core GPUs)")
    compile: bool = option(False, "torch.compile the UNet (a GPU speed-up after a minute of "
                           "compiling; needs a C++ compiler)")
    keep: tuple = option((), "also keep the checkpoint at these steps as ckpt-STEP.pt (a "
                         "less-trained model of the same run, e.g. reproduce's weakly memorized "
                         "arm)", elem=int, lo=1)
    dry_run: bool = option(False, "check every option against --out and exit (reproduce.py's "
                           "check before any training)")


# Fields that may differ between a checkpoint and the run resuming it.
RESUMABLE = {"keep", "steps", "ckpt_every", "sample_n", "sample_steps", "device", "resume",
             "overwrite", "log_every", "out", "channels_last", "compile", "dry_run"}


def validate_model(cfg):
    """What links the UNet's shape fields (train.py's and tools/bench.py's): one halving per extra
    level."""
    check(cfg.image_size % 2 ** (len(cfg.mults) - 1) == 0,
          f"--image-size {cfg.image_size} must be divisible by 2^(levels-1) = "
          f"{2 ** (len(cfg.mults) - 1)}")
    check(cfg.base % 8 == 0, f"--base {cfg.base} must be a positive multiple of 8")


def validate(cfg):
    """Every option before any work: declared ranges (common.check_fields), then what links fields
    and files."""
    check_fields(cfg)
    validate_model(cfg)
    levels = [cfg.image_size // 2 ** i for i in range(len(cfg.mults))]
    unused = [r for r in cfg.attn_res if r not in levels]
    check(not unused, f"--attn-res {','.join(map(str, unused))}: no level of the UNet has that "
          f"resolution (levels: {', '.join(map(str, levels))} px at --image-size "
          f"{cfg.image_size} and {len(levels)} --mults); pick among them")
    check(not (cfg.resume and cfg.overwrite),
          "--resume and --overwrite exclude each other; pick one")
    check_writable(cfg.out, "--out")
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{ckpt_path} exists; pass --resume to continue it, --overwrite to replace "
                        "it, or choose another --out")
    # reproduce.py always passes --resume, so not an error
    if cfg.resume and not os.path.exists(ckpt_path):
        print(f"note: --resume: {ckpt_path} does not exist yet; starting a new run",
              file=sys.stderr)


def model_args(cfg, num_classes, channels=3):
    """The ddpm.UNet constructor kwargs a config describes, with the data's channels (1 grey, 3
    RGB: a property of the data, not of the config); stored in checkpoints as `model_args`, so
    `ddpm.UNet(**ck["model_args"])` rebuilds the network without this file."""
    return dict(image_size=cfg.image_size, channels=channels, base=cfg.base, mults=tuple(cfg.mults),
                num_res_blocks=cfg.num_res_blocks, attn_res=tuple(cfg.attn_res),
                num_classes=num_classes, dropout=cfg.dropout)


def build(cfg, num_classes, device, channels=3):
    """The UNet (for images of `channels` channels) and Diffusion a config describes."""
    model = ddpm.UNet(**model_args(cfg, num_classes, channels)).to(device)
    return model, ddpm.Diffusion(cfg.T, cfg.schedule, cfg.prediction, device=device)


def training_labels(cfg, ds):
    """(labels tensor or None, number of classes) for --labels none|true|random."""
    if cfg.labels == "none":
        return None, 0
    if ds.labels is None:
        raise UserError(f"--labels {cfg.labels} needs labels, but {cfg.data} has none; "
                        "use subfolders per class, an .npz with `labels`, or --labels none")
    # the source's classes, present in this sample or not
    k = max(len(ds.label_names), int(ds.labels.max()) + 1)
    check(k <= MAX_CLASSES, f"{cfg.data}: the largest label is {k - 1}, so the model would embed "
          f"{k} classes (at most {MAX_CLASSES}); labels are class indices 0..K-1: renumber them")
    y = ds.labels if cfg.labels == "true" else data.permuted_labels(ds.labels, cfg.seed)
    return torch.as_tensor(y, dtype=torch.long), k


def load_trained(path, device="cpu"):
    """(EMA model in eval mode, diffusion, TrainConfig, checkpoint) rebuilt from a checkpoint
    alone: the one loader, models.load_train, and the checkpoint's config as a TrainConfig."""
    model, diffusion, info = models.load_train(path, device)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in info.checkpoint["config"].items() if k in fields})
    return model.to(device).eval().requires_grad_(False), diffusion, cfg, info.checkpoint


def lr_at(cfg, step):
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))  # linear warm-up, then constant


def memory_floor(cfg, n_train):
    """A lower bound of the bytes training allocates: the training set (uint8 and float32 copies)
    and the activations autograd keeps for one batch (ACT_TENSORS per ResBlock, attention not
    counted)."""
    per_image, r = 0, cfg.image_size
    for level, m in enumerate(cfg.mults):
        # down + up blocks
        per_image += (2 * cfg.num_res_blocks + 1) * ACT_TENSORS * cfg.base * m * r * r * 4
        r = r // 2 if level < len(cfg.mults) - 1 else r
    per_image += 2 * ACT_TENSORS * cfg.base * cfg.mults[-1] * r * r * 4  # the two mid blocks
    return n_train * cfg.image_size ** 2 * 3 * (1 + 4) + cfg.batch * per_image


def resume_state(cfg, ckpt_path, data_id):
    """The checkpoint that --resume continues, checked against this run (config and training
    images), or None for a fresh start; nothing is written."""
    if not os.path.exists(ckpt_path) or cfg.overwrite:  # validate() refused it without --resume
        return None
    ckpt = load_checkpoint(ckpt_path, fix="pass --overwrite to start afresh (no older copy is "
                           "kept) or choose another --out")
    if not (isinstance(ckpt, dict)
            and {"config", "model", "ema", "opt", "rng", "torch_rng", "step"} <= set(ckpt)
            and isinstance(ckpt["config"], dict)):
        raise UserError(f"{ckpt_path} is not a train.py checkpoint that can be resumed; pass "
                        "--overwrite or choose another --out")
    default = dataclasses.asdict(TrainConfig())  # a field newer than the checkpoint had its default
    diff = sorted(k for k, v in dataclasses.asdict(cfg).items()
                  if k not in RESUMABLE
                  and json.dumps(ckpt["config"].get(k, default[k])) != json.dumps(v))
    if diff:
        was = ", ".join(f"{k}={ckpt['config'].get(k)!r}" for k in diff)
        raise UserError(f"{ckpt_path} was trained with a different config ({was}); "
                        "use the same flags to resume, --overwrite, or another --out")
    if "data_sha256" not in ckpt:
        print(f"note: {ckpt_path} records no hash of its training images (an older train.py wrote "
              "it), so --resume cannot check that --data still holds the same images",
              file=sys.stderr)
    elif ckpt["data_sha256"] != data_id:
        raise UserError(f"{ckpt_path} was trained on other images than --data {cfg.data} holds "
                        "now (their hash changed); restore those images, or pass --overwrite to "
                        "train afresh, or choose another --out")
    return ckpt


def ckpt_seen(ckpt_path):
    """What the checks saw of OUT/ckpt.pt ((size, mtime) or None), compared again under the lock."""
    return ((os.stat(ckpt_path).st_size, os.stat(ckpt_path).st_mtime_ns)
            if os.path.exists(ckpt_path) else None)


def prepare(cfg, device):
    """Every check of a run before anything is written (validate() ran): memory, the data (and its
    labels), and the checkpoint that --resume continues. Returns what `setup` needs."""
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    check_memory(memory_floor(cfg, cfg.n_train), device,
                 f"training {cfg.n_train} images at {cfg.image_size} px in batches of {cfg.batch}",
                 "lower --n-train, --batch, --image-size or --base")
    ds = data.load_data(cfg.data, cfg.image_size, n=cfg.n_train, seed=cfg.data_seed,
                        label_attr=cfg.label_attr or None)
    y_all, num_classes = training_labels(cfg, ds)
    # what --resume must find unchanged
    data_id = array_digest(ds.images, None if y_all is None else ds.labels)
    seen, ckpt = ckpt_seen(ckpt_path), resume_state(cfg, ckpt_path, data_id)
    return SimpleNamespace(ckpt_path=ckpt_path, ds=ds, y_all=y_all, num_classes=num_classes,
                           data_id=data_id, seen=seen, ckpt=ckpt)


# fused AdamW (one kernel for all parameters; supported on CPU and CUDA): 13 % faster steps at
# reproduce's shapes on a 2-core CPU (tools/bench.py), the same update up to float rounding
FUSED = dict(fused=True)


@dataclass
class State:
    """Everything a training run carries from step to step; `setup` makes it, the loop advances
    it."""
    cfg: TrainConfig
    ds: data.Dataset
    data_id: str  # hash of the training images (and labels): what --resume must find unchanged
    x_all: torch.Tensor  # training images, float NCHW in [-1, 1], on the device
    y_all: torch.Tensor | None  # their labels (None: unconditional)
    num_classes: int
    model: torch.nn.Module
    ema: torch.nn.Module  # EMA of the weights, used for sampling
    diffusion: ddpm.Diffusion
    opt: torch.optim.Optimizer
    gen: torch.Generator  # batches, timesteps, noise: the whole data stream
    step: int = 0
    torch_rng: torch.Tensor | None = None  # the global RNG state to record (None: the current one)
    # a checkpoint of this run was saved (an --overwrite run has replaced the old one)
    saved: bool = False

    def draw(self):
        """The next global batch (x_0, t, ε[, y]) from the run's generator: the same stream on
        every rank, and the same whether the model trains alone (train.py) or in an ensemble
        (ensemble.py)."""
        cfg = self.cfg
        idx = torch.randint(len(self.x_all), (cfg.batch,), generator=self.gen)
        t = torch.randint(cfg.T, (cfg.batch,), generator=self.gen)
        noise = torch.randn((cfg.batch,) + tuple(self.x_all.shape[1:]), generator=self.gen)
        idx = idx.to(self.x_all.device)
        return self.x_all[idx], t, noise, (None if self.y_all is None else self.y_all[idx])

    @property
    def snapshot(self):
        """The checkpoint: model, EMA, optimiser, step, RNG states and the whole config."""
        return dict(model=self.model.state_dict(), ema=self.ema.state_dict(),
                    opt=self.opt.state_dict(), step=self.step, rng=self.gen.get_state(),
                    torch_rng=torch.get_rng_state() if self.torch_rng is None else self.torch_rng,
                    config=dataclasses.asdict(self.cfg), num_classes=self.num_classes,
                    n_train=len(self.ds.images), source=self.ds.source, data_sha256=self.data_id,
                    model_args=model_args(self.cfg, self.num_classes, self.ds.channels))


def setup(cfg, device, run):
    """Model, EMA, optimiser and data stream of a run (`run` from prepare), initialised from
    cfg.seed, or restored from the checkpoint --resume continues."""
    x_all = data.to_tensor(run.ds.images).to(device)
    y_all = None if run.y_all is None else run.y_all.to(device)
    torch.manual_seed(cfg.seed)
    # channels: the data's (1 grey, 3 RGB)
    model, diffusion = build(cfg, run.num_classes, device, run.ds.channels)
    ema = build(cfg, run.num_classes, device, run.ds.channels)[0]
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **FUSED)
    st = State(cfg, run.ds, run.data_id, x_all, y_all, run.num_classes, model, ema, diffusion, opt,
               torch.Generator().manual_seed(cfg.seed))
    if run.ckpt is not None:
        st.step = restore(run.ckpt, run.ckpt_path, model, ema, opt, st.gen)
    return st


def restore(ckpt, ckpt_path, model, ema, opt, gen):
    """Load a resumed checkpoint's weights, optimiser and RNG states; returns its step."""
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        return int(ckpt["step"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"{ckpt_path} does not fit this model ({str(e).splitlines()[0][:120]}); "
                        "pass --overwrite to start afresh or choose another --out") from None


def train(cfg, finish=None):
    """The training loop; returns the final checkpoint dict. Pure of argv, prints progress to
    stderr. Every check runs first (validate, prepare); then rank 0 holds --out's lock while it
    writes. With --overwrite the earlier run's files stay whole until the first new checkpoint
    replaces them (an interrupted overwrite leaves the old run as it was). finish(state): called at
    the end on rank 0 under the lock."""
    validate(cfg)
    device = local_device(resolve_device(cfg.device))
    rank, world = setup_distributed(device)
    check(cfg.batch % world == 0,
          f"--batch {cfg.batch} must be divisible by the number of processes ({world})")
    run = prepare(cfg, device)
    st = setup(cfg, device, run)
    if world > 1:  # a node that cannot see OUT/ckpt.pt would start over while the others resume
        check_same_start(st, world, run.ckpt_path)
    fwd = forward_model(cfg, st.model, device, world)
    with folder_lock(cfg.out, "--out", "train.py") if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            begin(cfg, run)
        train_steps(st, fwd, device, rank, world, run.ckpt_path)
        if world > 1:
            dist.barrier()
        state = st.snapshot
        if rank == 0 and finish is not None:
            finish(state)
    return state


def check_same_start(st, world, ckpt_path):
    """Under torchrun: every rank resumes from the same step, i.e. sees the same OUT/ckpt.pt."""
    steps = [None] * world
    dist.all_gather_object(steps, st.step)
    check(len(set(steps)) == 1, f"ranks would start from different steps {steps}: {ckpt_path} is "
          "not the same file on every node; put --out on a filesystem all nodes share")


def forward_model(cfg, model, device, world):
    """What the training steps call: `model` in channels-last layout under --channels-last, wrapped
    in DDP under torchrun and compiled under --compile (its parameters stay `model`'s)."""
    # before DDP wraps it; the state dict keeps its values, so checkpoints are unchanged
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    return torch.compile(ddp) if cfg.compile else ddp


def train_steps(st, fwd, device, rank, world, ckpt_path):
    """The steps from st.step to cfg.steps: each takes this rank's slice of the next global batch
    and one optimiser step (train_step), logs progress and, on rank 0, saves what is due."""
    cfg = st.cfg
    n_local = cfg.batch // world
    prog = Progress("train", cfg.steps - st.step, "step", every=cfg.log_every, enabled=rank == 0)
    t0, losses = time.time(), []
    while st.step < cfg.steps:
        # the same global batch on every rank; this rank takes its slice
        x0, t, noise, y = st.draw()
        sl = slice(rank * n_local, (rank + 1) * n_local)
        x0, t, noise = x0[sl].to(device), t[sl].to(device), noise[sl].to(device)
        y = None if y is None else y[sl].to(device)
        loss = train_step(st, fwd, x0, t, noise, y, device, world, ckpt_path)
        losses.append(loss.item())
        prog.update(1, f"step {st.step} loss {np.mean(losses[-50:]):.4f} "
                       f"lr {lr_at(cfg, st.step - 1):.2e} "
                       f"img/s {cfg.batch * len(losses) / (time.time() - t0):.0f}")
        if rank == 0:
            save_due(st, ckpt_path)


def train_step(st, fwd, x0, t, noise, y, device, world, ckpt_path):
    """One optimiser step on this rank's slice (x0, t, noise, y) of the global batch: warm-up
    learning rate, loss, gradient clip, AdamW, EMA; returns the global-batch loss (detached)."""
    cfg, model, ema, opt, diffusion = st.cfg, st.model, st.ema, st.opt, st.diffusion
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, st.step)
    # bf16 activations under --amp bf16; parameters and optimiser stay fp32
    with autocast(cfg.amp, device):
        loss = diffusion.loss(fwd, x0, t, noise, y).float().mean()  # Ho et al. Eq. 14
    opt.zero_grad(set_to_none=True)
    # DDP averages the ranks' gradients: equal slices make it the global-batch mean
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    loss = loss.detach()
    if world > 1:  # the global-batch loss, so every rank logs and stops on the same number
        dist.all_reduce(loss)
        loss /= world
    if not (torch.isfinite(loss) and torch.isfinite(gnorm)):
        raise UserError(f"training loss became {loss.item()} at step {st.step}; the last good "
                        f"checkpoint {ckpt_path} is kept; lower --lr (now {cfg.lr}) or "
                        "--grad-clip and --resume")
    opt.step()
    st.step += 1
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - cfg.ema_decay)
    return loss


def begin(cfg, run):
    """Under the lock, before the first step: OUT/ckpt.pt must be what the checks saw; a fresh or
    resumed run writes its config.json now (an --overwrite run only once it has replaced the old
    one)."""
    check(ckpt_seen(run.ckpt_path) == run.seen, f"{run.ckpt_path} changed while this run was "
          "checking it (another run into the same --out?); rerun when that run has ended")
    if not cfg.overwrite:  # a fresh or resumed run: nothing of another run to keep
        atomic_write_json(os.path.join(cfg.out, "config.json"), dataclasses.asdict(cfg))


def save_due(st, ckpt_path):
    """After a step: the checkpoint every ckpt_every steps and at the end, a kept copy at --keep
    steps, and, the first time an --overwrite run saves, the end of the run it replaces
    (`replaced`)."""
    cfg = st.cfg
    due = st.step % cfg.ckpt_every == 0 or st.step == cfg.steps
    if st.step in cfg.keep or due:
        snap = st.snapshot
        if st.step in cfg.keep:
            save_checkpoint(snap, os.path.join(cfg.out, f"ckpt-{st.step}.pt"))
        if due:
            save_checkpoint(snap, ckpt_path)
            # the earlier run ends here, not before: its files go with it
            if cfg.overwrite and not st.saved:
                replaced(cfg)
            st.saved = True


def replaced(cfg):
    """--overwrite, once the new run's first checkpoint is saved: its config.json, and no
    samples.png of the model it replaced (a samples.png never outlives its model)."""
    atomic_write_json(os.path.join(cfg.out, "config.json"), dataclasses.asdict(cfg))
    if os.path.exists(os.path.join(cfg.out, "samples.png")):
        os.unlink(os.path.join(cfg.out, "samples.png"))


def write_samples(cfg):
    """samples.png: cfg.sample_n DDIM samples of the EMA model just saved in OUT/ckpt.pt (none if
    0)."""
    if cfg.sample_n == 0:
        return
    model, diffusion, _, _ = load_trained(os.path.join(cfg.out, "ckpt.pt"),
                                          resolve_device(cfg.device))
    x = diffusion.sample(model, cfg.sample_n, ddpm.sample_generators(cfg.seed, range(cfg.sample_n)),
                         steps=cfg.sample_steps, eta=1.0)
    data.save_grid(data.to_uint8(x), os.path.join(cfg.out, "samples.png"),
                   nrow=int(math.sqrt(cfg.sample_n)))


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])
    if cfg.dry_run:
        return validate(cfg)
    t0 = time.time()
    state = train(cfg, finish=lambda _: write_samples(cfg))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print(f"trained {state['step']} steps in {time.time() - t0:.0f}s -> {cfg.out}/ckpt.pt",
              file=sys.stderr)
    shutdown(True)


if __name__ == "__main__":
    run_main(main, interrupted="rerun the same command with --resume to continue from the last "
             "checkpoint")
