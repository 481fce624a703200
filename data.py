"""Datasets for the SIDE reference implementation, chosen by one `--data` string (nothing is
downloaded).

  faces      (default) procedural cartoon faces drawn with pillow: discrete attributes (skin tone,
             hair colour, hair style, eyes, mouth, background) are the "true labels" of Carlini Cond
             and of the informative-label experiment; continuous jitter (position, shape, spacing,
             colour) makes every face distinct. Face i depends only on (seed, i), never on n.
  fashion-mnist, mnist
             shorthands for /usr/share/datasets/fashion-mnist/ (Debian: `make fashion-mnist`, i.e.
             `apt-get install dataset-fashion-mnist`) and /usr/share/datasets/mnist/ (no package:
             put the IDX files there yourself): an IDX folder, below.
  DIR        a folder holding MNIST-family IDX files (train-images-idx3-ubyte and
             train-labels-idx1-ubyte, each gzipped or not): the training split, grey-scale, its
             labels the true labels (Fashion-MNIST: 60,000 images of 28 x 28, 10 classes of 6,000).
  DIR        otherwise a folder of images (labels from immediate subfolder names), e.g. a
             CelebA folder.
  FILE.npz   an array file with `images` and optional `labels` (and `value_range` for float images).
Folders and .npz files are read by metrics.load_images, their labels by labels_of. Channels are the
data's own: grey-scale data (IDX files, a folder of grey images, a one-channel .npz) stays one
channel everywhere (training, sampling, metrics, grids written as grey PNGs); colour is RGB; the
faces are RGB. Resizing to the working resolution (--size / --image-size), the same for every
source: centre-crop to a square, then PIL's LANCZOS filter (antialiased; e.g. Fashion-MNIST's 28 x
28 -> 8 x 8 or 16 x 16).

Also: to_tensor / to_uint8 (uint8 NHWC <-> float NCHW in [-1, 1], C = 1 or 3), save_grid,
permuted_labels.
Run `python data.py --data faces --size 32 --n 64 --out faces.png` for a preview grid.
Depends on numpy, pillow, torch, common.py and metrics.py (gzip and struct from the standard
library).
"""
import gzip
import io
import math
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import (MAX_CLASSES, MAX_IMAGE_SIZE, UserError, atomic_write_bytes, check,
                    check_writable, option, parse_config, run_main)
from metrics import MetricsInputError, image_files, load_images, resize_images

# ----------------------------------------------------------------------------- procedural faces

# (attribute, value names); the cardinalities are the lengths. Values are drawn uniformly.
ATTRIBUTES = [
    ("skin_tone", ["light", "medium", "tan", "dark"]),
    ("hair_color", ["black", "brown", "blonde", "red"]),
    ("hair_style", ["short", "long", "bald"]),
    ("eyes", ["round", "closed", "sunglasses"]),
    ("mouth", ["smile", "neutral", "open"]),
    ("background", ["blue", "green", "pink", "grey"]),
]
ATTR_NAMES = [a for a, _ in ATTRIBUTES]
ATTR_CARDINALITIES = [len(v) for _, v in ATTRIBUTES]
# 16 classes, both visible at 16 px (the "true labels" of Carlini Cond)
DEFAULT_LABEL_ATTR = "hair_color,skin_tone"
DEFAULT_N = 256  # faces when n is not given: about CelebA-HQ-FI's "small set" regime, scaled to CPU

SKIN = [(250, 221, 194), (229, 184, 135), (189, 128, 76), (112, 70, 42)]  # RGB per skin_tone
HAIR = [(35, 30, 30), (112, 66, 32), (238, 204, 110), (196, 72, 30)]      # RGB per hair_color
BACKGROUND = [(120, 180, 235), (150, 210, 140), (240, 170, 190), (185, 185, 185)]
# muted shirt colour; jittered strongly (clothing varies, carries no label)
SHIRT_BASE = (110, 110, 120)
SUPERSAMPLE = 4     # draw at 4x the output size and downsample with LANCZOS, for antialiasing
MIN_CANVAS = 128    # ... but never on a canvas under 128 px, so tiny outputs keep their shapes

