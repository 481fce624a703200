"""Small shared plumbing for the scripts: user errors, dataclass -> CLI flags, atomic and
checksummed writes, device choice, progress lines.

No model or paper maths lives here (see ddpm.py, side.py, metrics.py). Imports nothing of ours.
Every script's `main()` is wrapped by `run_main`, so a `UserError` becomes one line on stderr
and exit code 2, never a traceback.
"""
import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
import tempfile
import time

import torch

CKPT_MAGIC = b"SIDECKPT1\n"  # first bytes of every checkpoint we write; then sha256 hex + "\n"


class UserError(Exception):
    """A mistake in the user's input or environment; the message names the problem and the fix."""


def run_main(main, argv=None):
    """Run `main(argv)`; a UserError prints `error: ...` on stderr and exits with code 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- config -> flags

def _parse_field(f, text):
    kind = f.type if isinstance(f.type, type) else eval(f.type, {}, {})  # noqa: S307 (type names only)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    if kind is tuple:  # comma-separated; elements typed like the default's first element
        elem = type(f.default[0]) if f.default else float
        return tuple(elem(v) for v in text.split(",") if v != "")
    return kind(text)


def config_parser(cls, description, parser=None):
    """An argparse parser with one `--flag` per dataclass field; help = field metadata['help']."""
    p = parser or argparse.ArgumentParser(description=description,
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        flag = dict(nargs="?", const=True) if f.type in (bool, "bool") else {}  # a bare `--resume` means true
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, **flag,
                       type=lambda s, f=f: _parse_field(f, s), choices=meta.get("choices"),
                       metavar=meta.get("metavar"), help=f"{meta.get('help', '')} (default: {shown})")
    return p


def parse_config(cls, argv, description):
    """Parse argv into a `cls` instance; unknown flags are rejected by argparse (exit 2)."""
    args = config_parser(cls, description).parse_args(argv)
    return cls(**vars(args))


def field(default, help, **meta):
    """A dataclass field carrying its one-line reason (shown as the flag's help)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=dict(help=help, **meta))
    return dataclasses.field(default=default, metadata=dict(help=help, **meta))


def check(cond, message):
    """Raise UserError(message) unless cond; for option ranges and input checks."""
    if not cond:
        raise UserError(message)


# ----------------------------------------------------------------------------- files

def atomic_write_bytes(path, data):
    """Write bytes to `path` via a temp file in the same folder and os.replace (never half-written)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
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


def save_checkpoint(obj, path):
    """torch.save `obj` with a magic header and a sha256 of the payload, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, CKPT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint; a truncated or corrupted file is refused."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; train one with `python train.py --out DIR`")
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw.startswith(CKPT_MAGIC):
        raise UserError(f"{path} is not a checkpoint written by train.py (bad header); retrain or pass the right file")
    digest, _, payload = raw[len(CKPT_MAGIC):].partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise UserError(f"checkpoint {path} is truncated or corrupted (checksum mismatch); "
                        "delete it and resume from an older copy or retrain")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


# ----------------------------------------------------------------------------- runtime

def resolve_device(name):
    """'auto' -> cuda if available else cpu; anything else is validated."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is visible; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None


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
            print(f"[{self.stage}] {self.done}/{self.total} {rate:7.1f} {self.unit}/s eta {eta:5.0f}s {extra}",
                  file=self.stream, flush=True)

    def elapsed(self):
        return time.time() - self.t0
