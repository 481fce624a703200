"""Small shared plumbing for the scripts: user errors, dataclass -> CLI flags, atomic and
checksummed writes, checkpoints that hold data only, a lock per output folder, memory checks, device
choice, progress lines, and where a script runs (ranks under torchrun, --amp, the sampling copy of a
model).

No model or paper maths lives here (see ddpm.py, side.py, metrics.py). Imports only metrics.py
(for resolve_device, whose rule lives there).
Every script's `main()` is wrapped by `run_main`, so a `UserError` (and running out of memory or
disk, or another OSError) becomes one line on stderr and exit code 2, never a traceback; Ctrl-C one
line and exit code 130.
"""
import argparse
import contextlib
import copy
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.distributed as dist

import metrics  # resolve_device's rule; metrics.py imports nothing of ours, so no cycle

CKPT_MAGIC = b"SIDECKPT1\n"  # first bytes of every checkpoint we write; then sha256 hex + "\n"
# Upper bounds of sizes a user can type or a model file can declare (each far above any real use;
# they turn an absurd value into one error line instead of a memory error deep inside the work).
MAX_IMAGE_SIZE = 1024  # pixel-space DDPMs stop at 256-1024 px (the paper: 128 px)
MAX_T = 100_000  # diffusion steps: DDPMs use 1,000-4,000; the schedule tables are O(T)
MAX_CLASSES = 100_000  # class labels are indices 0..K-1; ImageNet-21k has 21,841 classes
# the file in an output folder that a running train.py / extract.py holds locked
LOCK_NAME = ".lock"
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
GIB = 2 ** 30


class UserError(Exception):
    """A mistake in the user's input or environment; the message names the problem and the fix."""


def run_main(main, argv=None, interrupted="rerun the same command to continue: finished stages "
                                          "are kept"):
    """Run `main(argv)`; a UserError prints `error: ...` on stderr and exits with code 2, and so do
    running out of memory and an OSError (disk full, permissions, a symlink loop: the file and the
    reason). Ctrl-C prints one line (what to do next: `interrupted`) and exits with code 130."""
    try:
        return main(argv)
    except UserError as e:
        message = str(e)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); every file written so far is whole; "
              f"{interrupted}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    # torch.OutOfMemoryError and the CPU allocator's are RuntimeErrors
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and not _out_of_memory(e):
            raise
        message = ("out of memory; lower --batch, --image-size or the number of images, or use a "
                   "machine with more memory")
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        fix = {errno.ENOSPC: "free disk space and rerun (finished stages are kept)",
               errno.EDQUOT: "free disk space and rerun (finished stages are kept)",
               errno.ELOOP: "a symbolic link points back into itself; fix or remove it"}.get(
                   e.errno, "check the path and its permissions")
        message = f"{e.strerror or e}{where}; {fix}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _out_of_memory(e):
    text = str(e)
    return (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text
            or "out of memory" in text)


# ----------------------------------------------------------------------------- config -> flags
# Each field declares its valid values beside its reason (see `option`); the type check, the range
# check, the --help text and the error message are all generated from that one declaration.

def option(default, help, lo=None, hi=None, gt=None, lt=None, choices=None, nonempty=False,
           elem=None, allow=(), **meta):
    """A dataclass field carrying its one-line reason (the flag's help) and its valid values:
    `lo`/`hi` inclusive bounds and `gt`/`lt` exclusive ones (each a number, or the name of another
    field, e.g. hi="T"); `choices` the allowed values; `nonempty` refuses '' and (); `elem` the
    element type of a tuple field (applied with the bounds/choices to each element); `allow` special
    values accepted outside the range (e.g. -1 = "same as λ"). Floats must be finite."""
    if isinstance(default, tuple) and elem not in (int, float, str):
        raise TypeError(f"option {help[:40]!r}: a tuple option declares its element type, "
                        "elem=int, float or str")
    meta = dict(help=help, lo=lo, hi=hi, gt=gt, lt=lt, choices=choices, nonempty=nonempty,
                elem=elem, allow=tuple(allow), **meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(f):
    return "--" + f.name.replace("_", "-")


def _kind(f):
    return f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str,
                                                    "bool": bool,
                                                     "tuple": tuple}[f.type]


def _elem(f):
    return f.metadata["elem"]


def _show(v):
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _scalar(kind, text):
    """Parse one value of type `kind`; a ValueError names what was expected."""
    names = {int: "an integer", float: "a number", str: "text"}
    try:
        v = kind(text.strip()) if kind is not str else text
    except ValueError:
        raise ValueError(f"expected {names[kind]}, got {text!r}") from None
    if kind is float and not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {text!r}")
    return v


