"""Datasets for the SIDE reference implementation, chosen by one `--data` string (built-in procedural faces, since no dataset may be downloaded).

  faces      (default) procedural cartoon faces drawn with pillow: discrete attributes (skin tone,
             hair colour, hair style, eyes, mouth, background) are the "true labels" of Carlini Cond
             and of the informative-label experiment; continuous jitter (position, shape, spacing,
             colour) makes every face distinct. Face i depends only on (seed, i), never on n.
  DIR        a folder of images (labels from immediate subfolder names), e.g. a CelebA folder.
  FILE.npz   an array file with `images` and optional `labels`.
Folders and .npz files are read by metrics.load_images (centre-crop + resize to --size).

Also: to_tensor / to_uint8 (uint8 NHWC <-> float NCHW in [-1, 1]), save_grid, permuted_labels.
Run `python data.py --data faces --size 32 --n 64 --out faces.png` for a preview grid.
Depends on numpy, pillow, torch, common.py and metrics.py.
"""
import dataclasses
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import (MAX_CLASSES, MAX_IMAGE_SIZE, UserError, atomic_write_bytes, check, check_writable, option, parse_config,
                    run_main)
from metrics import MetricsInputError, load_images

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
DEFAULT_LABEL_ATTR = "hair_color,skin_tone"  # 16 classes, both visible at 16 px (the "true labels" of Carlini Cond)
DEFAULT_N = 256  # faces when n is not given: about CelebA-HQ-FI's "small set" regime, scaled to CPU

SKIN = [(250, 221, 194), (229, 184, 135), (189, 128, 76), (112, 70, 42)]  # RGB per skin_tone
HAIR = [(35, 30, 30), (112, 66, 32), (238, 204, 110), (196, 72, 30)]      # RGB per hair_color
BACKGROUND = [(120, 180, 235), (150, 210, 140), (240, 170, 190), (185, 185, 185)]
SHIRT_BASE = (110, 110, 120)  # muted shirt colour; jittered strongly (clothing varies, carries no label)
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
    return tuple(int(np.clip(round(c + v + JITTER[f"{prefix}_{ch}"] * jitter.get(f"{prefix}_{ch}", 0.0)), 0, 255))
                 for c, ch in zip(base, "rgb"))


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
        d.rounded_rectangle(P(cx - a * 1.25, cy - b * 1.12, cx + a * 1.25, cy + b * (0.55 + 0.45 * hl)),
                            radius=a * 0.9 * R, fill=hair)
    for s in (-1, 1):  # ears
        d.ellipse(P(cx + s * a - 0.04, cy - 0.05, cx + s * a + 0.04, cy + 0.06), fill=skin)
    d.ellipse(P(cx - a, cy - b, cx + a, cy + b), fill=skin)
    if style in (0, 1):  # short cap / fringe over the forehead
        top = cy - b * 1.12
        d.chord(P(cx - a * 1.08, top, cx + a * 1.08, top + b * 2 * (0.42 + 0.15 * hl)), 180, 360, fill=hair)

    ey, gap, er = cy - 0.06 + j["eye_y"], a * 0.45 * (1 + j["eye_gap"]), a * 0.17 * (1 + j["eye_size"])
    for s in (-1, 1):
        ex = cx + s * gap
        brow = P(ex - er, ey - er * (2.0 + 0.3 * s), ex + er, ey - er * (2.0 - 0.3 * s))
        d.line(brow, fill=hair, width=lw)
        if eyes == 0:  # round: white eye, dark pupil
            d.ellipse(P(ex - er, ey - er, ex + er, ey + er), fill=(255, 255, 255))
            d.ellipse(P(ex - er * 0.5, ey - er * 0.5, ex + er * 0.5, ey + er * 0.5), fill=(30, 30, 40))
        elif eyes == 1:  # closed: a downward arc
            d.arc(P(ex - er, ey - er, ex + er, ey + er), 20, 160, fill=(40, 30, 30), width=lw)
        else:  # sunglasses: dark lenses joined by a bridge
            d.ellipse(P(ex - er * 1.4, ey - er * 1.2, ex + er * 1.4, ey + er * 1.2), fill=(20, 20, 25))
    if eyes == 2:
        d.line(P(cx - gap + er, ey, cx + gap - er, ey), fill=(20, 20, 25), width=lw)
    d.line(P(cx, ey + er * 1.5, cx - a * 0.08, cy + b * 0.22), fill=tuple(int(c * 0.7) for c in skin), width=lw)

    my, mw = cy + b * 0.5 + j["mouth_y"], a * 0.4 * (1 + j["mouth_w"])
    lips = (170, 40, 50)
    if mouth == 0:  # smile: lower half of an ellipse
        d.chord(P(cx - mw, my - mw * 0.6, cx + mw, my + mw * 0.6), 0, 180, fill=lips)
    elif mouth == 1:  # neutral: a straight line
        d.line(P(cx - mw * 0.8, my + 0.01, cx + mw * 0.8, my + 0.01), fill=lips, width=lw)
    else:  # open: dark oval with red rim
        d.ellipse(P(cx - mw * 0.55, my - mw * 0.35, cx + mw * 0.55, my + mw * 0.55),
                  fill=(70, 10, 20), outline=lips, width=lw)
    return np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.uint8)


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
          f"--label-attr {label_attr!r}: expected one or more distinct names from {', '.join(ATTR_NAMES)} "
          f"joined by commas, e.g. {DEFAULT_LABEL_ATTR!r}")
    idx = [ATTR_NAMES.index(s) for s in names]
    labels = np.zeros(len(attrs), np.int64)
    label_names = [""]
    for k in idx:
        labels = labels * ATTR_CARDINALITIES[k] + attrs[:, k]
        label_names = [f"{p}/{v}" if p else v for p in label_names for v in ATTRIBUTES[k][1]]
    return labels, label_names


