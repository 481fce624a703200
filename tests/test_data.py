"""Tests for data.py: procedural faces (determinism, shapes, attributes that really change the
pixels, no near-duplicates), dataset loading from faces / folders / .npz / IDX files (written here
from the format's definition, gzipped or not; every malformed or truncated file refused naming it;
the fashion-mnist shorthand saying how to install it), every bad input as a UserError, and the
uint8 <-> tensor <-> PNG plumbing at 3 and 1 channels. Tiny sizes only: runs in seconds on CPU."""
import gzip
import os
import struct
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from common import UserError, run_main  # noqa: E402

A = {name: k for k, name in enumerate(data.ATTR_NAMES)}


def rms(x, y):
    """Normalized L2 distance in [-1, 1] pixel units (what the copy thresholds use)."""
    return float(np.sqrt(np.mean((x.astype(np.float64) / 127.5
                                  - y.astype(np.float64) / 127.5) ** 2)))


# ----------------------------------------------------------------------------- faces

def test_deterministic_and_independent_of_n():
    a = data.make_faces(6, 32, seed=3)
    b = data.make_faces(6, 32, seed=3)
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])
    longer = data.make_faces(15, 32, seed=3)
    assert np.array_equal(longer[0][:6], a[0]) and np.array_equal(longer[1][:6], a[1])
    other = data.make_faces(6, 32, seed=4)
    assert not np.array_equal(other[0], a[0])


@pytest.mark.parametrize("size", [8, 16, 24, 32, 64])
def test_shapes_and_types(size):
    images, attrs, names, cards = data.make_faces(3, size)
    assert images.shape == (3, size, size, 3) and images.dtype == np.uint8
    assert attrs.shape == (3, len(names)) and attrs.dtype == np.int64
    assert names == ["skin_tone", "hair_color", "hair_style", "eyes", "mouth", "background"]
    assert cards == [4, 4, 3, 3, 3, 4]


def test_attribute_ranges_cover_every_value():
    _, attrs, _, cards = data.make_faces(200, 8)
    for k, c in enumerate(cards):
        assert set(attrs[:, k].tolist()) == set(range(c))


def test_every_attribute_value_changes_pixels():
    base = [0] * len(data.ATTR_NAMES)
    ref = data.draw_face(base, None, 32)
    for k, c in enumerate(data.ATTR_CARDINALITIES):
        for v in range(1, c):
            changed = list(base)
            changed[k] = v
            assert rms(data.draw_face(changed, None, 32), ref) > 0.02, (data.ATTR_NAMES[k], v)