# Continuous jitter: each value is uniform in [-1, 1] times this amplitude. Large enough that two
# faces with the same attributes differ clearly in pixels (no accidental near-copies), small
# enough that same-attribute faces cluster. Geometry in fractions of the image, colour in 0..255.
JITTER = {
    "dx": 0.06, "dy": 0.04,            # face centre shift
    "fw": 0.10, "fh": 0.08,            # face half-width / half-height, relative
    "eye_gap": 0.15, "eye_y": 0.04,    # eye spacing (relative) and height (fraction of image)
    "eye_size": 0.20, "mouth_w": 0.25, "mouth_y": 0.03,
    "hair_len": 0.30,                  # fringe height / long-hair length, relative
    # colour: "_v" shifts all channels (brightness), "_r/_g/_b" one channel (hue); the hue part
    # stays small so that e.g. a grey background never passes for a blue one
    "skin_v": 16, "skin_r": 8, "skin_g": 8, "skin_b": 8,
    "hair_v": 20, "hair_r": 12, "hair_g": 12, "hair_b": 12,
    "bg_v": 30, "bg_r": 14, "bg_g": 14, "bg_b": 14,
    "shirt_v": 50, "shirt_r": 50, "shirt_g": 50, "shirt_b": 50,
}


def sample_face(rng):
    """Draw one face's attributes (list of ints) and jitter (dict name -> value in [-1, 1])."""
    attrs = [int(rng.integers(c)) for c in ATTR_CARDINALITIES]
    jitter = dict(zip(JITTER, rng.uniform(-1.0, 1.0, len(JITTER)).tolist()))
    return attrs, jitter


def _color(base, jitter, prefix):
    """base RGB + shared brightness jitter + per-channel jitter, clipped to 0..255."""
    v = JITTER[prefix + "_v"] * jitter.get(prefix + "_v", 0.0)
    hue = lambda ch: JITTER[f"{prefix}_{ch}"] * jitter.get(f"{prefix}_{ch}", 0.0)  # noqa: E731
    return tuple(int(np.clip(round(c + v + hue(ch)), 0, 255)) for c, ch in zip(base, "rgb"))


