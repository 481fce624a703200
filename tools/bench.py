"""Throughput of this machine for the reference implementation: parameter counts, DDPM training
images/s, DDIM and DDPM sampling images/s for the default model at 32 px, and the exact
nearest-neighbour search of metrics.py beside the measured matmul peak.

    python tools/bench.py                # `make bench`: about two minutes on 2 CPU cores
    python tools/bench.py --device cuda --batch 128 --sample-batch 256 --n-nn 50000
    python tools/bench.py --knn-only     # the nearest-neighbour search alone

The model is train.py's default architecture (TrainConfig: base width, mults, attention) at
--image-size 32 (its attention resolution 8 then falls on no level of mults 1,2: only the mid
block, at 16 px, attends); parameters are also counted at TrainConfig's own 16 px. Inputs are
random: throughput does not depend on the pixels. Figures:
  training   images/s = batch x timed steps / seconds, for full optimiser steps (forward, Ho et al.
             Eq. 14 loss, backward, clipping, AdamW, EMA update) after --warmup-steps untimed ones,
             fastest of --repeats;
  sampling   one denoising step is one UNet evaluation plus O(pixels) arithmetic, so the cost is
             linear in the step count: --time-steps steps are timed on a batch of --sample-batch
             (after a 1-step warm-up, fastest of --repeats) and images/s = sample_batch / (seconds
             per step x --sample-steps);
  knn        metrics.knn on n x n random uint8 items of 32x32x3 (bench_knn), pairs/s and GFLOP/s
             next to the float32 matmul peak measured in the same run;
  reproduce  training per size of reproduce.py's profile (--reproduce cpu: 8 px, batch 16 /
             32 / 64), one model alone (train.py) against the profile's replicates as one ensemble
             (ensemble.py), and DDIM sampling (unguided and SIDE-guided) at extract.py's batch, with
             the threads each of reproduce's parallel jobs gets, as images/s and as a fraction of
             the float32 matmul peak of a 2048^3 product measured in the same run and thread count,
             FLOPs counted by torch's FLOP counter.
Every figure is one fixed-format line on stdout (`params`, `train`, `sample ddim`, `sample ddpm`,
`knn`, `reproduce`). A tool, not part of the library: it imports the library files one folder up
(torch, ddpm.py, side.py, train.py, ensemble.py, extract.py, reproduce.py for the profile shapes,
metrics.py, common.py).
"""
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library
import ddpm  # noqa: E402  (the library files, after the path above)
import ensemble
import extract
import metrics
import reproduce
import side
import train
from common import check_fields, option, parse_config, resolve_device, run_main

TC = train.TrainConfig  # the defaults this benchmark measures
# --n-nn: 200,000 x 3,072 bytes per side (CelebA-sized); more is an error line, not an OOM kill
MAX_N_NN = 200_000