def _parse_field(f, text):
    kind = _kind(f)
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true/false, got {text!r}")
        if kind is tuple:  # comma-separated; elements of the declared type
            return tuple(_scalar(_elem(f), v) for v in text.split(",") if v.strip() != "")
        return _scalar(kind, text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bound(cfg, b):
    return getattr(cfg, b) if isinstance(b, str) else b


def field_problem(f, value, cfg=None):
    """Why `value` is not valid for field `f` (a message naming the flag), or None."""
    m, name = f.metadata, flag_name(f)
    if m.get("nonempty") and value in ("", ()):
        return f"{name} must not be empty ({m['help']})"
    for v in (value if isinstance(value, tuple) else (value,)):
        if v in m.get("allow", ()) or isinstance(v, bool) or not isinstance(v, (int, float, str)):
            continue
        if m.get("elem") is int and not isinstance(v, int):
            return f"{name} {_show(value)}: expected whole numbers ({m['help']})"
        if m.get("choices") is not None and v not in m["choices"]:
            return f"{name} {v!r}: expected one of {', '.join(map(str, m['choices']))}"
        lo, hi, gt, lt = (_bound(cfg, m.get(k)) if cfg is not None or not isinstance(m.get(k), str)
                          else None
                          for k in ("lo", "hi", "gt", "lt"))
        if isinstance(v, float) and not math.isfinite(v):
            return f"{name} {v} must be a finite number"
        if isinstance(v, str):
            continue
        bad = ((lo is not None and v < lo) or (hi is not None and v > hi)
               or (gt is not None and v <= gt)
               or (lt is not None and v >= lt))
        if bad:
            return f"{name} {_show(value)}: expected {describe_range(f, cfg)} ({m['help']})"
    return None


def describe_range(f, cfg=None):
    """The valid values of a field in words, e.g. '>= 1', '>= 0.0 and < 1.0', 'each >= 2', 'one of
    a, b'."""
    m = f.metadata
    val = (lambda k: f"{m[k]}={_bound(cfg, m[k])}" if isinstance(m[k], str) and cfg is not None
           else str(m[k]))
    if m.get("choices") is not None:
        text = "one of " + ", ".join(map(str, m["choices"]))
    else:
        low = (f">= {val('lo')}" if m.get("lo") is not None else
               f"> {val('gt')}" if m.get("gt") is not None else "")
        high = (f"<= {val('hi')}" if m.get("hi") is not None else
                f"< {val('lt')}" if m.get("lt") is not None else "")
        text = " and ".join(t for t in (low, high) if t)
    if text and _kind(f) is tuple:
        text = "each " + text
    if m.get("allow"):
        text += (" or " if text else "") + " or ".join(map(str, m["allow"]))
    if m.get("nonempty"):
        text += (", " if text else "") + "not empty"
    return text


def check_fields(cfg):
    """Every field of a config instance against its declaration; the first problem as a
    UserError."""
    for f in dataclasses.fields(cfg):
        problem = field_problem(f, getattr(cfg, f.name), cfg)
        if problem:
            raise UserError(problem)


METAVAR = {int: "N", float: "X", str: "TEXT", bool: "BOOL", tuple: "A,B,..."}


def choices_metavar(meta):
    if meta.get("choices") is None:
        return None
    return "{" + ",".join(map(str, meta["choices"])) + "}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit 2, like a UserError (no usage block)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def config_parser(cls, description, parser=None):
    """An argparse parser with one `--flag` per dataclass field; help = reason [valid values]
    (default)."""
    p = parser or _Parser(description=description)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rng = describe_range(f)
        helptext = (f"{meta.get('help', '')}" + (f" [{rng}]" if rng else "")
                    + f" (default: {_show(default) or chr(39) * 2})")
        # a bare `--resume` means true
        flag = dict(nargs="?", const=True) if _kind(f) is bool else {}
        parse = lambda s, f=f: _parse_field(f, s)  # noqa: E731
        parse.__name__ = _kind(f).__name__  # argparse names the type in some messages
        p.add_argument(flag_name(f), dest=f.name, default=default, **flag, type=parse,
                       metavar=meta.get("metavar") or choices_metavar(meta) or METAVAR[_kind(f)],
                       help=helptext.replace("%", "%%"))
    return p


def parse_config(cls, argv, description):
    """Parse argv into a `cls` instance and check every field's declared range (exit 2 /
    UserError)."""
    args = config_parser(cls, description).parse_args(argv)
    cfg = cls(**vars(args))
    check_fields(cfg)
    return cfg


def check(cond, message):
    """Raise UserError(message) unless cond; for option ranges and input checks."""
    if not cond:
        raise UserError(message)


# ----------------------------------------------------------------------------- files

def _umask():
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def check_writable(path, flag, folder=True):
    """Fail early (before any work) unless `path` is, or can be created as, a writable folder
    (folder=True) or file: an existing file where a folder is wanted (or the reverse), a file in the
    way of the path, or a read-only location each give one line naming the flag."""
    path = os.path.abspath(os.fspath(path))
    want = "folder" if folder else "file"
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise UserError(f"{flag} {path} is an existing {'file' if folder else 'folder'}, not a "
                        f"{want}; choose another {flag}")
    anc = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise UserError(f"{flag} {path}: {anc} is a file, so the {want} cannot be created; choose "
                        f"another {flag}")
    if os.statvfs(anc).f_flag & os.ST_RDONLY:  # os.access says yes to root even there
        raise UserError(f"{flag} {path}: {anc} is on a read-only filesystem; choose a writable "
                        f"{flag}")
    if not os.access(anc, os.W_OK | os.X_OK):  # checked without writing anything (no probe file)
        raise UserError(f"{flag} {path}: cannot write in {anc} (permission denied); choose a "
                        f"writable {flag}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} is read-only; choose a writable {flag}")


def atomic_write_bytes(path, data):
    """Write bytes to `path` via a temp file in the same folder and os.replace (never half-written).
    The file gets the permissions a plain open() would (0666 minus the umask), not mkstemp's
    0600."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


PLAIN = (bool, int, float, str, type(None))  # besides tensors, what a checkpoint may hold


def _not_plain(obj, where="the top level"):
    """Where `obj` holds something other than tensors, numbers, strings, bools, None and lists,
    tuples and dicts (str or int keys) of them: a description of the first such place, or None."""
    if type(obj) in (torch.Tensor, torch.nn.Parameter) or type(obj) in PLAIN:
        return None
    if type(obj) in (list, tuple):
        return next((w for i, v in enumerate(obj) if (w := _not_plain(v, f"{where}[{i}]"))), None)
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                return f"a {type(k).__name__} key at {where}"
            if (w := _not_plain(v, f"{where}[{k!r}]")):
                return w
        return None
    return f"a {type(obj).__module__}.{type(obj).__qualname__} at {where}"


def save_checkpoint(obj, path):
    """torch.save `obj` with a magic header and a sha256 of the payload, atomically. `obj` may hold
    only tensors, numbers, strings, bools, None and lists / tuples / dicts of them (what
    load_checkpoint accepts); anything else is a bug of the caller (TypeError), never written. The
    sha256 detects a truncated or corrupted file; it proves nothing about who wrote it (anyone can
    compute it)."""
    where = _not_plain(obj)
    if where:
        raise TypeError(f"save_checkpoint({os.fspath(path)}): {where} is not a tensor, number, "
                        "string or container of them")
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path,
                       CKPT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def load_checkpoint(path, map_location="cpu", fix="retrain it with train.py (--overwrite)"):
    """Load a checkpoint written by save_checkpoint without running any code it could hold:
    torch.load with weights_only=True (its restricted unpickler builds tensors, numbers, strings and
    containers and refuses any other object), then the same check as save_checkpoint's. A file that
    is not ours, is truncated or corrupted (the sha256 catches accidents, not forgeries), or holds
    anything else is refused in one line naming it; `fix` says what to do (a cache file: delete
    it)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; train one with `python train.py --out "
                        "DIR`")
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw.startswith(CKPT_MAGIC):
        raise UserError(f"{path} is not a checkpoint written by train.py (bad header); pass the "
                        f"right file or {fix}")
    digest, _, payload = raw[len(CKPT_MAGIC):].partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise UserError(f"{path} is truncated or corrupted (checksum mismatch); {fix}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for the user
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- untrusted bytes: any unpickler error refuses the file
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's advice to drop weights_only: unsafe
        if lines and lines[0].startswith("Weights only load failed"):
            why = next((ln for ln in lines[1:] if not ln.startswith(("Check the documentation",
                                                                     "Please file"))), "")
            raise UserError(f"{path} holds objects other than tensors, numbers and strings "
                            f"({why[:160]}); loading it could run code, so it was not loaded; "
                            f"{fix}") from None
        raise UserError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: "
                        f"{(lines or [''])[0][:120]}); {fix}") from None
    where = _not_plain(obj)
    if where:
        raise UserError(f"{path} holds {where}, not only tensors, numbers and strings, so it is "
                        f"refused; {fix}")
    return obj


def tensor_digest(state):
    """sha256 (16 hex digits) of a dict of tensors: names, dtypes, shapes and values (the model
    weights in cache keys: the same weights give the same digest wherever they are stored)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def array_digest(*arrays):
    """sha256 (16 hex digits) of numpy arrays (None allowed): dtype, shape and bytes (the training
    data in cache keys and in checkpoints, so that changed images are noticed)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none|")
            continue
        a = a if a.flags.c_contiguous else a.copy()
        h.update(f"{a.dtype}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


@contextlib.contextmanager
def folder_lock(folder, flag, script):
    """Hold an exclusive lock on `folder` (flock on its .lock file) while the block runs: a second
    run into the same folder is refused in one line instead of interleaving its files with this
    one's. The kernel drops the lock when the process ends, however it ends, so a killed run leaves
    none behind. Take it after every check, just before the first write (it creates the folder and
    its .lock)."""
    import fcntl
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{flag} {folder} is in use by another {script} run (pid {pid}); wait "
                            f"for it to end or choose another {flag}") from None
        # a filesystem without flock (some network mounts): go on unlocked, but say so
        except OSError as e:
            print(f"note: {flag} {folder}: cannot lock ({e.strerror}); do not start a second run "
                  "into it", file=sys.stderr)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def memory_limit(device):
    """Bytes of memory a run on `device` can use at most: the GPU's total, or the machine's RAM (or
    the container's limit, when one is set and lower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            text = fh.read().strip()
        return min(total, int(text)) if text.isdigit() else total
    except OSError:
        return total


def check_memory(need, device, what, fix):
    """Refuse before any work when a lower bound `need` (bytes) of what the run will allocate
    exceeds the memory of `device`; `what` says what needs it, `fix` which option to lower."""
    have = memory_limit(device)
    check(need <= have,
          f"{what} needs at least {need / GIB:.1f} GiB, more than the {have / GIB:.1f} GiB of "
          f"{'this machine' if device.type == 'cpu' else device}; {fix}")


# ----------------------------------------------------------------------------- runtime

def resolve_device(name):
    """'auto' -> cuda if available else cpu; anything else is validated (metrics.resolve_device: one
    rule)."""
    try:
        return metrics.resolve_device(name, flag="--device")
    except metrics.MetricsInputError as e:
        raise UserError(str(e)) from None


class Progress:
    """One fixed-format line every `every` seconds (and at the end): `[stage] i/n  rate/s  eta`."""

    def __init__(self, stage, total, unit="it", every=5.0, stream=sys.stderr, enabled=True):
        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.stream, self.enabled = stream, enabled
        self.t0 = self.last = time.time()
        self.done = 0

    def update(self, n=1, extra=""):
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"[{self.stage}] {self.done}/{self.total} {rate:7.1f} {self.unit}/s eta "
                  f"{eta:5.0f}s {extra}", file=self.stream, flush=True)


# ----------------------------------------------------------------------------- where a script runs
# The local device under torchrun, the ranks and what they exchange, the --amp context and the fast
# sampling copy of a model (channels-last, torch.compile): shared by train.py and extract.py, so
# that neither the trainer nor the paper's algorithms carry distributed plumbing.

class Ranks(NamedTuple):
    """This process's place under torchrun: rank 0 of 1 when run alone. Unpacks as (rank, world)."""
    rank: int = 0
    world: int = 1

    def agree(self, obj):
        """Rank 0's value of obj, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj):
        """[every rank's obj] on rank 0, None on the others."""
        if self.world == 1:
            return [obj]
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, parts, dst=0)
        return parts

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def log(self, msg):
        """A progress line on stderr, from rank 0 only."""
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)


