"""The real Fashion-MNIST files (Debian's `dataset-fashion-mnist`, installed by `make fashion-mnist`
and by CI) through the real-data path: reading the gzipped IDX files, their labels, one tiny
training step.

Skipped where the files are absent, except under REQUIRE_EXTRAS=1 (`make test-extras`, CI), where a
missing dataset fails: CI installs it, so a skip there would hide a broken install or reader.
References are the data set's published facts (Xiao et al. 2017, arXiv 1708.07747): 60,000 training
images of 28 x 28 in 10 classes of 6,000; the first training label is 9 (ankle boot); and the
pixel mean 0.2860 and standard deviation 0.3530 (on [0, 1]) that the usual normalization uses.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import common
import data
import train

FOLDER = os.path.join(data.DATASETS_ROOT, "fashion-mnist")
PRESENT = (os.path.isfile(os.path.join(FOLDER, data.IDX_IMAGES + ".gz"))
           or os.path.isfile(os.path.join(FOLDER, data.IDX_IMAGES)))
# set by `make test-extras` (CI), which installs the dataset
REQUIRED = os.environ.get("REQUIRE_EXTRAS") == "1"
pytestmark = pytest.mark.skipif(not PRESENT and not REQUIRED,
                                reason=f"Fashion-MNIST is not installed in {FOLDER} "
                                       "(make fashion-mnist)")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_dataset_is_installed_where_required():
    assert PRESENT, (f"{FOLDER} holds no {data.IDX_IMAGES}[.gz], yet CI installs "
                     "dataset-fashion-mnist")


def test_the_real_files_read_as_published():
    ds = data.load_data("fashion-mnist", 28)
    assert (ds.images.shape == (60000, 28, 28, 1) and ds.images.dtype == np.uint8
            and ds.channels == 1)
    assert np.bincount(ds.labels).tolist() == [6000] * 10 and ds.labels[0] == 9
    assert ds.label_names == data.FASHION_CLASSES and data.stored_size("fashion-mnist") == (28, 28)
    x = ds.images / 255.0
    assert abs(x.mean() - 0.2860) < 5e-4 and abs(x.std() - 0.3530) < 5e-4
    # resized with LANCZOS, as data.py documents
    small = data.load_data("fashion-mnist", 8, n=64, seed=3)
    pick = np.random.default_rng(3).permutation(60000)[:64]
    ref = np.stack([np.asarray(Image.fromarray(ds.images[i, ..., 0]).resize((8, 8), Image.LANCZOS))
                    for i in pick])
    assert (np.array_equal(small.images[..., 0], ref)
            and np.array_equal(small.labels, ds.labels[pick]))


def test_one_tiny_training_step_on_the_real_files(tmp_path):
    out = tmp_path / "m"
    train.main(["--out", str(out), "--data", "fashion-mnist", "--n-train", "16",
                "--image-size", "8", "--steps", "2", "--base", "16", "--attn-res", "4",
                "--T", "20", "--batch", "8", "--labels", "true", "--sample-n", "4",
                "--sample-steps", "2", "--log-every", "1000"])
    ck = common.load_checkpoint(out / "ckpt.pt")
    # the label table holds the source's 10 classes, whether or not all of them are among these 16
    # images
    assert (ck["model_args"]["channels"] == 1
            and ck["num_classes"] == len(data.FASHION_CLASSES) == 10 and ck["step"] == 2)
    with Image.open(out / "samples.png") as im:
        assert im.mode == "L"
    # the shorthand the model names is found again
    r = subprocess.run([sys.executable, "extract.py", "--ckpt", str(out / "ckpt.pt"),
                        "--out", str(tmp_path / "x"), "--methods", "uncond", "--n-gen", "4",
                        "--sample-steps", "2", "--curve-points", "0"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
