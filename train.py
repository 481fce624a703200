"""Train the target model: a DDPM (ddpm.py) on the built-in faces, IDX files (fashion-mnist), an image folder or an .npz.

    python train.py --out runs/n64 --n-train 64 --steps 2000            # unconditional
    python train.py --out runs/n64-lab --labels true                    # informative labels
    python train.py --out runs/n64 --resume                             # continue an interrupted run
    torchrun --nproc_per_node=2 train.py --out runs/n64 ...             # several processes (DDP)

The model is the ε- (or v-) prediction DDPM of Ho et al. 2020 (loss Eq. 14); `--labels` trains it
unconditionally, with the data's true labels (the paper's Definition 2, "informative label") or
with random labels of the same cardinality. AdamW with linear warm-up, gradient clipping, an EMA of
the weights (used for sampling). A checkpoint (`OUT/ckpt.pt`, written atomically with a checksum)
holds model, EMA, optimiser, step, RNG state and the whole config, so `load_trained` rebuilds the
model from it alone and `--resume` continues bit-for-bit where a run stopped. Under torchrun the
global batch is split across ranks; every rank draws the same global batch from the same RNG and
takes its slice, so N processes follow the 1-process run up to float reduction order (with --dropout 0,
the default; dropout masks are drawn per rank). `--amp bf16`, `--channels-last` and `--compile` are the
GPU fast path (bf16 autocast over fp32 master weights), all off by default so the default is exact fp32.
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import data
import ddpm
from runtime import autocast, local_device, setup_distributed  # shared with extract.py; train.autocast etc. still resolve
from common import (Progress, UserError, atomic_write_json, check, check_fields, check_writable, option, load_checkpoint,
                    parse_config, resolve_device, run_main, save_checkpoint)


@dataclass
class TrainConfig:
    out: str = option("runs/model", "output folder: ckpt.pt, config.json, samples.png", nonempty=True)
    data: str = option("faces", "faces (built-in), fashion-mnist, mnist, a folder of images or IDX files, or an .npz "
                      "with an `images` array; the model's channels are the data's (grey 1, colour 3)", nonempty=True)
    n_train: int = option(64, "training-set size (a folder/npz: a nested random sample drawn with --data-seed); small sets are what DDPMs memorize", lo=1)
    image_size: int = option(16, "resolution; 16 px is what trains to memorization on a 2-core CPU in minutes", lo=8)
    data_seed: int = option(0, "seed of the training set: the built-in faces, or the sample of a folder/npz", lo=0)
    label_attr: str = option("", "built-in faces: attribute(s) forming the true label, e.g. hair_color,skin_tone; '' = data.py default")
    labels: str = option("none", "class conditioning: none, true (informative labels) or random (same cardinality)",
                        choices=["none", "true", "random"])
    base: int = option(32, "UNet base width; 32 keeps a 16-px model near 0.7M parameters", lo=8)
    mults: tuple = option((1, 2), "width multiplier per resolution level (one downsampling between levels)", elem=int, lo=1, nonempty=True)
    num_res_blocks: int = option(1, "residual blocks per level (Ho et al. use 2; 1 halves the cost)", lo=1)
    attn_res: tuple = option((8,), "resolutions with self-attention (Ho et al.: 16 at 32 px)", elem=int, lo=1)
    dropout: float = option(0.0, "dropout in residual blocks; 0 since memorization is what we study", lo=0.0, lt=1.0)
    T: int = option(1000, "diffusion steps (Ho et al. 2020)", lo=2)
    schedule: str = option("linear", "beta schedule", choices=["linear", "cosine"])
    prediction: str = option("v", "network target: eps (Ho et al.) or v (Salimans & Ho 2022); reproduce.py uses eps with "
                            "the cosine schedule, which memorized sooner in its CPU calibration", choices=["eps", "v"])
    steps: int = option(1500, "optimiser steps; reproduce's cpu profile: 1,600 at batch 16 memorize 16 faces (8 px) fully, 32 partly", lo=1)
    batch: int = option(32, "global batch (split across torchrun ranks)", lo=1)
    lr: float = option(2e-3, "AdamW learning rate; 2e-3 trains a 0.7M-param model in 1-2k steps (2e-4 is typical at scale)", gt=0.0)
    warmup: int = option(100, "linear learning-rate warm-up steps", lo=0)
    weight_decay: float = option(0.0, "AdamW weight decay; 0 does not fight memorization", lo=0.0)
    grad_clip: float = option(1.0, "gradient-norm clip (Ho et al. 2020)", gt=0.0)
    ema_decay: float = option(0.995, "EMA decay per step; short runs need a short EMA horizon (~200 steps)", lo=0.0, lt=1.0)
    seed: int = option(0, "seed of initialisation, batches, timesteps and noise", lo=0)
    ckpt_every: int = option(250, "steps between checkpoints", lo=1)
    sample_n: int = option(64, "EMA samples drawn into samples.png at the end (0 = none)", lo=0)
    sample_steps: int = option(50, "DDIM steps for that grid", lo=1, hi="T")
    device: str = option("auto", "auto, cpu or cuda[:N]", nonempty=True)
    resume: bool = option(False, "continue from OUT/ckpt.pt (config must match, except steps and logging)")
    overwrite: bool = option(False, "start afresh in an --out that holds a run, replacing its checkpoint and samples")
    log_every: float = option(10.0, "seconds between progress lines", lo=0.0)
    amp: str = option("off", "mixed precision: bf16 autocast with fp32 master weights (a GPU speed-up; off is exact fp32)",
                     choices=["off", "bf16"])
    channels_last: bool = option(False, "channels-last memory layout (faster convolutions on tensor-core GPUs)")
    compile: bool = option(False, "torch.compile the UNet (a GPU speed-up after a minute of compiling; needs a C++ compiler)")
    dry_run: bool = option(False, "check every option against --out and exit (reproduce.py's check before any training)")


# Fields that may differ between a checkpoint and the run resuming it.
RESUMABLE = {"steps", "ckpt_every", "sample_n", "sample_steps", "device", "resume", "overwrite", "log_every", "out",
             "channels_last", "compile", "dry_run"}
# Fields that define the network's shape (checked when loading a checkpoint elsewhere).
MODEL_FIELDS = ("image_size", "base", "mults", "num_res_blocks", "attn_res", "dropout")


def validate_model(cfg):
    """What links the UNet's shape fields (train.py's and bench.py's): one halving per extra level."""
    check(cfg.image_size % 2 ** (len(cfg.mults) - 1) == 0,
          f"--image-size {cfg.image_size} must be divisible by 2^(levels-1) = {2 ** (len(cfg.mults) - 1)}")
    check(cfg.base % 8 == 0, f"--base {cfg.base} must be a positive multiple of 8")


