"""Plots drawn with pillow, no plotting library: a line plot (the sweeps of λ, K and Cond's scale)
and lines with shaded 95 % bands (the extraction-versus-budget curves). Each returns a PIL image
and writes nothing; report.py saves them. Depends on pillow and the standard library only.
"""
import math

from PIL import Image, ImageDraw, ImageFont

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def line_plot(xs, series, xlabel="", ylabel="", size=(480, 320)):
    """A minimal line plot (an RGB image): one polyline per series, axes with min/max ticks, a
    legend."""
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
    for i, (name, vals) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        pts = [(px(x), py(v)) for x, v in zip(xs, vals) if v is not None]
        if len(pts) > 1:
            dr.line(pts, fill=c, width=2)
        for p in pts:
            dr.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=c)
        dr.text((W - right + 8, top + 14 * i), name, fill=c, font=font)
    return img


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    span = (hi - lo) or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= n)
    return [k * step for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def band_plot(series, xlabel="", ylabel="", size=(640, 400)):
    """Lines with shaded 95 % bands (an RGB image, None without points). series: {name: [(x, mean,
    lo, hi), ...]}; axes with round ticks."""
    W, H = size
    left, right, top, bottom = 56, 220, 16, 44
    img = Image.new("RGB", size, "white")
    dr, font = ImageDraw.Draw(img, "RGBA"), ImageFont.load_default()
    xs = [p[0] for s in series.values() for p in s]
    ys = [v for s in series.values() for p in s for v in p[1:] if v is not None]
    if not xs:
        return None
    xt, yt = _ticks(min(xs + [0]), max(xs), n=8), _ticks(0, max(ys + [1]))
    px = lambda x: left + (x - xt[0]) / (xt[-1] - xt[0] or 1) * (W - left - right)  # noqa: E731
    py = lambda y: (H - bottom  # noqa: E731
                    - (y - yt[0]) / (yt[-1] - yt[0] or 1) * (H - top - bottom))
    for x in xt:
        dr.line([(px(x), H - bottom), (px(x), H - bottom + 4)], fill="black")
        dr.text((px(x) - 8, H - bottom + 6), f"{x:g}", fill="black", font=font)
    for y in yt:
        dr.line([(left - 4, py(y)), (W - right, py(y))], fill=(0, 0, 0, 30) if y else "black")
        dr.text((4, py(y) - 6), f"{y:g}", fill="black", font=font)
    dr.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill="black")
    dr.text((left + (W - left - right) // 2 - 3 * len(xlabel), H - 16), xlabel, fill="black",
            font=font)
    dr.text((left + 4, top - 12), ylabel, fill="black", font=font)
    for i, (name, pts) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        rgb = tuple(int(c[k:k + 2], 16) for k in (1, 3, 5))
        band = [p for p in pts if p[2] is not None]
        if len(band) > 1:
            dr.polygon([(px(p[0]), py(p[3])) for p in band]
                       + [(px(p[0]), py(p[2])) for p in band[::-1]],
                       fill=rgb + (50,))
        line = [(px(p[0]), py(p[1])) for p in pts]
        if len(line) > 1:
            dr.line(line, fill=c, width=2)
        for q in line:
            dr.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=c)
        dr.text((W - right + 10, top + 16 * i), name[:36], fill=c, font=font)
    return img