def draw_face(attrs, jitter=None, size=32):
    """Render one face as uint8 (size, size, 3). attrs: one int per ATTRIBUTES entry (or a dict by
    name); jitter: dict of values in [-1, 1] (missing keys = 0, the average face).
    Coordinates are fractions of the image; the proportions below are the drawing itself (a
    cartoon face, CelebA-like framing), not hyperparameters."""
    if isinstance(attrs, dict):
        attrs = [attrs[a] for a in ATTR_NAMES]
    skin_i, hair_i, style, eyes, mouth, bg_i = (int(v) for v in attrs)
    jitter = jitter or {}
    j = {k: JITTER[k] * jitter.get(k, 0.0) for k in JITTER}  # amplitude x value in [-1, 1]
    R = max(SUPERSAMPLE * size, MIN_CANVAS)
    skin, hair = _color(SKIN[skin_i], jitter, "skin"), _color(HAIR[hair_i], jitter, "hair")
    img = Image.new("RGB", (R, R), _color(BACKGROUND[bg_i], jitter, "bg"))
    d = ImageDraw.Draw(img)
    P = lambda *xy: [v * R for v in xy]  # noqa: E731  (fractions of the image -> canvas pixels)
    lw = max(1, round(0.025 * R))  # stroke width: 2.5% of the image, about 1 px at 32 px output

    cx, cy = 0.5 + j["dx"], 0.52 + j["dy"]            # face centre
    a, b = 0.24 * (1 + j["fw"]), 0.30 * (1 + j["fh"])  # face half-width, half-height
    hl = 1 + j["hair_len"]
    shirt = _color(SHIRT_BASE, jitter, "shirt")
    d.ellipse(P(cx - 0.33, cy + b * 0.85, cx + 0.33, cy + b * 0.85 + 0.5), fill=shirt)  # shoulders
    d.rectangle(P(cx - a * 0.35, cy + b * 0.5, cx + a * 0.35, cy + b * 1.0), fill=skin)  # neck
    if style == 1:  # long: hair mass behind the head, down past the chin
        d.rounded_rectangle(P(cx - a * 1.25, cy - b * 1.12, cx + a * 1.25,
                              cy + b * (0.55 + 0.45 * hl)),
                            radius=a * 0.9 * R, fill=hair)
    for s in (-1, 1):  # ears
        d.ellipse(P(cx + s * a - 0.04, cy - 0.05, cx + s * a + 0.04, cy + 0.06), fill=skin)
    d.ellipse(P(cx - a, cy - b, cx + a, cy + b), fill=skin)
    if style in (0, 1):  # short cap / fringe over the forehead
        top = cy - b * 1.12
        d.chord(P(cx - a * 1.08, top, cx + a * 1.08, top + b * 2 * (0.42 + 0.15 * hl)), 180, 360,
                fill=hair)

    _draw_eyes(d, P, lw, cx, cy, a, b, j, eyes, skin, hair)
    _draw_mouth(d, P, lw, cx, cy, a, b, j, mouth)
    return np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.uint8)


def _draw_eyes(d, P, lw, cx, cy, a, b, j, eyes, skin, hair):
    """draw_face's eyes (with brows) and nose on the canvas `d`: P maps fractions of the image to
    canvas pixels, lw is the stroke width, (cx, cy) the face centre, (a, b) its half-width and
    half-height, j the scaled jitter; eyes is the attribute's value, skin and hair the colours."""
    ey = cy - 0.06 + j["eye_y"]
    gap, er = a * 0.45 * (1 + j["eye_gap"]), a * 0.17 * (1 + j["eye_size"])
    for s in (-1, 1):
        ex = cx + s * gap
        brow = P(ex - er, ey - er * (2.0 + 0.3 * s), ex + er, ey - er * (2.0 - 0.3 * s))
        d.line(brow, fill=hair, width=lw)
        if eyes == 0:  # round: white eye, dark pupil
            d.ellipse(P(ex - er, ey - er, ex + er, ey + er), fill=(255, 255, 255))
            d.ellipse(P(ex - er * 0.5, ey - er * 0.5, ex + er * 0.5, ey + er * 0.5),
                      fill=(30, 30, 40))
        elif eyes == 1:  # closed: a downward arc
            d.arc(P(ex - er, ey - er, ex + er, ey + er), 20, 160, fill=(40, 30, 30), width=lw)
        else:  # sunglasses: dark lenses joined by a bridge
            d.ellipse(P(ex - er * 1.4, ey - er * 1.2, ex + er * 1.4, ey + er * 1.2),
                      fill=(20, 20, 25))
    if eyes == 2:
        d.line(P(cx - gap + er, ey, cx + gap - er, ey), fill=(20, 20, 25), width=lw)
    d.line(P(cx, ey + er * 1.5, cx - a * 0.08, cy + b * 0.22),
           fill=tuple(int(c * 0.7) for c in skin), width=lw)


def _draw_mouth(d, P, lw, cx, cy, a, b, j, mouth):
    """draw_face's mouth on the canvas `d` (arguments as _draw_eyes'; mouth: the attribute's
    value)."""
    my, mw = cy + b * 0.5 + j["mouth_y"], a * 0.4 * (1 + j["mouth_w"])
    lips = (170, 40, 50)
    if mouth == 0:  # smile: lower half of an ellipse
        d.chord(P(cx - mw, my - mw * 0.6, cx + mw, my + mw * 0.6), 0, 180, fill=lips)
    elif mouth == 1:  # neutral: a straight line
        d.line(P(cx - mw * 0.8, my + 0.01, cx + mw * 0.8, my + 0.01), fill=lips, width=lw)
    else:  # open: dark oval with red rim
        d.ellipse(P(cx - mw * 0.55, my - mw * 0.35, cx + mw * 0.55, my + mw * 0.55),
                  fill=(70, 10, 20), outline=lips, width=lw)


