"""Images as they are: one file of each kind, made here with pillow, loads as a viewer
shows it (metrics.load_images, which data.py uses) against references computed from the pixel
values written: 16-bit scaled to 8 bits, palette and grayscale expanded, alpha composited on the
stated background, CMYK by the standard formula, EXIF orientation applied; a mode that cannot be
shown (32-bit float) is refused with one line naming the file."""
import os

import numpy as np
import pytest
from PIL import Image

import data
import metrics

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 4, 3), dtype=np.uint8)  # 6 rows x 4 columns: not square, so rotation shows


def load_one(path):
    images, _, files = metrics.load_images(os.path.dirname(path))
    assert files == [str(path)]
    return images[0].astype(int)


def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path):
    g8 = RGB[..., 0].astype(np.uint16)
    g16 = g8 * 257 + RNG.integers(0, 128, g8.shape).astype(np.uint16)  # low byte below half: rounds to g8
    im = Image.fromarray(g16)
    assert im.mode.startswith("I;16")
    im.save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as check:
        assert check.mode in ("I;16", "I")  # stored with 16 bits
    assert np.array_equal(load_one(tmp_path / "a.png"), g8[..., None])  # grey stays one channel


def test_palette_and_grayscale_are_expanded(tmp_path):
    colours = RGB[:2, :2].reshape(-1, 3)  # 4 colours: an exact palette
    img = colours[RNG.integers(0, 4, (6, 4))]
    Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    assert np.array_equal(load_one(tmp_path / "p.png"), img)
    (tmp_path / "g").mkdir()
    Image.fromarray(RGB[..., 1]).save(tmp_path / "g" / "g.png")
    assert np.array_equal(load_one(tmp_path / "g" / "g.png"), RGB[..., 1:2])  # grey stays one channel


def test_alpha_is_composited_on_the_stated_background(tmp_path):
    alpha = RNG.integers(0, 256, (6, 4, 1))
    Image.fromarray(np.concatenate([RGB, alpha.astype(np.uint8)], -1), "RGBA").save(tmp_path / "a.png")
    bg = np.array(metrics.BACKGROUND)
    expect = RGB * alpha / 255 + bg * (1 - alpha / 255)
    assert np.abs(load_one(tmp_path / "a.png") - expect).max() <= 1  # integer compositing: one level


def test_cmyk_uses_the_standard_formula(tmp_path):
    cmyk = RNG.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    k = cmyk[..., 3:].astype(float)
    expect = (255 - cmyk[..., :3]) * (255 - k) / 255
    assert np.abs(load_one(tmp_path / "c.tif") - expect).max() <= 1


@pytest.mark.parametrize("orientation,turn", [(3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)),
                                              (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation: 3 = 180°, 6 = display turned 90° clockwise, 8 = counter-clockwise
    Image.fromarray(RGB).save(tmp_path / "r.png", exif=exif)
    assert np.array_equal(load_one(tmp_path / "r.png"), turn(RGB))


def test_an_unshowable_mode_is_refused_naming_the_file(tmp_path):
    Image.fromarray(RGB[..., 0].astype(np.float32) / 255, "F").save(tmp_path / "f.tif")
    with pytest.raises(metrics.MetricsInputError, match=r"f\.tif.*mode F"):
        metrics.load_images(tmp_path)
    with pytest.raises(data.UserError, match=r"f\.tif"):
        data.load_data(str(tmp_path), 8)
