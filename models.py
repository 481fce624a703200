"""One loading boundary: any --ckpt becomes (ε-model, ddpm.Diffusion schedule, ModelInfo).

    model, diffusion, info = models.load_model(path, device)

`path` is one of
  * a train.py checkpoint (`ckpt.pt`): the EMA UNet, rebuilt from the checkpoint's `model_args`
    (or, for checkpoints older than that field, from its config), and its training-data spec;
  * a diffusers folder: a `UNet2DModel` folder (config.json + diffusion_pytorch_model.safetensors
    or .bin) or a pipeline folder with unet/ and scheduler/ (e.g. a downloaded
    google/ddpm-cifar10-32). The schedule comes from scheduler_config.json (the folder's own, the
    pipeline's scheduler/, or a sibling ../scheduler/); with none, diffusers' DDPMScheduler
    defaults. diffusers is imported only here; the folder is read locally (local_files_only),
    nothing is downloaded;
  * a TorchScript ε-model `out = model(x_t, t)` (t: int64 indices 0..T-1, x_t: float NCHW in [-1,
    1]; `model(x_t, t, y)` when num_classes > 0) with a JSON of the same name beside it (model.pt ->
    model.json) holding image_size, and optionally channels (3; 1 for grey-scale), num_classes (0),
    data (a folder or .npz, relative to the JSON) and the schedule under diffusers' scheduler names:
    num_train_timesteps (1000), beta_schedule (linear), beta_start (0.0001), beta_end (0.02),
    prediction_type (epsilon), clip_sample (true), clip_sample_range (1.0), trained_betas,
    variance_type (fixed_small).

Every model is called as model(x_t, t, y=None) and has .image_size, .channels, .num_classes; the
`return_mid=True` call (SIDE's `--features ddpm`, SIDE Alg. 1, step 2) gives the mid-block
activations of our UNet and of a diffusers UNet2DModel; a TorchScript model has none (use --features
pixels). Settings our sampler cannot reproduce (a learned variance, an unknown schedule,
thresholding, ...) are refused with one line naming the field, and so is a field of the wrong JSON
type ("false" is not false) or beyond the bounds of common.MAX_*. A TorchScript model is called once
on a probe batch before any work and must return one tensor of its input's shape. Nothing but
TorchScript runs code when loaded: train.py checkpoints and pickled diffusers .bin weights are read
with torch.load(weights_only=True); a TorchScript file is code by nature and is loaded only as a
--ckpt the user names, with its JSON beside it (AUDIT.md). A scheduler's sampling conventions
(timestep_spacing, steps_offset, set_alpha_to_one) are not read: our sampler has its own
(ddpm.Diffusion.sample). Depends on torch, ddpm.py and common.py.
"""
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import ddpm
from common import (CKPT_MAGIC, MAX_CLASSES, MAX_IMAGE_SIZE, MAX_T, UserError, check,
                    load_checkpoint, tensor_digest)

EXTRAS = "make extras (the two pip commands at the top of requirements-extras.txt)"
# diffusers' DDPMScheduler defaults: the schedule of a UNet folder that comes without a scheduler
# config.
SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                          beta_end=0.02,
                          prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0,
                          trained_betas=None)
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
             "fixed_large": "fixed_large",
             # the DDPM step's σ_t²: β̃_t (Ho et al. Eq. 7) or β_t (google/ddpm-cifar10-32's)
             None: "fixed_small"}
UNSUPPORTED = {  # scheduler field -> the values our sampler reproduces
    "thresholding": (False,), "rescale_betas_zero_snr": (False,), "variance_type": tuple(VARIANCES),
    "_class_name": None}  # None: any but the variance-exploding schedulers below
VE_SCHEDULERS = ("ScoreSdeVeScheduler", "KarrasVeScheduler")
TORCHSCRIPT_KEYS = {"image_size", "channels", "num_classes", "data", "variance_type",
                    *SCHEDULER_DEFAULTS}