def make_faces(n, size=32, seed=0):
    """n faces: (images uint8 (n,size,size,3), attrs int64 (n,A), attr_names, attr_cardinalities).
    Face i is drawn from np.random.default_rng([seed, i]) alone, so it does not depend on n."""
    check(n >= 1, f"number of faces must be >= 1, got {n}")
    check(size >= 8, f"image size must be >= 8 px, got {size}")
    images = np.empty((n, size, size, 3), np.uint8)
    attrs = np.empty((n, len(ATTRIBUTES)), np.int64)
    for i in range(n):
        attrs_i, jitter = sample_face(np.random.default_rng([seed, i]))
        attrs[i] = attrs_i
        images[i] = draw_face(attrs_i, jitter, size)
    return images, attrs, list(ATTR_NAMES), list(ATTR_CARDINALITIES)


def combine_attrs(attrs, label_attr=DEFAULT_LABEL_ATTR):
    """Labels from a comma-separated attribute list: the combination, first attribute most
    significant (mixed radix). Returns (labels int64 (N,), label_names like 'black/light')."""
    names = [s.strip() for s in label_attr.split(",") if s.strip()]
    check(names and len(set(names)) == len(names) and set(names) <= set(ATTR_NAMES),
          f"--label-attr {label_attr!r}: expected one or more distinct names from "
          f"{', '.join(ATTR_NAMES)} joined by commas, e.g. {DEFAULT_LABEL_ATTR!r}")
    idx = [ATTR_NAMES.index(s) for s in names]
    labels = np.zeros(len(attrs), np.int64)
    label_names = [""]
    for k in idx:
        labels = labels * ATTR_CARDINALITIES[k] + attrs[:, k]
        label_names = [f"{p}/{v}" if p else v for p in label_names for v in ATTRIBUTES[k][1]]
    return labels, label_names


# --------------------------------------------------------------------------- MNIST-family IDX files

# the training split's two files
IDX_IMAGES, IDX_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the type of every MNIST-family file
# a header promising more than 4 GiB is refused before reading (corrupt or hostile)
IDX_MAX_BYTES = 1 << 32
GZIP_MAGIC = b"\x1f\x8b"  # a gzipped file starts so; anything else is read as a plain IDX file
DATASETS_ROOT = "/usr/share/datasets"  # where Debian's dataset-* packages install
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag",
                   "Ankle boot"]  # Fashion-MNIST's label names (Xiao et al. 2017), in label order
DATASETS = {  # --data shorthand -> (class names, how to install it)
    "fashion-mnist": (FASHION_CLASSES, "install it with `make fashion-mnist` (apt-get install "
                                       "dataset-fashion-mnist)"),
    "mnist": ([str(k) for k in range(10)],
              "there is no Debian package: download the MNIST files yourself"),
}


def idx_files(folder):
    """(images path, labels path) of the IDX training split in `folder` (plain preferred over .gz),
    or None when it holds no train-images file."""
    def find(name):
        return next((os.path.join(folder, name + ext) for ext in ("", ".gz")
                     if os.path.isfile(os.path.join(folder, name + ext))), None)
    images = find(IDX_IMAGES)
    if images is None:
        return None
    labels = find(IDX_LABELS)
    check(labels is not None,
          f"{folder} holds {os.path.basename(images)} but no {IDX_LABELS}[.gz] beside it; "
          "put the training split's labels file there too")
    return images, labels