def validate(cfg):
    """Every option before any work: declared ranges (common.check_fields), then what links fields and files."""
    check_fields(cfg)
    validate_model(cfg)
    check(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other; pick one")
    check_writable(cfg.out, "--out")
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{ckpt_path} exists; pass --resume to continue it, --overwrite to replace it, or choose another --out")
    if cfg.resume and not os.path.exists(ckpt_path):  # reproduce.py always passes --resume, so not an error
        print(f"note: --resume: {ckpt_path} does not exist yet; starting a new run", file=sys.stderr)


def model_args(cfg, num_classes, channels=3):
    """The ddpm.UNet constructor kwargs a config describes, with the data's channels (1 grey, 3 RGB: a
    property of the data, not of the config); stored in checkpoints as `model_args`, so
    `ddpm.UNet(**ck["model_args"])` rebuilds the network without this file."""
    return dict(image_size=cfg.image_size, channels=channels, base=cfg.base, mults=tuple(cfg.mults),
                num_res_blocks=cfg.num_res_blocks, attn_res=tuple(cfg.attn_res), num_classes=num_classes,
                dropout=cfg.dropout)


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
    k = int(ds.labels.max()) + 1
    y = ds.labels if cfg.labels == "true" else data.random_labels(len(ds.labels), k, cfg.seed)
    return torch.as_tensor(y, dtype=torch.long), k


def load_trained(path, device="cpu", expect_size=None):
    """(EMA model in eval mode, diffusion, config dict, checkpoint) rebuilt from a checkpoint alone."""
    ckpt = load_checkpoint(path)
    if not (isinstance(ckpt, dict) and {"config", "ema", "num_classes"} <= set(ckpt)):
        raise UserError(f"{path} is not a model checkpoint from train.py (an extraction cache file?); "
                        "pass the ckpt.pt that train.py wrote")
    try:
        cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
        check_fields(cfg)  # e.g. a schedule name this code does not know
        model, diffusion = build(cfg, ckpt["num_classes"], device, ckpt.get("model_args", {}).get("channels", 3))
        model.load_state_dict(ckpt["ema"])
    except (KeyError, RuntimeError, TypeError, ValueError, UserError) as e:
        raise UserError(f"{path} does not match this code's model ({str(e).splitlines()[0]}); retrain it with train.py") from None
    if expect_size is not None and expect_size != cfg.image_size:
        raise UserError(f"{path} was trained at {cfg.image_size} px but the data is {expect_size} px; "
                        f"pass --image-size {cfg.image_size} or use a matching checkpoint")
    return model.eval().requires_grad_(False), diffusion, cfg, ckpt


def lr_at(cfg, step):
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))  # linear warm-up, then constant