# The JSON type of every field read from a model's JSON (a string "false" is not false); None also
# allowed where diffusers writes null. Upper bounds: common.MAX_* (each far above any real model).
INT, NUMBER, BOOL = "an integer", "a number", "true or false"
TEXT, NUMBERS = "a string", "a list of numbers"
FIELD_TYPES = dict(image_size=INT, channels=INT, num_classes=INT, data=TEXT,
                   num_train_timesteps=INT, beta_schedule=TEXT,
                   beta_start=NUMBER, beta_end=NUMBER, prediction_type=TEXT, clip_sample=BOOL,
                   clip_sample_range=NUMBER,
                   trained_betas=NUMBERS, variance_type=TEXT, thresholding=BOOL,
                   rescale_betas_zero_snr=BOOL,
                   _class_name=TEXT, sample_size=INT, in_channels=INT, out_channels=INT,
                   center_input_sample=BOOL, time_embedding_type=TEXT)
NULLABLE = {"trained_betas", "variance_type", "num_class_embeds", "class_embed_type", "data"}
FIELD_MAX = dict(image_size=MAX_IMAGE_SIZE, sample_size=MAX_IMAGE_SIZE, num_train_timesteps=MAX_T,
                 # 4: RGBA at most
                 num_classes=MAX_CLASSES, channels=4, in_channels=4, out_channels=4)
# channels of a UNet level in a train.py checkpoint (train.py: base <= 1024, mults <= 16)
MAX_WIDTH = 16384
MAX_BLOCKS = 16  # residual blocks per level (train.py's bound)
# images of the probe call that checks a TorchScript model before any work (two timesteps: 0, T-1)
PROBE_BATCH = 2
# diffusers folders' pickled weight files (torch.save format)
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def _json_type_ok(v, kind):
    if kind == INT:
        return type(v) is int
    if kind == NUMBER:
        return type(v) in (int, float) and math.isfinite(v)
    if kind == BOOL:
        return type(v) is bool
    if kind == TEXT:
        return type(v) is str
    return type(v) is list and all(_json_type_ok(b, NUMBER) for b in v)


UNET_FIELDS = ("_class_name", "sample_size", "in_channels", "out_channels", "center_input_sample",
               "time_embedding_type")
SCHEDULER_FIELDS = (*SCHEDULER_DEFAULTS, *UNSUPPORTED)
META_FIELDS = ("image_size", "channels", "num_classes", "data")


def check_json_fields(cfg, where, fields):
    """Each of `fields` that a model's JSON holds has its JSON type (true, not "true"; 8, not 8.0 or
    "8") and stays under its upper bound; one line naming the file, the field and the fix."""
    for k in fields:
        kind, v = FIELD_TYPES[k], cfg.get(k)
        if k not in cfg or (v is None and k in NULLABLE):
            continue
        if k == "sample_size" and type(v) is list:  # diffusers allows [h, w]
            ok = len(v) == 2 and all(type(e) is int for e in v)
            v = v[0] if ok else v
        else:
            ok = _json_type_ok(v, kind)
        hint = " (JSON true / false, without quotes)" if kind == BOOL else ""
        check(ok, f"{where}: {k} = {json.dumps(cfg[k])} must be {kind}{hint}; fix the field")
        check(k not in FIELD_MAX or 0 <= v <= FIELD_MAX[k],
              f"{where}: {k} = {v} is outside 0..{FIELD_MAX.get(k)}; "
              "fix the field")


@dataclass
class ModelInfo:
    kind: str  # "train", "diffusers" or "torchscript"
    image_size: int
    channels: int
    num_classes: int  # > 0: class-conditional, called as model(x, t, y)
    # data.load_data kwargs of the training set (spec, n, seed, label_attr), or None
    data: dict = None
    ident: dict = field(default_factory=dict)  # names these weights and schedule (for cache keys)
    checkpoint: dict = None  # the train.py checkpoint itself (None for other kinds)


