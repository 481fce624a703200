"""Images as they are: one file of each kind, made here with pillow, loads as a viewer
shows it (metrics.load_images, which data.py uses) against references computed from the pixel
values written: 16-bit scaled to 8 bits, palette expanded, grayscale kept as one channel (a folder
mixing grey and colour read as colour), alpha composited on the stated background by one rule in
PNGs and .npz arrays alike, CMYK by the standard formula, EXIF orientation applied; float .npz
images in [0, 1] and [-1, 1] both equal their uint8 copies (detected, or declared by value_range);
a mode that cannot be shown (32-bit float), a decompression bomb, a FIFO named like an image and a
corrupt or empty .npz are each refused with one line naming the file."""
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

import data
import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
# 6 rows x 4 columns: not square, so rotation shows
RGB = RNG.integers(0, 256, (6, 4, 3), dtype=np.uint8)


def load_one(path):
    images = metrics.load_images(os.path.dirname(path))
    assert metrics.image_files(os.path.dirname(path)) == [str(path)]
    return images[0].astype(int)


def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path):
    g8 = RGB[..., 0].astype(np.uint16)
    # low byte below half: rounds to g8
    g16 = g8 * 257 + RNG.integers(0, 128, g8.shape).astype(np.uint16)
    im = Image.fromarray(g16)
    assert im.mode.startswith("I;16")
    im.save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as check:
        assert check.mode in ("I;16", "I")  # stored with 16 bits
    assert np.array_equal(load_one(tmp_path / "a.png"), g8[..., None])  # grey stays one channel


def test_palette_and_grayscale_are_expanded(tmp_path):
    colours = RGB[:2, :2].reshape(-1, 3)  # 4 colours: an exact palette
    img = colours[RNG.integers(0, 4, (6, 4))]
    Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE,
                                 colors=4).save(tmp_path / "p.png")
    assert np.array_equal(load_one(tmp_path / "p.png"), img)
    (tmp_path / "g").mkdir()
    Image.fromarray(RGB[..., 1]).save(tmp_path / "g" / "g.png")
    # grey stays one channel
    assert np.array_equal(load_one(tmp_path / "g" / "g.png"), RGB[..., 1:2])


def test_alpha_is_composited_on_the_stated_background(tmp_path):
    alpha = RNG.integers(0, 256, (6, 4, 1))
    Image.fromarray(np.concatenate([RGB, alpha.astype(np.uint8)], -1),
                    "RGBA").save(tmp_path / "a.png")
    bg = np.array(metrics.BACKGROUND)
    expect = RGB * alpha / 255 + bg * (1 - alpha / 255)
    # integer compositing: one level
    assert np.abs(load_one(tmp_path / "a.png") - expect).max() <= 1


def test_cmyk_uses_the_standard_formula(tmp_path):
    cmyk = RNG.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    k = cmyk[..., 3:].astype(float)
    expect = (255 - cmyk[..., :3]) * (255 - k) / 255
    assert np.abs(load_one(tmp_path / "c.tif") - expect).max() <= 1