def read_idx(path, ndim, header_only=False):
    """One IDX file (gzipped or not, told by its first bytes) -> uint8 array of `ndim` dimensions,
    or with header_only its shape alone. The format: bytes 0 0, type code (0x08: unsigned byte),
    ndim; ndim big-endian uint32 sizes; the values, nothing after. Anything else (another type, a
    wrong ndim, a truncated file or stream, trailing bytes, a corrupt gzip) is one UserError naming
    the file."""
    with open(path, "rb") as fh:
        gz = fh.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    bad = f"{path} is not a valid IDX file"
    try:
        with (gzip.open if gz else open)(path, "rb") as fh:
            head = fh.read(4 + 4 * ndim)
            check(len(head) == 4 + 4 * ndim, f"{bad}: truncated header ({len(head)} bytes)")
            check(head[:2] == b"\0\0" and head[2] == IDX_UBYTE and head[3] == ndim,
                  f"{bad}: header {head[:4].hex()} is not 0000{IDX_UBYTE:02x}{ndim:02x} (unsigned "
                  f"bytes, {ndim} dimensions)")
            shape = struct.unpack(f">{ndim}I", head[4:])
            size = math.prod(shape)
            check(0 < size <= IDX_MAX_BYTES,
                  f"{bad}: sizes {shape} hold {size} values (expected 1..{IDX_MAX_BYTES})")
            if header_only:
                return shape
            body = fh.read(size + 1)  # one byte more, to see trailing data
    # gzip.BadGzipFile is an OSError; a cut stream is EOFError
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{bad}: {'corrupt or truncated gzip' if gz else 'unreadable'} ({e}); "
                        "replace it with an intact copy") from None
    check(len(body) == size, f"{bad}: {'truncated' if len(body) < size else 'trailing bytes'}: "
                             f"{len(body) if len(body) <= size else 'more than ' + str(size)} "
                             f"value bytes for sizes {shape} ({size})")
    return np.frombuffer(body, np.uint8).reshape(shape)


def dataset_folder(spec):
    """The folder a --data shorthand (DATASETS) names, refused in one line saying how to install it
    when it holds no IDX training files; any other spec unchanged."""
    if spec not in DATASETS:
        return spec
    folder = os.path.join(DATASETS_ROOT, spec)
    if not (os.path.isdir(folder) and idx_files(folder)):
        raise UserError(f"--data {spec}: {folder}/ holds no {IDX_IMAGES}[.gz]; "
                        f"{DATASETS[spec][1]}, or put the four IDX files ({IDX_IMAGES}.gz, "
                        f"{IDX_LABELS}.gz, t10k-...) in a folder and pass --data FOLDER")
    return folder


def load_idx(folder, size, n=None, seed=0):
    """(images uint8 (N, size, size, 1), labels int64 (N,), label names) of the IDX training split
    in `folder`; n: the nested seeded sample of load_data, drawn before resizing (only those are
    resized)."""
    images_path, labels_path = idx_files(folder)
    x, y = read_idx(images_path, 3), read_idx(labels_path, 1)
    check(len(x) == len(y),
          f"{images_path} holds {len(x)} images but {labels_path} {len(y)} labels; "
          "they must be the same split")
    if n is not None:
        check(n <= len(x),
              f"{n} images asked for (--n-train / --n), but {folder} holds only {len(x)}")
        pick = np.random.default_rng(seed).permutation(len(x))[:n]
        x, y = x[pick], y[pick]
    names = DATASETS.get(os.path.basename(os.path.realpath(folder)), ([],))[0]
    k = int(y.max()) + 1
    names = names if len(names) >= k else [str(c) for c in range(k)]
    return resize_images(x[..., None], size), y.astype(np.int64), names