def load_model(path, device="cpu"):
    """(model in eval mode without gradients, ddpm.Diffusion, ModelInfo) for any supported
    --ckpt."""
    path = os.fspath(path)
    # a train.py --out folder
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "ckpt.pt")):
        model, diffusion, info = load_train(os.path.join(path, "ckpt.pt"), device)
    elif os.path.isdir(path):
        model, diffusion, info = load_diffusers(path, device)
    elif not os.path.isfile(path):
        raise UserError(f"--ckpt {path} does not exist; pass a train.py checkpoint, a diffusers "
                        "model or pipeline folder, or a TorchScript ε-model with a .json beside "
                        "it")
    else:
        with open(path, "rb") as fh:
            head = fh.read(len(CKPT_MAGIC))
        model, diffusion, info = (load_train(path, device) if head == CKPT_MAGIC
                                  else load_torchscript(path, device))
    return model.to(device).eval().requires_grad_(False), diffusion.to(device), info


# ----------------------------------------------------------------------------- train.py checkpoints

def _check_sizes(args, T, path):
    """A checkpoint's declared sizes, before anything is allocated for them (a crafted file could
    ask for terabytes): the bounds of common.MAX_* and a width cap."""
    widths = [args["base"] * m for m in args["mults"]]
    ok = (0 < args["image_size"] <= MAX_IMAGE_SIZE and 0 <= args["num_classes"] <= MAX_CLASSES
          and 2 <= T <= MAX_T
          and 0 < max(widths) <= MAX_WIDTH and 0 < args["num_res_blocks"] <= MAX_BLOCKS)
    check(ok, f"{path} declares sizes beyond any model this code trains (image_size "
              f"{args['image_size']}, widths {widths}, num_classes {args['num_classes']}, T {T}); "
              "it is not a train.py checkpoint: retrain it with train.py")


def load_train(path, device="cpu"):
    ck = load_checkpoint(path)
    if not (isinstance(ck, dict) and {"ema", "config", "num_classes", "step"} <= set(ck)
            and isinstance(ck["config"], dict)):
        raise UserError(f"{path} is not a model checkpoint from train.py (an extraction cache "
                        "file?); pass the ckpt.pt that train.py wrote")
    check("model_args" in ck, f"{path} has no model_args: an older train.py wrote it; retrain it "
          "with train.py")
    try:
        c = ck["config"]
        _check_sizes(ck["model_args"], c["T"], path)
        model = ddpm.UNet(**ck["model_args"])
        model.load_state_dict(ck["ema"])
        diffusion = ddpm.Diffusion(c["T"], c["schedule"], c["prediction"], device=device)
        data = dict(spec=c["data"], n=c["n_train"], seed=c.get("data_seed", 0),
                    label_attr=c.get("label_attr") or None)
    except ValueError as e:  # e.g. a schedule name this code does not know
        raise UserError(f"{path}: {e}; retrain it with train.py") from None
    except (KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{path} does not match this code's model ({str(e).splitlines()[0]}); "
                        "retrain it with train.py") from None
    # retrained in place: new keys
    ident = dict(step=ck["step"], config=ck["config"], weights=tensor_digest(ck["ema"]))
    return model, diffusion, ModelInfo("train", model.image_size, model.channels, model.num_classes,
                                       data, ident, ck)


# --------------------------------------------------------------------------- schedules from configs