def train(cfg):
    """The training loop; returns the final checkpoint dict. Pure of argv, prints progress to stderr."""
    validate(cfg)
    device = local_device(resolve_device(cfg.device))
    rank, world = setup_distributed(device)
    check(cfg.batch % world == 0, f"--batch {cfg.batch} must be divisible by the number of processes ({world})")
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    ds = data.load_data(cfg.data, cfg.image_size, n=cfg.n_train, seed=cfg.data_seed, label_attr=cfg.label_attr or None)
    x_all = data.to_tensor(ds.images).to(device)
    y_all, num_classes = training_labels(cfg, ds)
    y_all = None if y_all is None else y_all.to(device)

    torch.manual_seed(cfg.seed)
    model, diffusion = build(cfg, num_classes, device, ds.channels)  # channels: the data's (1 grey, 3 RGB)
    ema = build(cfg, num_classes, device, ds.channels)[0]  # EMA of the weights, used for sampling
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)  # batches, timesteps, noise: the whole data stream
    step = 0
    if os.path.exists(ckpt_path) and not cfg.overwrite:  # validate() refused it without --resume
        ckpt = load_checkpoint(ckpt_path)
        default = dataclasses.asdict(TrainConfig())  # a field newer than the checkpoint had its default
        diff = sorted(k for k, v in dataclasses.asdict(cfg).items()
                      if k not in RESUMABLE and json.dumps(ckpt["config"].get(k, default[k])) != json.dumps(v))
        if diff:
            was = ", ".join(f"{k}={ckpt['config'].get(k)!r}" for k in diff)
            raise UserError(f"{ckpt_path} was trained with a different config ({was}); "
                            "use the same flags to resume, --overwrite, or another --out")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        step = ckpt["step"]
    if world > 1:  # a node that cannot see OUT/ckpt.pt would start over while the others resume
        steps = [None] * world
        dist.all_gather_object(steps, step)
        check(len(set(steps)) == 1, f"ranks would start from different steps {steps}: {ckpt_path} is not the same "
              "file on every node; put --out on a filesystem all nodes share")
    if cfg.channels_last:  # before DDP wraps it; the state dict keeps its values, so checkpoints are unchanged
        model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    fwd = torch.compile(ddp) if cfg.compile else ddp
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.overwrite and os.path.exists(os.path.join(cfg.out, "samples.png")):  # never outlives its model
            os.unlink(os.path.join(cfg.out, "samples.png"))
        atomic_write_json(os.path.join(cfg.out, "config.json"), dataclasses.asdict(cfg))

    def snapshot():
        return dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                    rng=gen.get_state(), torch_rng=torch.get_rng_state(), config=dataclasses.asdict(cfg),
                    num_classes=num_classes, n_train=len(ds.images), source=ds.source,
                    model_args=model_args(cfg, num_classes, ds.channels))

    n_local = cfg.batch // world
    prog = Progress("train", cfg.steps - step, "step", every=cfg.log_every, enabled=rank == 0)
    t0, losses = time.time(), []
    while step < cfg.steps:
        idx = torch.randint(len(x_all), (cfg.batch,), generator=gen)  # the same global batch on every rank
        t = torch.randint(cfg.T, (cfg.batch,), generator=gen)
        noise = torch.randn((cfg.batch,) + tuple(x_all.shape[1:]), generator=gen)
        sl = slice(rank * n_local, (rank + 1) * n_local)
        x0, t, noise = x_all[idx[sl].to(device)], t[sl].to(device), noise[sl].to(device)
        y = None if y_all is None else y_all[idx[sl].to(device)]
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        with autocast(cfg.amp, device):  # bf16 activations under --amp bf16; parameters and optimiser stay fp32
            loss = diffusion.loss(fwd, x0, t, noise, y).float().mean()  # Eq. (14)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the ranks' gradients: equal slices make it the global-batch mean
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        loss = loss.detach()
        if world > 1:  # the global-batch loss, so every rank logs and stops on the same number
            dist.all_reduce(loss)
            loss /= world
        if not (torch.isfinite(loss) and torch.isfinite(gnorm)):
            raise UserError(f"training loss became {loss.item()} at step {step}; the last good checkpoint "
                            f"{ckpt_path} is kept; lower --lr (now {cfg.lr}) or --grad-clip and --resume")
        opt.step()
        step += 1
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - cfg.ema_decay)
        losses.append(loss.item())
        prog.update(1, f"step {step} loss {np.mean(losses[-50:]):.4f} lr {lr_at(cfg, step - 1):.2e} "
                       f"img/s {cfg.batch * len(losses) / (time.time() - t0):.0f}")
        if rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.steps):
            save_checkpoint(snapshot(), ckpt_path)
    if world > 1:
        dist.barrier()
    return snapshot()


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])
    if cfg.dry_run:
        return validate(cfg)
    t0 = time.time()
    state = train(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and cfg.sample_n > 0:
        model, diffusion, _, _ = load_trained(os.path.join(cfg.out, "ckpt.pt"), resolve_device(cfg.device))
        x = diffusion.sample(model, cfg.sample_n, ddpm.sample_generators(cfg.seed, range(cfg.sample_n)),
                             steps=cfg.sample_steps, eta=1.0)
        data.save_grid(data.to_uint8(x), os.path.join(cfg.out, "samples.png"), nrow=int(math.sqrt(cfg.sample_n)))
    if rank == 0:
        print(f"trained {state['step']} steps in {time.time() - t0:.0f}s -> {cfg.out}/ckpt.pt", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