def stored_size(spec):
    """(H, W) of a data source's images as stored, before any resizing; None for the faces (drawn at
    any size) and for a folder of images of mixed sizes."""
    if spec == "faces":
        return None
    folder = dataset_folder(spec)
    if os.path.isdir(folder) and idx_files(folder):
        return tuple(read_idx(idx_files(folder)[0], 3, header_only=True)[1:])
    try:
        return tuple(load_images(folder).shape[1:3])
    except MetricsInputError:
        return None


# ----------------------------------------------------------------------------- datasets

@dataclass
class Dataset:
    images: np.ndarray          # uint8 (N, H, W, C), C = 1 (grey-scale) or 3 (RGB)
    labels: np.ndarray | None   # int64 (N,) class per image, or None when the source has none
    label_names: list           # name of each class index
    attrs: np.ndarray | None    # int64 (N, A) all attributes (faces only)
    attr_names: list
    source: str                 # what was loaded, for logs and saved configs

    @property
    def channels(self):
        return self.images.shape[-1]


def load_data(spec="faces", size=32, n=None, seed=0, label_attr=None):
    """The dataset named by `spec`: "faces", a shorthand (DATASETS), an IDX folder, a folder of
    images or an .npz file (see header). label_attr (faces only; None = DEFAULT_LABEL_ATTR) picks
    the attributes whose combination is the label. For the other sources, n takes a random sample of
    n images drawn with `seed`, nested (the sample of n is the first n of one seeded permutation, so
    a smaller set is part of a larger one) and mixing every class, unlike the first n in file
    order."""
    check(isinstance(size, (int, np.integer)) and size >= 8,
          f"--size must be an integer >= 8, got {size!r}")
    check(n is None or n >= 1, f"--n must be >= 1, got {n}")
    if spec == "faces":
        images, attrs, attr_names, _ = make_faces(n or DEFAULT_N, size, seed)
        labels, label_names = combine_attrs(attrs, label_attr or DEFAULT_LABEL_ATTR)
        source = (f"faces(n={len(images)}, size={size}, seed={seed}, "
                  f"labels={label_attr or DEFAULT_LABEL_ATTR})")
        return Dataset(images, labels, label_names, attrs, attr_names, source)
    check(not label_attr,
          f"--label-attr {label_attr!r} only applies to --data faces; a folder takes its labels "
          "from subfolder names, IDX files from their labels file and an .npz from its `labels` "
          "array")
    folder = dataset_folder(spec)
    if os.path.isdir(folder) and idx_files(folder):
        images, labels, label_names = load_idx(folder, size, n, seed)
        return Dataset(images, labels, label_names, None, [],
                       f"{spec} (IDX, n={len(images)}, size={size})")
    if not (os.path.isdir(spec) or (os.path.exists(spec) and spec.endswith(".npz"))):
        raise UserError(f"--data {spec!r} is neither 'faces', "
                        f"{' nor '.join(repr(d) for d in DATASETS)} nor an existing folder (of "
                        "images or IDX files) or .npz file; pass --data faces, --data "
                        "path/to/folder, or --data path/to/file.npz")
    try:
        images = load_images(spec, size=size)
    except MetricsInputError as e:
        raise UserError(str(e)) from None
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] in (1, 3), \
        images.shape
    labels, label_names = labels_of(spec, len(images))
    if n is not None:  # a nested seeded sample: the first n of one permutation of the files
        check(n <= len(images),
              f"{n} images asked for (--n-train / --n), but {spec} holds only {len(images)}")
        pick = np.random.default_rng(seed).permutation(len(images))[:n]
        images, labels = images[pick], (None if labels is None else labels[pick])
    labels = None if labels is None else np.asarray(labels, np.int64)
    return Dataset(np.ascontiguousarray(images, np.uint8), labels, label_names, None, [],
                   f"{spec} (n={len(images)}, size={size})")