def diffusion_from_config(cfg, where, device="cpu"):
    """ddpm.Diffusion from diffusers-style scheduler fields (missing ones take DDPMScheduler's
    defaults); a setting our samplers cannot reproduce is refused with one line naming the field."""
    check_json_fields(cfg, where, SCHEDULER_FIELDS)
    c = dict(SCHEDULER_DEFAULTS, **{k: v for k, v in cfg.items() if k in SCHEDULER_DEFAULTS})
    for k, ok in UNSUPPORTED.items():
        if k in cfg and (cfg[k] in VE_SCHEDULERS if ok is None else cfg[k] not in ok):
            supported = "a beta-schedule scheduler" if ok is None else ", ".join(map(str, ok))
            raise UserError(f"{where}: {k} = {cfg[k]!r} is not supported (supported: {supported})")
    check(c["beta_schedule"] in ddpm.SCHEDULES,
          f"{where}: beta_schedule = {c['beta_schedule']!r} is not supported "
          f"(supported: {', '.join(ddpm.SCHEDULES)})")
    check(c["prediction_type"] in ("epsilon", "v_prediction", "sample"),
          f"{where}: prediction_type = "
          f"{c['prediction_type']!r} is not supported (supported: epsilon, v_prediction, sample)")
    check(isinstance(c["num_train_timesteps"], int) and c["num_train_timesteps"] >= 2,
          f"{where}: num_train_timesteps = {c['num_train_timesteps']!r} must be an integer >= 2")
    try:
        return ddpm.Diffusion(c["num_train_timesteps"], c["beta_schedule"], c["prediction_type"],
                              device=device,
                              beta_start=c["beta_start"], beta_end=c["beta_end"],
                              clip_sample=c["clip_sample"],
                              clip_sample_range=c["clip_sample_range"], betas=c["trained_betas"],
                              variance=VARIANCES[cfg.get("variance_type")])
    except (ValueError, TypeError) as e:
        # name the JSON field, not ddpm's argument
        if c["trained_betas"] is not None and str(e).startswith("betas"):
            raise UserError(f"{where}: trained_betas must be num_train_timesteps = "
                            f"{c['num_train_timesteps']} numbers in (0, 1), got "
                            f"{len(c['trained_betas'])}; fix the field") from None
        raise UserError(f"{where}: {e}") from None


def _digest(files, extra):
    """sha256 of the files' bytes and a JSON-able extra: names the weights in cache keys."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for f in sorted(files):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _read_json(path):
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({str(e).splitlines()[0]})") from None
    check(isinstance(obj, dict), f"{path} must hold a JSON object")
    return obj


# ----------------------------------------------------------------------------- diffusers folders

class DiffusersEps(nn.Module):
    """A diffusers UNet2DModel as model(x_t, t, y=None, return_mid=False)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, size = unet, unet.config.sample_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.channels, self.num_classes = unet.config.in_channels, 0

    def forward(self, x, t, y=None, return_mid=False):
        assert x.shape[1:] == (self.channels, self.image_size, self.image_size), x.shape
        if not return_mid:
            return self.unet(x, t).sample
        u = self.unet  # UNet2DModel.forward up to and including its mid block (encoder features)
        x = 2 * x - 1.0 if u.config.center_input_sample else x
        emb = u.time_embedding(u.time_proj(t.expand(x.shape[0])).to(dtype=u.dtype))
        skip, h = x, u.conv_in(x)
        for block in u.down_blocks:
            if hasattr(block, "skip_conv"):
                h, _, skip = block(hidden_states=h, temb=emb, skip_sample=skip)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        return u.mid_block(h, emb) if u.mid_block is not None else h


def _check_unet(cfg, where):
    """Refuse UNet2DModel settings our samplers cannot drive, naming the field."""
    check_json_fields(cfg, where, UNET_FIELDS)
    size = cfg.get("sample_size")
    check(isinstance(size, int) or (isinstance(size, (list, tuple)) and len(set(size)) == 1),
          f"{where}: sample_size = {size!r} is not supported (square images only)")
    check(cfg.get("out_channels", cfg.get("in_channels")) == cfg.get("in_channels"),
          f"{where}: out_channels = {cfg.get('out_channels')} != in_channels = "
          f"{cfg.get('in_channels')}: a learned variance (or another output) is not supported, "
          "only an ε / v / x_0 prediction")
    check(cfg.get("time_embedding_type", "positional") == "positional",
          f"{where}: time_embedding_type = {cfg.get('time_embedding_type')!r} is not supported (a "
          "variance-exploding model); supported: positional")
    for k in ("num_class_embeds", "class_embed_type"):
        check(cfg.get(k) is None,
              f"{where}: {k} = {cfg.get(k)!r} is not supported (class-conditional diffusers UNets)")


