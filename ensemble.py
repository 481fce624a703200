"""Train several train.py runs of one architecture in one process, as one grouped network.

    python ensemble.py --jobs jobs.json      # jobs.json: a list of train.py argument lists,
                                               one per model

Small DDPMs (8 px, batch 16-64) leave most of a CPU idle: each convolution is too small for the
processor, and the element-wise layers cost as much as the convolutions. Here K models of the same
architecture become one network whose every layer is grouped: model k's activations are channel
block k (NCHW with K·C channels), a convolution becomes one grouped convolution (groups = K),
GroupNorm keeps its groups inside each block, linear layers become one batched matrix product,
attention runs per (image, model). Model k still sees only its own weights, its own training images,
its own batch order, timesteps and noise (drawn from its own generator exactly as train.py draws
them), its own gradient-norm clip and AdamW state (AdamW is element-wise, so one optimiser over the
stacked parameters is K optimisers), and its own EMA. Each model's checkpoint is written in
train.py's format, so `train.py --resume`, extract.py and models.py read it as if train.py had
trained it alone (tests/test_ensemble.py: the weights after several steps equal a lone run within
float tolerance).

Requirements for grouping (checked, one error line otherwise): the same architecture, schedule,
batch, step count and optimiser settings, dropout 0 (masks would be drawn differently), one device.
Depends on numpy, torch, ddpm.py, data.py, train.py and common.py.
"""
import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm
import train
from common import (Progress, UserError, check, folder_lock, option, parse_config, resolve_device,
                    run_main)

# Fields every member of one ensemble must share (everything that shapes the network, the schedule,
# the optimiser or the loop); the rest (data sample, seed, labels' values, output folder)
# may differ.
SHARED = ("image_size", "base", "mults", "num_res_blocks", "attn_res", "dropout", "T", "schedule",
          "prediction", "steps", "batch", "lr", "warmup", "weight_decay", "grad_clip", "ema_decay",
          "ckpt_every", "keep", "device", "amp")
GN_EPS = 1e-5  # nn.GroupNorm's default eps, which ddpm.UNet's norm() uses


# ========================================================================= the grouped forward pass


def _conv(P, name, x, K, stride=1, padding=0):
    """K convolutions as one grouped convolution: weight (K, Cout, Cin, kh, kw) ->
    (K·Cout, Cin, kh, kw)."""
    w, b = P[f"{name}.weight"], P[f"{name}.bias"]
    return F.conv2d(x, w.flatten(0, 1), b.flatten(), stride=stride, padding=padding, groups=K)


def _norm(P, name, x, groups, K):
    """GroupNorm(groups, C) of each model = GroupNorm(K·groups, K·C): a group never spans two
    models."""
    return F.group_norm(x, K * groups, P[f"{name}.weight"].flatten(), P[f"{name}.bias"].flatten(),
                        GN_EPS)


def _linear(P, name, e):
    """e (K, B, in) -> (K, B, out): model k's nn.Linear on its own rows."""
    return torch.baddbmm(P[f"{name}.bias"].unsqueeze(1), e, P[f"{name}.weight"].transpose(1, 2))


def _blocks(e):
    """(K, B, C) per-model vectors -> (B, K·C, 1, 1), broadcastable over model k's channel
    block."""
    K, B, C = e.shape
    return e.transpose(0, 1).reshape(B, K * C, 1, 1)


def _resblock(P, name, blk, x, emb, K):
    """ddpm.ResBlock: GN-SiLU-conv, + time embedding, GN-SiLU-(dropout 0)-conv, + skip."""
    h = _conv(P, f"{name}.in_layers.2",
              F.silu(_norm(P, f"{name}.in_layers.0", x, blk.in_layers[0].num_groups, K)),
              K, padding=1)
    h = h + _blocks(_linear(P, f"{name}.temb.1", F.silu(emb)))
    h = _conv(P, f"{name}.out_layers.3",
              F.silu(_norm(P, f"{name}.out_layers.0", h, blk.out_layers[0].num_groups, K)),
              K, padding=1)
    return (x if isinstance(blk.skip, nn.Identity) else _conv(P, f"{name}.skip", x, K)) + h