@dataclass
class BenchConfig:
    image_size: int = option(32, "resolution of the measured model (the default model at 32 px: "
                                 "an image size users audit)", lo=8)
    base: int = option(TC.base, "UNet base width (train.py's default)", lo=8)
    mults: tuple = option(TC.mults, "width multiplier per level (train.py's "
                                    "default)", elem=int, lo=1, nonempty=True)
    num_res_blocks: int = option(TC.num_res_blocks, "residual blocks per level (train.py's "
                                                    "default)", lo=1)
    attn_res: tuple = option(TC.attn_res, "resolutions with self-attention (train.py's "
                                          "default)", elem=int, lo=1)
    T: int = option(TC.T, "diffusion steps (train.py's default)", lo=2)
    prediction: str = option(TC.prediction, "network target (train.py's default)", choices=["eps",
                                                                                            "v"])
    batch: int = option(TC.batch, "training batch (train.py's default)", lo=1)
    warmup_steps: int = option(2, "untimed optimiser steps first (allocator and kernel selection "
                                  "settle)", lo=0)
    train_steps: int = option(5, "timed optimiser steps; 5 keeps the CPU run to seconds", lo=1)
    sample_batch: int = option(16, "images per sampling batch", lo=1)
    sample_steps: int = option(extract.ExtractConfig.sample_steps, "the step count images/s is "
                                                                   "reported for (extract.py's "
                                                                   "default)", lo=1, hi="T")
    time_steps: int = option(5, "denoising steps actually timed per sampler (scaled to "
                                "--sample-steps)", lo=1, hi="sample_steps")
    repeats: int = option(3, "each timing is repeated and the fastest kept: other jobs on a "
                             "shared machine only slow runs down", lo=1)
    eta: float = option(extract.ExtractConfig.eta, "DDIM η (extract.py's default; the cost does "
                                                   "not depend on it)", lo=0.0, hi=1.0)
    n_nn: int = option(20000, "items per side of the nearest-neighbour benchmark (20,000 x "
                              "20,000: a CelebA-25000-sized search)", lo=1, hi=MAX_N_NN)
    knn_only: bool = option(False, "run only the nearest-neighbour benchmark (the `knn` line)")
    threads: int = option(0, "torch intra-op threads (0 = torch's default, all cores)", lo=0)
    device: str = option("auto", "auto, cpu or cuda[:N]", nonempty=True)
    seed: int = option(0, "seed of the weights, inputs and sampling noise", lo=0)
    reproduce: str = option("cpu", "also measure the model and batch shapes of this reproduce.py "
                                   "profile ('' = skip)",
                           choices=["", *reproduce.PROFILES])
    reproduce_threads: int = option(1, "torch threads for the reproduce shapes: 1 = what each of "
                                       "reproduce.py's two parallel jobs gets on a CPU (0 = as "
                                       "--threads)", lo=0)
    reproduce_steps: int = option(40, "optimiser steps of the timed training runs at the "
                                      "reproduce shapes", lo=4)


def validate(cfg):
    check_fields(cfg)  # the ranges declared above
    train.validate_model(cfg)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def model_config(cfg):
    return TC(image_size=cfg.image_size, base=cfg.base, mults=cfg.mults,
              num_res_blocks=cfg.num_res_blocks,
              attn_res=cfg.attn_res, T=cfg.T, prediction=cfg.prediction, batch=cfg.batch)