def test_attribute_changes_only_its_region():
    size = 32
    short = {"skin_tone": 0, "hair_color": 0, "hair_style": 0, "eyes": 0, "mouth": 0,
             "background": 0}
    blonde = dict(short, hair_color=2)
    diff = np.abs(data.draw_face(short, None, size).astype(int)
                  - data.draw_face(blonde, None, size)).sum(-1)
    rows = np.nonzero(diff.any(1))[0]
    # short hair + brows sit above the eyes; the mouth, neck and shirt (lower 40%) stay identical
    assert diff.sum() > 0 and rows.max() < 0.6 * size
    smiling, open_mouth = dict(short, mouth=0), dict(short, mouth=2)
    diff = np.abs(data.draw_face(smiling, None, size).astype(int)
                  - data.draw_face(open_mouth, None, size)).sum(-1)
    rows = np.nonzero(diff.any(1))[0]
    assert diff.sum() > 0 and rows.min() > 0.5 * size
    green = dict(short, background=1)
    diff = np.abs(data.draw_face(short, None, size).astype(int)
                  - data.draw_face(green, None, size)).sum(-1)
    # corner changes, face centre does not
    assert diff[0, 0] > 0 and diff[size // 2, size // 2] == 0


def test_same_attributes_cluster_but_jitter_makes_faces_distinct():
    rng = np.random.default_rng(0)
    attrs = [1, 2, 1, 0, 0, 2]
    faces = [data.draw_face(attrs, data.sample_face(rng)[1], 16) for _ in range(8)]
    other = data.draw_face([3, 0, 2, 2, 2, 0], data.sample_face(rng)[1], 16)
    same = [rms(faces[i], faces[j]) for i in range(8) for j in range(i + 1, 8)]
    assert min(same) > 0.03                                   # jitter: no two faces identical
    assert max(same) < min(rms(f, other) for f in faces)      # attributes: real cluster structure


@pytest.mark.parametrize("size", [16, 32])
def test_distinct_faces_far_above_a_noisy_copy(size):
    images, _, _, _ = data.make_faces(300, size)
    x = images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1
    sq = (x ** 2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T) / x.shape[1]
    np.fill_diagonal(d2, np.inf)
    nn_min = np.sqrt(d2.min())
    noisy = np.clip(x + 0.05 * np.random.default_rng(0).standard_normal(x.shape), -1, 1)
    copy = np.sqrt(((noisy - x) ** 2).mean(1)).max()
    assert nn_min > 2 * copy, (nn_min, copy)


# ----------------------------------------------------------------------------- load_data: faces

def test_load_faces_default_labels_are_hair_color_times_skin_tone():
    ds = data.load_data("faces", 16, n=40, seed=1)
    assert ds.images.shape == (40, 16, 16, 3) and ds.attrs.shape == (40, 6)
    expect = ds.attrs[:, A["hair_color"]] * 4 + ds.attrs[:, A["skin_tone"]]
    assert np.array_equal(ds.labels, expect) and ds.labels.dtype == np.int64
    assert (len(ds.label_names) == 16 and ds.label_names[0] == "black/light"
            and ds.label_names[15] == "red/dark")
    assert np.array_equal(ds.images, data.make_faces(40, 16, seed=1)[0])
    assert len(data.load_data("faces", 8).images) == data.DEFAULT_N


def test_load_faces_label_attr():
    ds = data.load_data("faces", 8, n=30, label_attr="mouth")
    assert (np.array_equal(ds.labels, ds.attrs[:, A["mouth"]])
            and ds.label_names == ["smile", "neutral", "open"])
    ds = data.load_data("faces", 8, n=30, label_attr="eyes, background")
    assert np.array_equal(ds.labels, ds.attrs[:, A["eyes"]] * 4 + ds.attrs[:, A["background"]])
    assert len(ds.label_names) == 12


@pytest.mark.parametrize("kwargs, words", [
    (dict(spec="nope/missing_dir"), ["nope/missing_dir", "faces", ".npz"]),
    (dict(spec="faces", n=0), ["--n", "0"]),
    (dict(spec="faces", size=4), ["--size", "4"]),
    (dict(spec="faces", label_attr="hair_colour"), ["hair_colour", "hair_color"]),
    (dict(spec="faces", label_attr="mouth,mouth"), ["mouth,mouth"]),
])
def test_bad_arguments_raise_user_error(kwargs, words):
    kwargs = dict(dict(size=8, n=4), **kwargs)
    with pytest.raises(UserError) as e:
        data.load_data(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_error_text_via_run_main(capsys):
    with pytest.raises(SystemExit) as e:
        run_main(data.main, ["--data", "no_such_dataset", "--n", "4", "--size", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data 'no_such_dataset'") and err.count("\n") == 1


# ----------------------------------------------------------------------------- load_data: files

def _write_folder(root, n_per_class=3, size=20):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        os.makedirs(root / cls)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png")


def test_folder_with_subfolder_labels(tmp_path):
    _write_folder(tmp_path)
    ds = data.load_data(str(tmp_path), 16)
    assert ds.images.shape == (6, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and sorted(set(ds.labels.tolist())) == [0, 1]
    assert (ds.label_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
            and ds.attrs is None)
    first, more = data.load_data(str(tmp_path), 16, n=4), data.load_data(str(tmp_path), 16, n=5)
    # a seeded sample, not the first 4 in file order
    pick = np.random.default_rng(0).permutation(6)[:4]
    assert (np.array_equal(first.images, ds.images[pick])
            and np.array_equal(first.labels, ds.labels[pick]))
    # nested: the sample of 4 is part of the sample of 5
    assert np.array_equal(more.images[:4], first.images)
    assert not np.array_equal(data.load_data(str(tmp_path), 16, n=4, seed=1).images, first.images)
    with pytest.raises(UserError, match="7"):
        data.load_data(str(tmp_path), 16, n=7)
    with pytest.raises(UserError, match="label-attr"):
        data.load_data(str(tmp_path), 16, label_attr="hair_color")


def test_npz_nhwc_uint8_and_nchw_float(tmp_path):
    images = data.make_faces(5, 16)[0]
    np.savez(tmp_path / "u8.npz", images=images, labels=np.arange(5) % 2)
    ds = data.load_data(str(tmp_path / "u8.npz"), 16)
    assert np.array_equal(ds.images, images) and ds.labels.tolist() == [0, 1, 0, 1, 0]
    np.savez(tmp_path / "f.npz", images=data.to_tensor(images).numpy())
    ds = data.load_data(str(tmp_path / "f.npz"), 16)
    assert np.array_equal(ds.images, images) and ds.labels is None


def test_bad_files_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="missing_folder"):
        data.load_data(str(tmp_path / "missing_folder"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        data.load_data(str(tmp_path / "empty"), 16)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png"):
        data.load_data(str(tmp_path / "broken"), 16)
    np.savez(tmp_path / "noimages.npz", pictures=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="images"):
        data.load_data(str(tmp_path / "noimages.npz"), 16)
    np.savez(tmp_path / "mismatch.npz", images=np.zeros((3, 8, 8, 3), np.uint8),
             labels=np.zeros(2, np.int64))
    with pytest.raises(UserError, match="label"):
        data.load_data(str(tmp_path / "mismatch.npz"), 16)
    np.savez(tmp_path / "negative.npz", images=np.zeros((2, 8, 8, 3), np.uint8),
             labels=np.array([0, -1]))
    with pytest.raises(UserError, match="-1"):
        data.load_data(str(tmp_path / "negative.npz"), 16)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="notes.txt"):
        data.load_data(str(tmp_path / "notes.txt"), 16)


# --------------------------------------------------------------------------- tensors, grids, labels

def test_tensor_round_trip_is_exact():
    levels = np.arange(256, dtype=np.uint8)
    images = np.stack([levels.reshape(16, 16)] * 3, -1)[None]
    x = data.to_tensor(images)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 16, 16)
    assert (x.min() == -1.0 and x.max() == 1.0
            and torch.allclose(x[0, 0, 0, 1], torch.tensor(1 / 127.5 - 1)))
    assert np.array_equal(data.to_uint8(x), images)
    assert np.array_equal(data.to_uint8(torch.full((1, 3, 2, 2), 5.0)),
                          np.full((1, 2, 2, 3), 255, np.uint8))


def test_save_grid_layout(tmp_path):
    images = data.make_faces(5, 8)[0]
    data.save_grid(images, tmp_path / "g.png", nrow=3, pad=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    assert np.array_equal(grid[12:20, 12:20], images[4])  # row 1, column 1
    data.save_grid(data.to_tensor(images), tmp_path / "t.png", nrow=3, pad=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t.png")), grid)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_permuted_labels_keep_the_classes_and_their_sizes():
    y = np.array([0, 0, 0, 1, 1, 2, 5, 5, -1, 5])
    p = data.permuted_labels(y, seed=0)
    # the same multiset; no label stays no label
    assert np.array_equal(np.sort(p), np.sort(y)) and p[8] == -1
    assert not np.array_equal(p, y) and np.array_equal(p, data.permuted_labels(y, seed=0))
    assert not np.array_equal(p, data.permuted_labels(y, seed=1))


# --------------------------------------------------------------------- IDX files (the MNIST family)

def idx_bytes(a, type_code=0x08):
    """The IDX format written here from its definition: 0 0, type, ndim, big-endian uint32 sizes,
    values."""
    return (bytes([0, 0, type_code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
            + a.astype(np.uint8).tobytes())


def write_idx(folder, images, labels, gz=True, image_bytes=None, label_bytes=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in ((data.IDX_IMAGES, image_bytes or idx_bytes(images)),
                       (data.IDX_LABELS, label_bytes or idx_bytes(labels))):
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


IDX_X = np.random.default_rng(5).integers(0, 256, (12, 10, 10), dtype=np.uint8)
IDX_Y = np.arange(12) % 3


@pytest.mark.parametrize("gz", [True, False])
def test_an_idx_folder_reads_its_images_and_labels(tmp_path, gz):
    write_idx(tmp_path / "idx", IDX_X, IDX_Y, gz=gz)
    ds = data.load_data(str(tmp_path / "idx"), 10)
    assert ds.images.shape == (12, 10, 10, 1) and ds.channels == 1
    assert np.array_equal(ds.images[..., 0], IDX_X) and ds.labels.tolist() == IDX_Y.tolist()
    assert ds.label_names == ["0", "1", "2"] and ds.labels.dtype == np.int64
    small = data.load_data(str(tmp_path / "idx"), 8, n=5, seed=2)
    # the nested seeded sample of every other source
    pick = np.random.default_rng(2).permutation(12)[:5]
    # as documented
    ref = np.stack([np.asarray(Image.fromarray(IDX_X[i]).resize((8, 8), Image.LANCZOS))
                    for i in pick])
    assert (np.array_equal(small.images[..., 0], ref)
            and small.labels.tolist() == IDX_Y[pick].tolist())


def test_the_fashion_mnist_shorthand_says_how_to_install_when_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATASETS_ROOT", str(tmp_path))
    with pytest.raises(UserError, match=r"--data fashion-mnist: .*apt-get install "
                                        r"dataset-fashion-mnist.*--data FOLDER"):
        data.load_data("fashion-mnist", 8)
    with pytest.raises(UserError, match=r"--data mnist: .*no Debian package"):
        data.load_data("mnist", 8)
    write_idx(tmp_path / "fashion-mnist", IDX_X, np.arange(12) % 10)
    ds = data.load_data("fashion-mnist", 8, n=4)
    assert ds.label_names == data.FASHION_CLASSES and ds.images.shape == (4, 8, 8, 1)
    assert data.stored_size("fashion-mnist") == (10, 10)


def test_malformed_idx_files_are_refused_naming_the_file(tmp_path):
    good_x, good_y = idx_bytes(IDX_X), idx_bytes(IDX_Y)
    cases = {  # name -> (image bytes, label bytes, gz, words the one line must hold)
        "magic": (b"\x01" + good_x[1:], good_y, False, [data.IDX_IMAGES, "header"]),
        "type": (idx_bytes(IDX_X, 0x0D), good_y, False, [data.IDX_IMAGES, "unsigned bytes"]),
        "ndim": (idx_bytes(IDX_X[0]), good_y, False, [data.IDX_IMAGES, "3 dimensions"]),
        "short": (good_x[:-7], good_y, False, [data.IDX_IMAGES, "truncated"]),
        "header": (good_x[:9], good_y, False, [data.IDX_IMAGES, "truncated header"]),
        "trailing": (good_x + b"\0", good_y, False, [data.IDX_IMAGES, "trailing"]),
        "labels": (good_x, idx_bytes(IDX_Y[:-1]), False,
                   [data.IDX_LABELS, "12 images", "11 labels"]),
        "huge": (good_x[:4] + struct.pack(">3I", 2 ** 16, 2 ** 16, 2), good_y, False,
                 ["8589934592 values"]),  # > 4 GiB
    }
    for name, (xb, yb, gz, words) in cases.items():
        write_idx(tmp_path / name, None, None, gz=gz, image_bytes=xb, label_bytes=yb)
        with pytest.raises(UserError) as e:
            data.load_data(str(tmp_path / name), 8)
        assert (all(w in str(e.value) for w in words)
                and "\n" not in str(e.value)), (name, str(e.value))
    (tmp_path / "gz").mkdir()
    # a cut gzip stream
    (tmp_path / "gz" / (data.IDX_IMAGES + ".gz")).write_bytes(gzip.compress(good_x)[:-20])
    (tmp_path / "gz" / (data.IDX_LABELS + ".gz")).write_bytes(gzip.compress(good_y))
    with pytest.raises(UserError, match=rf"{data.IDX_IMAGES}\.gz .*corrupt or truncated gzip"):
        data.load_data(str(tmp_path / "gz"), 8)
    (tmp_path / "nolabels").mkdir()
    (tmp_path / "nolabels" / data.IDX_IMAGES).write_bytes(good_x)
    with pytest.raises(UserError, match=rf"no {data.IDX_LABELS}"):
        data.load_data(str(tmp_path / "nolabels"), 8)


# --------------------------------------------------------------------- grey-scale tensors and grids

def test_grey_tensor_round_trip_and_grey_png_grid(tmp_path):
    g = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = data.to_tensor(g)
    assert x.shape == (1, 1, 16, 16) and x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(data.to_uint8(x), g)
    images = np.concatenate([g, 255 - g, g // 2])
    data.save_grid(images, tmp_path / "g.png", nrow=2, pad=2)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and im.size == (2 * 18 + 2, 2 * 18 + 2)
        grid = np.asarray(im)
    assert (np.array_equal(grid[20:36, 2:18], images[2, ..., 0])
            and np.array_equal(grid[2:18, 20:36], images[1, ..., 0]))
    assert np.all(grid[20:36, 20:36] == 0)  # the empty fourth cell