@pytest.mark.parametrize("orientation,turn",
                         [(3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)),
                          (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    exif = Image.Exif()
    # EXIF Orientation: 3 = 180°, 6 = display turned 90° clockwise, 8 = counter-clockwise
    exif[0x0112] = orientation
    Image.fromarray(RGB).save(tmp_path / "r.png", exif=exif)
    assert np.array_equal(load_one(tmp_path / "r.png"), turn(RGB))


def test_an_unshowable_mode_is_refused_naming_the_file(tmp_path):
    Image.fromarray(RGB[..., 0].astype(np.float32) / 255, "F").save(tmp_path / "f.tif")
    with pytest.raises(metrics.MetricsInputError, match=r"f\.tif.*mode F"):
        metrics.load_images(tmp_path)
    with pytest.raises(data.UserError, match=r"f\.tif"):
        data.load_data(str(tmp_path), 8)


# ------------------------------------------------------------------- channels, alpha, value ranges

def test_a_folder_mixing_grey_and_colour_is_read_as_colour(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    Image.fromarray(RGB[..., 2]).save(tmp_path / "b.png")
    images = metrics.load_images(tmp_path)
    assert images.shape == (2, 6, 4, 3)
    assert (np.array_equal(images[0], RGB)
            and np.array_equal(images[1], np.repeat(RGB[..., 2:], 3, -1)))


def test_alpha_is_the_same_in_a_png_and_in_an_npz(tmp_path):
    """RGBA and grey + alpha: a PNG in a folder and the same array in an .npz give identical pixels,
    both equal to round((v a + 255 (255 - a)) / 255) computed here (white background)."""
    alpha = RNG.integers(0, 256, (6, 4, 1)).astype(np.uint8)
    for name, v in (("rgba", RGB), ("la", RGB[..., :1])):
        arr = np.concatenate([v, alpha], -1)
        (tmp_path / name).mkdir()
        Image.fromarray(arr).save(tmp_path / name / "x.png")
        with Image.open(tmp_path / name / "x.png") as im:
            assert im.mode == name.upper()
        np.savez(tmp_path / f"{name}.npz", images=arr[None])
        expect = np.floor((v.astype(float) * alpha + 255.0 * (255 - alpha.astype(float))) / 255
                          + 0.5)
        from_png = metrics.load_images(tmp_path / name)[0]
        from_npz = metrics.load_images(tmp_path / f"{name}.npz")[0]
        assert (from_png.shape == v.shape and np.array_equal(from_png, from_npz)
                and np.array_equal(from_png, expect))


def test_float_npz_ranges_are_detected_or_declared(tmp_path, capsys):
    """The issue's case: float images in [0, 1] must match their uint8 copies exactly, as must
    [-1, 1]."""
    u8 = RNG.integers(0, 256, (10, 3, 6, 4), dtype=np.uint8)  # NCHW, the float layout
    u8[:, :, 0, 0] = 0  # a black pixel: [-1, 1] floats then have a negative value
    nhwc = u8.transpose(0, 2, 3, 1)
    np.savez(tmp_path / "f01.npz", images=u8.astype(np.float32) / 255)
    np.savez(tmp_path / "f11.npz", images=u8.astype(np.float32) / 127.5 - 1)
    assert np.array_equal(metrics.load_images(tmp_path / "f11.npz"), nhwc)
    assert "note:" not in capsys.readouterr().err  # negative values: [-1, 1], nothing to say
    assert np.array_equal(metrics.load_images(tmp_path / "f01.npz"), nhwc)
    assert "read as [0, 1]" in capsys.readouterr().err  # detected, and said
    bright = np.full((2, 1, 4, 4), 0.5, np.float32)  # declared [-1, 1]: 0.5 is level 191, not 128
    np.savez(tmp_path / "decl.npz", images=bright, value_range=np.array([-1.0, 1.0]))
    assert np.all(metrics.load_images(tmp_path / "decl.npz") == 191)
    np.savez(tmp_path / "d01.npz", images=bright, value_range=np.array([0.0, 1.0]))
    assert np.all(metrics.load_images(tmp_path / "d01.npz") == 128)
    for name, arr, extra, needle in (("f255", u8.astype(np.float32), {}, r"\[0, 1\] or \[-1, 1\]"),
                                     ("wrongdecl", u8.astype(np.float32) / 127.5 - 1,
                                      dict(value_range=[0.0, 1.0]), r"\[0, 1\]"),
                                     ("oddrange", bright, dict(value_range=[0.0, 2.0]),
                                      "value_range")):
        np.savez(tmp_path / f"{name}.npz", images=arr, **extra)
        with pytest.raises(metrics.MetricsInputError, match=needle):
            metrics.load_images(tmp_path / f"{name}.npz")


def test_an_mnist_style_npz_without_a_channel_axis_is_grey(tmp_path):
    g = RNG.integers(0, 256, (5, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", images=g)
    images = metrics.load_images(tmp_path / "g.npz")
    assert images.shape == (5, 6, 6, 1) and np.array_equal(images[..., 0], g)
    ds = data.load_data(str(tmp_path / "g.npz"), 8)
    assert ds.images.shape == (5, 8, 8, 1) and ds.channels == 1


# ------------------------------------------------------------------------ files that are not images

def png_header_only(path, w, h):
    """A PNG that declares w x h pixels (mode L) and holds one short row: its header is all a reader
    sees before deciding to decode (a 20,000 x 20,000 image made cheaply)."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


# over Pillow's own bomb limit; over ours only
@pytest.mark.parametrize("w,h", [(20000, 20000), (9000, 9000)])
def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, w, h):
    png_header_only(tmp_path / "bomb.png", w, h)
    with pytest.raises(metrics.MetricsInputError,
                       match=r"bomb\.png.*(decompression bomb|over the limit)"):
        metrics.load_images(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("name", ["pipe.png", "pipe.npz"])
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path, name):
    """Run in a subprocess with a timeout: reading a FIFO would block forever."""
    (tmp_path / "d").mkdir()
    Image.fromarray(RGB).save(tmp_path / "d" / "ok.png")
    os.mkfifo(tmp_path / "d" / name)
    spec = tmp_path / "d" / name if name.endswith(".npz") else tmp_path / "d"
    r = subprocess.run([sys.executable, "data.py", "--data", str(spec), "--size", "8", "--out",
                        str(tmp_path / "g.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (r.returncode == 2 and r.stderr.count("\n") == 1 and "not a regular file" in r.stderr
            and name in r.stderr), r.stderr


def npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("content,needle", [
    (b"", "not an .npz archive"),                                          # empty
    (b"images,labels\n1,2\n", "not an .npz archive"),                     # text named .npz
    # truncated
    (npz_bytes(images=np.zeros((2, 4, 4, 3), np.uint8))[:60], "cannot be read as .npz"),
    # needs pickle
    (lambda: npz_bytes(images=np.array([{"a": 1}], dtype=object)), "pickled objects"),
])
def test_corrupt_or_empty_npz_is_refused_in_one_line(tmp_path, capsys, content, needle):
    (tmp_path / "bad.npz").write_bytes(content() if callable(content) else content)
    with pytest.raises(metrics.MetricsInputError, match=rf"bad\.npz.*{needle}"):
        metrics.load_images(tmp_path / "bad.npz")
    code = metrics.main([str(tmp_path / "bad.npz"), str(tmp_path / "bad.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err


def test_a_lone_npy_named_npz_is_refused(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 4, 4, 3), np.uint8))
    (tmp_path / "x.npz").write_bytes(buf.getvalue())
    with pytest.raises(data.UserError, match=r"x\.npz is not an \.npz archive"):
        data.load_data(str(tmp_path / "x.npz"), 8)