def _attention(P, name, att, x, K):
    """ddpm.Attention per (image, model): single-head self-attention over the h·w positions,
    residual."""
    if isinstance(att, nn.Identity):
        return x
    B, KC, H, W = x.shape
    C = KC // K
    qkv = _conv(P, f"{name}.qkv", _norm(P, f"{name}.norm", x, att.norm.num_groups, K), K)
    q, k, v = qkv.reshape(B, K, 3, C, H * W).transpose(-1, -2).unbind(2)  # each (B, K, hw, C)
    out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, KC, H, W)
    return x + _conv(P, f"{name}.proj", out, K)


def _cat(h, skip, K):
    """Model k's [h, skip] channel concatenation, for every k: (B, K·C1) and (B, K·C2) ->
    (B, K·(C1+C2))."""
    B, _, H, W = h.shape
    return torch.cat([h.reshape(B, K, -1, H, W),
                      skip.reshape(B, K, -1, H, W)], 2).reshape(B, -1, H, W)


def forward(P, unet, x, t, y=None):
    """The K models' outputs ε_θk(x_k, t_k[, y_k]), stacked: x (K, B, C, H, W), t (K, B),
    y (K, B) or None.
    P: {name: (K, ...) stacked parameter} of ddpm.UNet `unet` (the template: its structure, not
    its weights).
    Mirrors ddpm.UNet.forward layer by layer."""
    K, B = t.shape
    base = unet.time_mlp[0].in_features
    emb = timestep_embedding_k(t, base)
    emb = _linear(P, "time_mlp.2", F.silu(_linear(P, "time_mlp.0", emb)))
    if unet.label_emb is not None:
        y = torch.full_like(t, unet.num_classes) if y is None else y
        emb = emb + P["label_emb.weight"][torch.arange(K, device=t.device)[:, None], y]
    h = _conv(P, "inp", x.transpose(0, 1).reshape(B, K * x.shape[2], *x.shape[3:]), K, padding=1)
    hs = [h]
    for i, layer in enumerate(unet.down):
        if isinstance(layer, nn.ModuleList):
            h = _attention(P, f"down.{i}.1", layer[1],
                           _resblock(P, f"down.{i}.0", layer[0], h, emb, K), K)
        else:  # the stride-2 downsampling convolution
            h = _conv(P, f"down.{i}", h, K, stride=2, padding=1)
        hs.append(h)
    h = _resblock(P, "mid.0", unet.mid[0], h, emb, K)
    h = _resblock(P, "mid.2", unet.mid[2], _attention(P, "mid.1", unet.mid[1], h, K), emb, K)
    for i, layer in enumerate(unet.up):
        if isinstance(layer, nn.ModuleList):
            h = _attention(P, f"up.{i}.1", layer[1],
                           _resblock(P, f"up.{i}.0", layer[0], _cat(h, hs.pop(), K), emb, K), K)
        else:  # nearest upsampling, then a convolution
            h = _conv(P, f"up.{i}.1", F.interpolate(h, scale_factor=2, mode="nearest"), K,
                      padding=1)
    h = _conv(P, "out.2", F.silu(_norm(P, "out.0", h, unet.out[0].num_groups, K)), K, padding=1)
    return h.reshape(B, K, *x.shape[2:]).transpose(0, 1)


def timestep_embedding_k(t, dim):
    """ddpm.timestep_embedding of each model's timesteps: (K, B) -> (K, B, dim)."""
    return ddpm.timestep_embedding(t.flatten(), dim).reshape(*t.shape, dim)


def stack(state_dicts, names):
    """{name: (K, ...) tensor} stacking the K state dicts' entries `names`."""
    return {n: torch.stack([sd[n] for sd in state_dicts]) for n in names}


# ============================================================================ training


@dataclass
class EnsembleConfig:
    jobs: str = option("", "a JSON file holding a list of train.py argument lists, one per model",
                       nonempty=True)
    threads: int = option(0, "torch threads for this process (0 = torch's default)", lo=0)