# ----------------------------------------------------------------------------- datasets

@dataclass
class Dataset:
    images: np.ndarray          # uint8 (N, H, W, 3)
    labels: np.ndarray | None   # int64 (N,) class per image, or None when the source has none
    label_names: list           # name of each class index
    attrs: np.ndarray | None    # int64 (N, A) all attributes (faces only)
    attr_names: list
    source: str                 # what was loaded, for logs and saved configs


def load_data(spec="faces", size=32, n=None, seed=0, label_attr=None):
    """The dataset named by `spec`: "faces", a folder of images, or an .npz file (see header).
    label_attr (faces only; None = DEFAULT_LABEL_ATTR) picks the attributes whose combination is
    the label. For a folder / .npz, n takes a random sample of n images drawn with `seed`, nested
    (the sample of n is the first n of one seeded permutation, so a smaller set is part of a larger
    one) and mixing every class subfolder, unlike the first n in file order."""
    check(isinstance(size, (int, np.integer)) and size >= 8, f"--size must be an integer >= 8, got {size!r}")
    check(n is None or n >= 1, f"--n must be >= 1, got {n}")
    if spec == "faces":
        images, attrs, attr_names, _ = make_faces(n or DEFAULT_N, size, seed)
        labels, label_names = combine_attrs(attrs, label_attr or DEFAULT_LABEL_ATTR)
        source = f"faces(n={len(images)}, size={size}, seed={seed}, labels={label_attr or DEFAULT_LABEL_ATTR})"
        return Dataset(images, labels, label_names, attrs, attr_names, source)
    check(not label_attr, f"--label-attr {label_attr!r} only applies to --data faces; a folder takes its "
                          "labels from subfolder names and an .npz from its `labels` array")
    if not (os.path.isdir(spec) or (os.path.isfile(spec) and spec.endswith(".npz"))):
        raise UserError(f"--data {spec!r} is neither 'faces' nor an existing folder of images or .npz file; "
                        "pass --data faces, --data path/to/folder, or --data path/to/file.npz")
    try:
        images, labels, files = load_images(spec, size=size)
    except MetricsInputError as e:
        raise UserError(str(e)) from None
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, images.shape
    if labels is None:
        label_names = []
    elif os.path.isdir(spec):  # metrics.load_images numbers the sorted top-level subfolders
        label_names = sorted({os.path.relpath(f, spec).split(os.sep)[0] for f in files})
    else:
        check(labels.min() >= 0, f"{spec}: `labels` must be class indices >= 0, got {labels.min()}")
        check(labels.max() < MAX_CLASSES, f"{spec}: `labels` must be class indices 0..K-1 with K <= {MAX_CLASSES}, "
              f"got {labels.max()}; renumber them")
        label_names = [str(k) for k in range(int(labels.max()) + 1)]
    if n is not None:  # a nested seeded sample: the first n of one permutation of the files
        check(n <= len(images), f"{n} images asked for (--n-train / --n), but {spec} holds only {len(images)}")
        pick = np.random.default_rng(seed).permutation(len(images))[:n]
        images, labels = images[pick], (None if labels is None else labels[pick])
    labels = None if labels is None else np.asarray(labels, np.int64)
    return Dataset(np.ascontiguousarray(images, np.uint8), labels, label_names, None, [],
                   f"{spec} (n={len(images)}, size={size})")


def permuted_labels(labels, seed):
    """The random labelling of the random-label experiments: a seeded permutation of `labels`, so the
    number and sizes of the classes stay those of the real labels and only which image carries which
    label changes (one factor). Entries < 0 (no label) keep their places."""
    labels = np.asarray(labels, np.int64)
    out, keep = labels.copy(), np.flatnonzero(labels >= 0)
    out[keep] = labels[keep][np.random.default_rng(seed).permutation(len(keep))]
    return out


# ----------------------------------------------------------------------------- tensors and grids

def to_tensor(images):
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, (images.dtype, images.shape)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x):
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounding to the nearest level."""
    assert x.ndim == 4 and x.shape[1] == 3, tuple(x.shape)
    x = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(images, path, nrow=8, pad=2):
    """Write images (uint8 NHWC array or float NCHW tensor in [-1, 1]) as one PNG, `nrow` per row."""
    if isinstance(images, torch.Tensor):
        images = to_uint8(images) if images.is_floating_point() else images.cpu().numpy()
    n, h, w, _ = images.shape
    cols, rows = min(nrow, n), -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[k]
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- preview script

PREVIEW_MAX_N = 4096  # a preview grid of 64 x 64 faces; more would not be looked at


@dataclass
class PreviewConfig:
    data: str = option("faces", "dataset: faces, a folder of images, or an .npz file", nonempty=True)
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