def clock(device):
    """Wall time after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench_training(cfg, device):
    """Images/s of full training steps, as train.py takes them (without data loading or
    checkpoints)."""
    tcfg = model_config(cfg)
    torch.manual_seed(cfg.seed)
    model, diffusion = train.build(tcfg, 0, device)
    ema = train.build(tcfg, 0, device)[0].requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, 3, cfg.image_size, cfg.image_size)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device)

    def step():
        t = torch.randint(cfg.T, (cfg.batch,), generator=g).to(device)
        noise = torch.randn(shape, generator=g).to(device)
        loss = diffusion.loss(model, x0, t, noise).mean()  # Ho et al. Eq. 14
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - tcfg.ema_decay)

    for _ in range(cfg.warmup_steps):
        step()
    best = float("inf")
    for _ in range(cfg.repeats):
        t0 = clock(device)
        for _ in range(cfg.train_steps):
            step()
        best = min(best, clock(device) - t0)
    return cfg.batch * cfg.train_steps / best, ema.eval(), diffusion


def bench_sampling(cfg, model, diffusion, sampler, device):
    """Images/s at cfg.sample_steps, from cfg.time_steps timed steps (cost is linear in steps)."""
    gens = lambda: ddpm.sample_generators(cfg.seed, range(cfg.sample_batch))  # noqa: E731
    # warm-up
    diffusion.sample(model, cfg.sample_batch, gens(), steps=1, eta=cfg.eta, sampler=sampler)
    best = float("inf")
    for _ in range(cfg.repeats):
        t0 = clock(device)
        diffusion.sample(model, cfg.sample_batch, gens(), steps=cfg.time_steps, eta=cfg.eta,
                         sampler=sampler)
        best = min(best, clock(device) - t0)
    per_step = best / cfg.time_steps
    return cfg.sample_batch / (per_step * cfg.sample_steps)


def main(argv=None):
    cfg = parse_config(BenchConfig, argv, __doc__.split("\n\n")[0])
    validate(cfg)
    device = resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.knn_only:
        bench_knn(n=cfg.n_nn, device=device)
        return
    where = f"{device}, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    default = train.build(TC(), 0, "cpu")[0]
    print(f"params train-default {TC.image_size}px base {TC.base} mults "
          f"{','.join(map(str, TC.mults))}: {n_params(default)} ({n_params(default) / 1e6:.2f} "
          "M)", flush=True)
    measured = train.build(model_config(cfg), 0, "cpu")[0]
    print(f"params bench-model {cfg.image_size}px base {cfg.base} mults "
          f"{','.join(map(str, cfg.mults))}: {n_params(measured)} ({n_params(measured) / 1e6:.2f} "
          "M)", flush=True)
    ips, model, diffusion = bench_training(cfg, device)
    print(f"train {cfg.image_size}px: {ips:.1f} img/s (batch {cfg.batch}, {cfg.train_steps} timed "
          f"steps after {cfg.warmup_steps} warm-up, best of {cfg.repeats}; {where})", flush=True)
    for sampler in ("ddim", "ddpm"):
        ips = bench_sampling(cfg, model, diffusion, sampler, device)
        print(f"sample {sampler} {cfg.image_size}px: {ips:.2f} img/s at {cfg.sample_steps} steps "
              f"(batch {cfg.sample_batch}, {cfg.time_steps} steps timed, best of {cfg.repeats}, "
              f"scaled x{cfg.sample_steps / cfg.time_steps:g}; {where})", flush=True)
    if cfg.reproduce:
        bench_reproduce(cfg, device, where)
    bench_knn(n=cfg.n_nn, device=device)  # prints its own `knn ...` line


def matmul_peak(m, d, n, dev, reps=5):
    """Best-of-`reps` float32 GFLOP/s of an (m x d) @ (d x n) product, after one warm-up, per
    wall-clock second and per CPU second (the latter is robust to other jobs on a shared CPU)."""
    a, b = torch.randn(m, d, device=dev), torch.randn(d, n, device=dev)
    (a @ b).sum().item()
    wall = cpu = math.inf
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        (a @ b).sum().item()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return 2 * m * d * n / wall / 1e9, 2 * m * d * n / max(cpu, 1e-9) / 1e9


def bench_knn(n=20000, d=3072, block_q=metrics.BLOCK_Q, block_k=metrics.BLOCK_K, device="cpu",
              seed=0):
    """metrics.knn's exact nearest-neighbour throughput on n x n random uint8 items of
    d = 32*32*3, beside the float32 matmul peak of one block_q x d x block_k tile measured in the
    same run (before and after the search, best of both: a busy machine does not flatter the
    ratio)."""
    dev = torch.device(device)
    peak, peak_cpu = matmul_peak(block_q, d, block_k, dev)
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 256, (n, d), generator=g, dtype=torch.uint8)
    Y = torch.randint(0, 256, (n, d), generator=g, dtype=torch.uint8)
    stats, rss0 = {}, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t, c = time.perf_counter(), time.process_time()
    metrics.knn(X, Y, k=1, block_q=block_q, block_k=block_k, device=dev, stats=stats)
    el, cpu = time.perf_counter() - t, time.process_time() - c
    again = matmul_peak(block_q, d, block_k, dev)
    peak, peak_cpu = max(peak, again[0]), max(peak_cpu, again[1])
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    gflops, gflops_cpu = 2 * n * n * d / el / 1e9, 2 * n * n * d / cpu / 1e9
    # the tile, the two blocks, the re-scoring scratch and the norms
    tile = block_q * block_k * 4 + (block_q + block_k) * d * 4 + metrics.CHUNK_BYTES + n * 8 * 3
    res = {"n": n, "d": d, "seconds": el, "cpu_seconds": cpu, "pairs_per_s": n * n / el,
           "gflops": gflops, "matmul_peak_gflops": peak, "fraction_of_peak": gflops / peak,
           "gflops_per_cpu_s": gflops_cpu, "matmul_peak_gflops_per_cpu_s": peak_cpu,
           "cpu_fraction_of_peak": gflops_cpu / peak_cpu, "working_memory_mib": tile / 2 ** 20,
           "peak_rss_growth_mib": rss_growth / 1024, "retried_rows": stats["retried_rows"],
           "device": str(dev), "threads": torch.get_num_threads()}
    print(f"knn {n} x {n} x {d} ({dev}, {res['threads']} threads): {el:.1f} s (cpu {cpu:.1f} s), "
          f"{res['pairs_per_s']:.3g} pairs/s, {gflops:.1f} GFLOP/s = {100 * gflops / peak:.0f}% of "
          f"the float32 matmul peak {peak:.1f} GFLOP/s measured in this run; per CPU second "
          f"{gflops_cpu:.1f} vs {peak_cpu:.1f} GFLOP/s = {100 * gflops_cpu / peak_cpu:.0f}% "
          f"(robust to other jobs); working memory ~{res['working_memory_mib']:.0f} MiB "
          f"(block {block_q} x {block_k}; peak RSS grew {res['peak_rss_growth_mib']:.0f} MiB); "
          f"{res['retried_rows']} rows re-searched")
    return res


def flops_of(fn):
    """Floating-point operations of one call of fn (torch's FLOP counter: matmuls and
    convolutions)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def rate_of(fn, device, n):
    """Seconds of n calls of fn (after one warm-up), with the device synchronized."""
    fn()
    t0 = clock(device)
    for _ in range(n):
        fn()
    return clock(device) - t0