def check_members(cfgs):
    """One error line unless the configs can share one grouped network (SHARED fields equal,
    dropout 0)."""
    check(len(cfgs) >= 1, "an ensemble needs at least one model")
    first = dataclasses.asdict(cfgs[0])
    for c in cfgs[1:]:
        diff = [k for k in SHARED if json.dumps(dataclasses.asdict(c)[k]) != json.dumps(first[k])]
        check(not diff, f"{c.out} cannot train in one ensemble with {cfgs[0].out}: they differ in "
              f"{', '.join(diff)}; train them in separate ensembles")
    check(cfgs[0].dropout == 0,
          f"--dropout {cfgs[0].dropout}: an ensemble draws no dropout masks; use 0 or train.py")
    check(len({c.out for c in cfgs}) == len(cfgs), "two ensemble members write into the same --out")
    check(not any(c.compile or c.channels_last for c in cfgs),
          "--compile and --channels-last are train.py's; "
          "the ensemble's grouped layers choose their own memory layout")


def train_ensemble(cfgs, log=True):
    """Train every config of cfgs (train.TrainConfig) to its steps as one grouped network; writes
    each model's ckpt.pt, config.json and samples.png as train.py does, holding every --out's lock.
    Members behind the others (an interrupted run) first catch up alone with train.py. Returns the
    final snapshots."""
    check_members(cfgs)
    for c in cfgs:
        train.validate(c)
    device = resolve_device(cfgs[0].device)
    members = _setup(cfgs, device)  # exactly train.py's checks and initialisation, resume included
    lead = max(m.step for m, _ in members)
    # an interrupted run wrote some checkpoints and not others: the ones behind catch up alone
    # first, then all go on together
    if min(m.step for m, _ in members) < lead:
        for m, _ in members:
            if m.step < lead:
                train.train(dataclasses.replace(m.cfg, steps=lead, resume=True, overwrite=False))
        members = _setup([dataclasses.replace(c, resume=True, overwrite=False) for c in cfgs],
                         device)
    with contextlib.ExitStack() as locks:
        for m, run in members:
            locks.enter_context(folder_lock(m.cfg.out, "--out", "ensemble.py"))
            train.begin(m.cfg, run)
        _train([m for m, _ in members], device, log)
        for m, _ in members:
            train.write_samples(m.cfg)
    return [m.snapshot for m, _ in members]