def labels_of(spec, n):
    """(labels int64 (n,) or None, class names) of the n images metrics.load_images reads from
    `spec`: a folder's labels are the index of each image's top-level subfolder among their sorted
    names, when every image sits in one; an .npz's are its `labels` array, class indices 0..K-1
    named "0".."K-1"."""
    if os.path.isdir(spec):
        parts = [os.path.relpath(f, spec).split(os.sep) for f in image_files(spec)]
        if not all(len(p) > 1 for p in parts):
            return None, []
        names = sorted({p[0] for p in parts})
        index = {c: i for i, c in enumerate(names)}
        return np.array([index[p[0]] for p in parts], np.int64), names
    with np.load(spec, allow_pickle=False) as z:  # load_images has read it: a zip of plain arrays
        labels = z["labels"] if "labels" in z.files else None
    if labels is None:
        return None, []
    check(labels.shape == (n,) and np.issubdtype(labels.dtype, np.integer),
          f"{spec}: `labels` must be {n} integers "
          f"to match `images`, got shape {labels.shape} dtype {labels.dtype}")
    check(labels.min() >= 0, f"{spec}: `labels` must be class indices >= 0, got {labels.min()}")
    check(labels.max() < MAX_CLASSES,
          f"{spec}: `labels` must be class indices 0..K-1 with K <= {MAX_CLASSES}, "
          f"got {labels.max()}; renumber them")
    return labels.astype(np.int64), [str(k) for k in range(int(labels.max()) + 1)]


def permuted_labels(labels, seed):
    """The random labelling of the random-label experiments: a seeded permutation of `labels`, so
    the number and sizes of the classes stay those of the real labels and only which image carries
    which label changes (one factor). Entries < 0 (no label) keep their places."""
    labels = np.asarray(labels, np.int64)
    out, keep = labels.copy(), np.flatnonzero(labels >= 0)
    out[keep] = labels[keep][np.random.default_rng(seed).permutation(len(keep))]
    return out


# ----------------------------------------------------------------------------- tensors and grids

def to_tensor(images):
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1], C = 1 (grey) or 3 (RGB)."""
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] in (1, 3), \
        (images.dtype, images.shape)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x):
    """float (N, C, H, W) in [-1, 1], C = 1 or 3 -> uint8 (N, H, W, C), rounding to the nearest
    level."""
    assert x.ndim == 4 and x.shape[1] in (1, 3), tuple(x.shape)
    x = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(images, path, nrow=8, pad=2):
    """Write images (uint8 NHWC array or float NCHW tensor in [-1, 1]) as one PNG, `nrow` per row: a
    grey PNG (mode L) for one channel, RGB for three."""
    if isinstance(images, torch.Tensor):
        images = to_uint8(images) if images.is_floating_point() else images.cpu().numpy()
    n, h, w, c = images.shape
    cols, rows = min(nrow, n), -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = images[k]
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- preview script

PREVIEW_MAX_N = 4096  # a preview grid of 64 x 64 faces; more would not be looked at


@dataclass
class PreviewConfig:
    data: str = option("faces", "dataset: faces, fashion-mnist, mnist, a folder (images or IDX "
                                "files) or an .npz", nonempty=True)
    size: int = option(32, "image side in pixels", lo=8, hi=MAX_IMAGE_SIZE)
    n: int = option(64, "images to show", lo=1, hi=PREVIEW_MAX_N)
    seed: int = option(0, "seed of the procedural faces", lo=0)
    out: str = option("faces.png", "where the grid PNG goes", nonempty=True)


def main(argv=None):
    cfg = parse_config(PreviewConfig, argv, "Write a grid of the first n images of a dataset.")
    check_writable(cfg.out, "--out", folder=False)
    ds = load_data(cfg.data, cfg.size, cfg.n, cfg.seed)
    save_grid(ds.images, cfg.out, nrow=int(np.ceil(np.sqrt(len(ds.images)))))
    print(f"{ds.source}: {len(ds.images)} images, {len(ds.label_names)} classes -> {cfg.out}")


if __name__ == "__main__":
    run_main(main)