def check_tensors_only(path):
    """Refuse (one line) a pickled weight file that holds anything but tensors, numbers, strings and
    containers of them: torch.load(weights_only=True) builds nothing else, so nothing in it runs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- untrusted bytes: whatever the unpickler objects to
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()
                 and not ln.startswith(("Weights only", "Check the"))]
        raise UserError(f"{path} holds more than tensors "
                        f"({(lines or [type(e).__name__])[0][:140]}); loading it could run code, "
                        "so it was not loaded: use a .safetensors copy from a source you "
                        "trust") from None


def load_diffusers(path, device="cpu"):
    """A UNet2DModel folder or a pipeline folder (unet/, scheduler/), read locally."""
    unet_dir = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    ucfg_path = os.path.join(unet_dir, "config.json")
    check(os.path.isfile(ucfg_path),
          f"--ckpt {path} is a folder without config.json or unet/config.json; pass a diffusers "
          "UNet2DModel or pipeline folder (save_pretrained), or a train.py checkpoint file")
    ucfg = _read_json(ucfg_path)
    check(ucfg.get("_class_name") == "UNet2DModel", f"{ucfg_path}: _class_name = "
          f"{ucfg.get('_class_name')!r} is not supported (supported: UNet2DModel)")
    _check_unet(ucfg, ucfg_path)
    candidates = [os.path.join(path, "scheduler", "scheduler_config.json"),
                  os.path.join(unet_dir, "scheduler_config.json"),
                  os.path.join(os.path.dirname(os.path.abspath(unet_dir)), "scheduler",
                               "scheduler_config.json")]
    sched_path = next((p for p in candidates if os.path.isfile(p)), None)
    scfg = _read_json(sched_path) if sched_path else {}
    diffusion = diffusion_from_config(scfg, sched_path or f"{path} (no scheduler_config.json: "
                                                          "DDPMScheduler defaults)", device)
    try:
        from diffusers import UNet2DModel  # the optional extra, imported only for such a folder
    except ImportError:
        raise UserError(f"--ckpt {path} is a diffusers folder, which needs the diffusers package: "
                        f"{EXTRAS}") from None
    safetensors = os.path.isfile(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
    # diffusers would torch.load a pickled .bin: check first that it holds tensors only
    if not safetensors:
        for f in sorted(os.listdir(unet_dir)):
            if f.endswith(PICKLE_WEIGHTS) and os.path.isfile(os.path.join(unet_dir, f)):
                check_tensors_only(os.path.join(unet_dir, f))
    try:
        # no `accelerate`
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False,
                                           # advice; safetensors never run code
                                           use_safetensors=safetensors or None)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{unet_dir}: diffusers could not load the UNet "
                        f"({str(e).splitlines()[0]})") from None
    files = [os.path.join(unet_dir, f) for f in os.listdir(unet_dir)
             if os.path.isfile(os.path.join(unet_dir, f))]
    ident = dict(diffusers=_digest(files, [ucfg, scfg]))
    model = DiffusersEps(unet)
    return model, diffusion, ModelInfo("diffusers", model.image_size, model.channels, 0, None,
                                       ident)


# ---------------------------------------------------------------------------- TorchScript ε-models

class ScriptEps(nn.Module):
    """A TorchScript ε-model `model(x_t, t[, y])` with the attributes our sampler reads."""

    def __init__(self, script, image_size, channels, num_classes):
        super().__init__()
        self.script, self.image_size = script, image_size
        self.channels, self.num_classes = channels, num_classes

    def forward(self, x, t, y=None, return_mid=False):
        if return_mid:
            raise UserError("--features ddpm needs the UNet's mid-block activations, which a "
                            "TorchScript ε-model does not expose; pass --features pixels or a "
                            "TorchScript feature extractor (.pt)")
        out = self.script(x, t) if self.num_classes == 0 else self.script(x, t, y)
        # never broadcast a wrong shape into the sampler
        if not (torch.is_tensor(out) and out.shape == x.shape):
            raise UserError(f"the TorchScript model returned {_shape_of(out)} for input "
                            f"{tuple(x.shape)}; it must return ε (or v / x_0) of the input's "
                            "shape")
        return out


def _shape_of(out):
    return f"shape {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"


def probe_torchscript(model, path, meta_path, T, device):
    """Call the model once on a small batch before any work: it must accept (x_t, t) (with y when
    num_classes > 0, labels 0 and num_classes - 1) and return one tensor of x_t's shape; else one
    line."""
    k, n = model.num_classes, PROBE_BATCH
    x = torch.zeros(n, model.channels, model.image_size, model.image_size, device=device)
    t = torch.tensor([0, T - 1], device=device)
    y = torch.tensor([0, max(k - 1, 0)], device=device) if k > 0 else None
    call = (f"model(x_t, t{', y' if k else ''}) with num_classes = {k} in "
            f"{os.path.basename(meta_path)}")
    try:
        with torch.no_grad():
            out = model.script(x, t) if k == 0 else model.script(x, t, y)
    except Exception as e:  # noqa: BLE001 -- TorchScript raises RuntimeError for any failure
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Error" in ln or "error" in ln),
                   (lines or [type(e).__name__])[0])
        raise UserError(f"{path}: {call} failed on a probe batch of {n} ({why[:160]}); fix "
                        "num_classes (and image_size, channels) in the JSON or export the model "
                        "as eps = model(x_t, t[, y])") from None
    check(torch.is_tensor(out) and tuple(out.shape) == tuple(x.shape),
          f"{path}: {call} returned {_shape_of(out)} for input {tuple(x.shape)}; it must return "
          "one tensor of the input's shape (ε, v or x_0): fix image_size / channels in the JSON "
          "or export the model so")


def load_torchscript(path, device="cpu"):
    meta_path = os.path.splitext(path)[0] + ".json"
    check(os.path.isfile(meta_path),
          f"--ckpt {path} is neither a train.py checkpoint nor a TorchScript model with "
          f"{os.path.basename(meta_path)} beside it (image_size and the schedule; see models.py)")
    meta = _read_json(meta_path)
    unknown = sorted(set(meta) - TORCHSCRIPT_KEYS)
    check(not unknown,
          f"{meta_path}: unknown field(s) {unknown}; known: {', '.join(sorted(TORCHSCRIPT_KEYS))}")
    check_json_fields(meta, meta_path, META_FIELDS)
    size, ch, k = meta.get("image_size"), meta.get("channels", 3), meta.get("num_classes", 0)
    for name, v in (("image_size", size), ("channels", ch), ("num_classes", k)):
        check(type(v) is int and v >= (0 if name == "num_classes" else 1),
              f"{meta_path}: {name} = {v!r} must be "
              f"{'an integer >= 0' if name == 'num_classes' else 'a positive integer'}")
    diffusion = diffusion_from_config(meta, meta_path, device)
    data = None
    if meta.get("data"):
        folder = os.path.dirname(os.path.abspath(meta_path))
        spec = meta["data"] if meta["data"] == "faces" else os.path.join(folder, meta["data"])
        data = dict(spec=spec, n=None, seed=0, label_attr=None)
    try:  # TorchScript is code: loaded only because the user named this file as --ckpt (AUDIT.md)
        script = torch.jit.load(path, map_location=device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path} is not a TorchScript file "
                        f"({str(e).splitlines()[0].split('. ')[0]}); export one with "
                        "torch.jit.script(model).save(path) or torch.jit.trace") from None
    model = ScriptEps(script, size, ch, k).to(device)
    probe_torchscript(model, path, meta_path, diffusion.T, device)
    ident = dict(torchscript=_digest([path], meta))
    return model, diffusion, ModelInfo("torchscript", size, ch, k, data, ident)