def _train(members, device, log):
    """The loop of train.train, for the K models at once."""
    cfg, K = members[0].cfg, len(members)
    unet, diffusion = members[0].model, members[0].diffusion
    names = [n for n, _ in unet.named_parameters()]
    P = {n: p.requires_grad_(True)
         for n, p in stack([m.model.state_dict() for m in members], names).items()}
    E = stack([m.ema.state_dict() for m in members], names)
    opt = torch.optim.AdamW(list(P.values()), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **train.FUSED)
    if members[0].step > 0:
        opt.load_state_dict(_stacked_opt_state(opt, [m.opt.state_dict() for m in members]))
    step = members[0].step
    prog = Progress(f"train x{K}", cfg.steps - step, "step", every=cfg.log_every, enabled=log)
    t0, losses = time.time(), []
    while step < cfg.steps:
        batch = [m.draw() for m in members]  # each from its own generator, as train.py draws it
        x0, t, noise = (torch.stack([b[i] for b in batch]).to(device) for i in range(3))
        y = None if members[0].y_all is None else torch.stack([b[3] for b in batch]).to(device)
        for g in opt.param_groups:
            g["lr"] = train.lr_at(cfg, step)
        # (K,) each model's batch-mean loss, Ho et al. Eq. 14
        loss = _losses(P, unet, diffusion, x0, t, noise, y)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # the models share no parameter: each gradient is its own model's
        norms = _clip(P, cfg.grad_clip)
        bad = [m.cfg.out for m, lk, nk in zip(members, loss, norms)
               if not (torch.isfinite(lk) and torch.isfinite(nk))]
        if bad:
            raise UserError(f"training loss became non-finite at step {step} in {', '.join(bad)}; "
                            f"their last good checkpoints are kept; lower --lr (now {cfg.lr}) or "
                            "--grad-clip and rerun")
        opt.step()
        step += 1
        with torch.no_grad():
            for n in names:
                E[n].lerp_(P[n].detach(), 1.0 - cfg.ema_decay)
        losses.append(loss.detach().mean().item())
        prog.update(1, f"step {step} mean loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                       f"img/s {K * cfg.batch * len(losses) / (time.time() - t0):.0f}")
        if step in cfg.keep or step % cfg.ckpt_every == 0 or step == cfg.steps:
            _save(members, P, E, opt, names, step)


def _setup(cfgs, device):
    """[(train.State, train.prepare's run)] of every config: train.py's checks and initialisation,
    each keeping the global RNG state its model would carry alone (the next one's initialisation
    moves it), so its checkpoint records what a lone run records."""
    out = []
    for c in cfgs:
        run = train.prepare(c, device)
        st = train.setup(c, device, run)
        st.torch_rng = torch.get_rng_state()
        out.append((st, run))
    return out


def _losses(P, unet, diffusion, x0, t, noise, y):
    """Per model: the mean over its batch of diffusion.loss (per-image MSE of the prediction
    target)."""
    K, B = t.shape
    flat = lambda a: a.flatten(0, 1)  # noqa: E731
    xt = diffusion.q_sample(flat(x0), flat(t), flat(noise)).reshape(x0.shape)  # Ho et al. Eq. 4
    out = forward(P, unet, xt, t, y)
    if diffusion.prediction == "eps":
        target = noise
    elif diffusion.prediction == "x0":
        target = x0
    else:  # v = sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x_0 (Salimans & Ho 2022)
        target = (diffusion.sqrt_alphas_cumprod[t][..., None, None, None] * noise
                  - diffusion.sqrt_one_minus_alphas_cumprod[t][..., None, None, None] * x0)
    return ((out - target) ** 2).flatten(2).mean(2).mean(1)


def _clip(P, max_norm):
    """torch.nn.utils.clip_grad_norm_ for each model: its gradients' joint 2-norm, scaled by
    min(1, max_norm / (norm + 1e-6)). Returns the (K,) norms before clipping."""
    grads = [p.grad for p in P.values()]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1).norm(dim=1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.reshape(-1, *([1] * (g.ndim - 1))))
    return norms


def _stacked_opt_state(opt, states):
    """The stacked optimiser's state dict from the K models' own AdamW state dicts (same parameter
    order)."""
    sd = opt.state_dict()
    for i in range(len(sd["param_groups"][0]["params"])):
        per = [s["state"][i] for s in states]
        sd["state"][i] = {k: (per[0][k].clone() if k == "step"
                              else torch.stack([p[k] for p in per])) for k in per[0]}
    return sd


def _save(members, P, E, opt, names, step):
    """Each model's checkpoint in train.py's format: its slice of every stacked tensor."""
    sd = opt.state_dict()
    for k, m in enumerate(members):
        m.model.load_state_dict({n: P[n][k].detach() for n in names})
        m.ema.load_state_dict({n: E[n][k] for n in names})
        own = {"state": {i: {key: (v.clone() if key == "step" else v[k].clone())
                             for key, v in s.items()}
                         for i, s in sd["state"].items()},
               "param_groups": sd["param_groups"]}
        m.opt.load_state_dict(own)
        m.step = step
        train.save_due(m, os.path.join(m.cfg.out, "ckpt.pt"))


def main(argv=None):
    ecfg = parse_config(EnsembleConfig, argv, __doc__.split("\n\n")[0])
    try:
        with open(ecfg.jobs) as fh:
            jobs = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"--jobs {ecfg.jobs}: {e}; "
                        "pass a JSON list of train.py argument lists") from None
    check(isinstance(jobs, list) and jobs and all(isinstance(j, list) for j in jobs),
          f"--jobs {ecfg.jobs} must hold a non-empty JSON list of train.py argument lists")
    if ecfg.threads:
        torch.set_num_threads(ecfg.threads)
    cfgs = [parse_config(train.TrainConfig, [str(a) for a in j], "") for j in jobs]
    t0 = time.time()
    train_ensemble(cfgs)
    print(f"trained {len(cfgs)} models x {cfgs[0].steps} steps in {time.time() - t0:.0f}s",
          file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