def _timed_runs(fn, steps):
    """Seconds per optimiser step of fn(steps) (a whole training run in a fresh folder), from the
    difference of a run of `steps` and one of steps // 2: setup, data and checkpoints cancel out."""
    t0 = time.perf_counter()
    fn(steps // 2)
    t1 = time.perf_counter()
    fn(steps)
    return ((time.perf_counter() - t1) - (t1 - t0)) / (steps - steps // 2)


def bench_reproduce(cfg, device, where):
    """Training and sampling at reproduce.py's own shapes (profile cfg.reproduce) with the thread
    count each of its parallel jobs gets (`--reproduce-threads`): per training-set size n, train.py
    alone at batch min(batch, n) against ensemble.py's K = replicates models at once (the real code
    paths, timed as whole runs); then DDIM sampling unguided and SIDE-guided at extract.py's batch.
    Each as images/s and as a fraction of the float32 matmul peak of a 2048^3 product measured in
    the same run and thread count."""
    p = reproduce.PROFILES[cfg.reproduce]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.reproduce_threads or threads)
    where = f"{device}, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    peak = matmul_peak(2048, 2048, 2048, device)[0] * 1e9
    tag = f"reproduce-{cfg.reproduce} {p['image_size']}px base {p['base']}"
    _reproduce_training(cfg, p, device, tag, peak, where)
    _reproduce_sampling(cfg, p, device, tag, peak, where)
    torch.set_num_threads(threads)


def _reproduce_training(cfg, p, device, tag, peak, where):
    """bench_reproduce's training part: per size, train.py alone against ensemble.py."""
    tmp = tempfile.mkdtemp(prefix="bench-")
    try:
        for n in p["sizes"]:
            b = min(p["batch"], n)
            tcfg = lambda k, steps, kind="alone": TC(  # noqa: E731
                out=f"{tmp}/{kind}-n{n}-{k}-{steps}", n_train=n, data_seed=k, seed=k,
                image_size=p["image_size"], base=p["base"], mults=p["mults"],
                attn_res=p["attn_res"], T=p["T"], batch=b, steps=steps, sample_n=0,
                ckpt_every=10 ** 6, log_every=1e9, device=str(device), **reproduce.TRAIN_FIXED)
            f_img = flops_of(lambda: _loss_of(tcfg(0, 1), device).backward()) / b
            solo = b / _timed_runs(lambda s: train.train(tcfg(0, s)), cfg.reproduce_steps)
            K = p["replicates"]
            run_all = lambda s: ensemble.train_ensemble(  # noqa: E731
                [tcfg(k, s, "ensemble") for k in range(K)], log=False)  # folders of their own
            ens = K * b / _timed_runs(run_all, cfg.reproduce_steps)
            for name, ips in ((f"alone (train.py), batch {b}", solo),
                              (f"ensemble of {K} (ensemble.py), batch {K}x{b}", ens)):
                print(f"{tag} n={n} train {name}: {ips:.0f} img/s = "
                      f"{100 * ips * f_img / peak:.0f}% of the float32 matmul peak "
                      f"{peak / 1e9:.0f} GFLOP/s measured in this run ({f_img / 1e6:.1f} "
                      f"MFLOP/img; {where})",
                      flush=True)
            print(f"{tag} n={n} train ensemble / alone: {ens / solo:.2f}x", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reproduce_sampling(cfg, p, device, tag, peak, where):
    """bench_reproduce's sampling part: DDIM unguided and SIDE-guided at extract.py's batch."""
    torch.manual_seed(cfg.seed)
    model, diffusion = train.build(TC(image_size=p["image_size"], base=p["base"], mults=p["mults"],
                                      attn_res=p["attn_res"],
                                      T=p["T"], **reproduce.TRAIN_FIXED), 0, device)
    model.eval().requires_grad_(False)
    nb = min(256, p["n_gen"])
    clf = side.TimeResNet(p["K"], p["image_size"], T=p["T"]).to(device).eval().requires_grad_(False)
    target = torch.zeros(nb, dtype=torch.long, device=device)
    x = torch.randn(nb, 3, p["image_size"], p["image_size"], device=device)
    t = torch.full((nb,), p["T"] // 2, dtype=torch.long, device=device)

    # what the guidance adds per step: a classifier forward and backward to the input
    def clf_grad():
        xt = x.clone().requires_grad_(True)
        torch.log_softmax(clf(xt, t), 1)[:, 0].sum().backward()

    f_unet, f_clf = flops_of(lambda: model(x, t)), flops_of(clf_grad)
    for name, cond_fn, f_step in (("unguided", None, f_unet),
                                  ("guided", side.guidance(clf, target, 3.0), f_unet + f_clf)):
        one = lambda: diffusion.sample(  # noqa: E731
            model, nb, ddpm.sample_generators(cfg.seed, range(nb)), steps=1, eta=1.0,
            cond_fn=cond_fn)
        # denoising steps of the whole batch per second
        sps = cfg.train_steps / rate_of(one, device, cfg.train_steps)
        ips = sps * nb / p["sample_steps"]
        print(f"{tag} sample ddim {name}: {ips:.0f} img/s at {p['sample_steps']} steps, batch "
              f"{nb} = {100 * sps * f_step / peak:.0f}% of the float32 matmul peak "
              f"({where})", flush=True)


def _loss_of(tcfg, device):
    """One training loss of the model a config describes, on random images (for the FLOP count)."""
    model, diffusion = train.build(tcfg, 0, device)
    x0 = torch.rand(tcfg.batch, 3, tcfg.image_size, tcfg.image_size, device=device) * 2 - 1
    t = torch.randint(tcfg.T, (tcfg.batch,), device=device)
    return diffusion.loss(model, x0, t, torch.randn_like(x0)).mean()  # Ho et al. Eq. 14


if __name__ == "__main__":
    run_main(main)