def shutdown(finished):
    """End torchrun's process group: after a barrier when this rank finished its work (so that no
    rank tears down its transport while another still talks to it: gloo then aborts a rank at
    exit, 'terminate called without an active exception'), at once after an error (a barrier could
    hang)."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def local_device(device):
    """Under torchrun on CUDA each process takes the GPU of its LOCAL_RANK; otherwise `device`
    unchanged."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def setup_distributed(device):
    """Ranks under torchrun (NCCL on CUDA, gloo on CPU); Ranks(0, 1) otherwise."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def check_shared_folder(folder, ranks):
    """Every rank reads every rank's files in `folder`: refuse a folder that not all nodes see."""
    if ranks.world == 1:
        return
    # a fresh name: no stale NFS lookup
    probe = os.path.join(folder, f".shared-{ranks.agree(os.urandom(8).hex())}")
    if ranks.rank == 0:
        atomic_write_text(probe, "")
    dist.barrier()
    seen = [None] * ranks.world
    dist.all_gather_object(seen, os.path.exists(probe))
    if ranks.rank == 0:
        os.unlink(probe)
    check(all(seen), f"the cache folder {folder} is not shared by all {ranks.world} processes (a "
          "rank cannot see rank 0's files); under torchrun across nodes --out must be on a shared "
          "filesystem")


def autocast(amp, device):
    """The forward-pass context of --amp: bf16 autocast (weights stay fp32), or a no-op for
    'off'."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def fast_model(model, channels_last=False, compile="off"):
    """The UNet a sampler calls: a channels-last copy and/or torch.compile ("cudagraphs" = its
    CUDA-graphs mode, "reduce-overhead"); with the defaults, `model` itself."""
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if compile != "off":
        model = torch.compile(model, mode="reduce-overhead" if compile == "cudagraphs" else None)
    return model
