"""Pictures and tables for the reports: Table-1-shaped Markdown, grids of each extracted image
beside its nearest training images, and line plots drawn with pillow (no plotting library).

Used by extract.py and reproduce.py; imports metrics.py (for the nearest neighbours in grids).
"""
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import metrics
from common import atomic_write_bytes

BANDS = ("low", "mid", "high")


def _png(img, path):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def fmt(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def extraction_table(rows, first="method"):
    """Markdown table in the shape of the paper's Table 1: AMS and UMS (%) per band, distinct
    training images per band, p95 similarity, Carlini and Yoon counts. rows: name -> metrics dict."""
    head = ([first] + [f"AMS {b}" for b in BANDS] + [f"UMS {b}" for b in BANDS] + [f"distinct {b}" for b in BANDS]
            + ["p95", "Carlini", "Yoon"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = ([name] + [fmt(r["ams"].get(b)) for b in BANDS] + [fmt(r["ums"].get(b)) for b in BANDS]
                 + [fmt(r["distinct"].get(b)) for b in BANDS]
                 + [fmt(r.get("p95"), 4), fmt(r.get("carlini_extracted")), fmt(r.get("yoon_extracted"))])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def grid_of_matches(path, gen, train, result, top=16, k=3, scale=4, similarity="l2"):
    """PNG: one row per extracted generation (best match first): the generation, then its k nearest
    training images, each labelled with its normalized L2 distance."""
    order = np.argsort(np.asarray(result["nn_value"]))  # smallest distance first
    order = order[:top]
    if len(order) == 0:
        return
    d, idx = metrics.knn(gen[order], train, k=min(k, len(train)), metric="l2")
    d, idx = np.asarray(d), np.asarray(idx)
    h, w = gen.shape[1] * scale, gen.shape[2] * scale
    pad, label = 4, 12
    canvas = Image.new("RGB", ((w + pad) * (k + 1) + pad * 3, (h + label + pad) * len(order) + pad), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r, g in enumerate(order):
        y = pad + r * (h + label + pad)
        canvas.paste(Image.fromarray(gen[g]).resize((w, h), Image.NEAREST), (pad, y))
        draw.text((pad, y + h), f"gen {g}", fill="black", font=font)
        for j in range(idx.shape[1]):
            x = pad * 4 + (j + 1) * (w + pad)
            canvas.paste(Image.fromarray(train[idx[r, j]]).resize((w, h), Image.NEAREST), (x, y))
            draw.text((x, y + h), f"{d[r, j]:.3f}", fill="black", font=font)
    _png(canvas, path)


def line_plot(path, xs, series, xlabel="", ylabel="", size=(480, 320)):
    """A minimal line plot: one polyline per series, axes with min/max ticks, a legend."""
    W, H = size
    left, right, top, bottom = 60, 110, 20, 40
    img = Image.new("RGB", size, "white")
    dr, font = ImageDraw.Draw(img), ImageFont.load_default()
    ys = [v for s in series.values() for v in s if v is not None]
    ymin, ymax = min(ys + [0]), max(ys + [1])
    xmin, xmax = min(xs), max(xs)
    xmax = xmax if xmax > xmin else xmin + 1
    px = lambda x: left + (x - xmin) / (xmax - xmin) * (W - left - right)  # noqa: E731
    py = lambda y: H - bottom - (y - ymin) / (ymax - ymin or 1) * (H - top - bottom)  # noqa: E731
    dr.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill="black")
    for x in xs:
        dr.text((px(x) - 6, H - bottom + 4), f"{x:g}", fill="black", font=font)
    for yv in (ymin, (ymin + ymax) / 2, ymax):
        dr.text((4, py(yv) - 6), f"{yv:.3g}", fill="black", font=font)
    dr.text((W // 2 - 40, H - 16), xlabel, fill="black", font=font)
    dr.text((4, 2), ylabel, fill="black", font=font)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, (name, vals) in enumerate(series.items()):
        c = colors[i % len(colors)]
        pts = [(px(x), py(v)) for x, v in zip(xs, vals) if v is not None]
        if len(pts) > 1:
            dr.line(pts, fill=c, width=2)
        for p in pts:
            dr.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=c)
        dr.text((W - right + 8, top + 14 * i), name, fill=c, font=font)
    _png(img, path)


def montage(images, path, nrow=None, scale=2):
    """Plain grid of uint8 NHWC images (no labels)."""
    n = len(images)
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    h, w = images.shape[1] * scale, images.shape[2] * scale
    canvas = Image.new("RGB", (nrow * (w + 2) + 2, ncol * (h + 2) + 2), "white")
    for i, im in enumerate(images):
        canvas.paste(Image.fromarray(im).resize((w, h), Image.NEAREST), (2 + (i % nrow) * (w + 2), 2 + (i // nrow) * (h + 2)))
    _png(canvas, path)
