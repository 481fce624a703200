"""Files a distrusted party could have made never run code here, and nothing is destroyed before
every check has passed (AUDIT.md, "Loading files you did not make").

  - a planted pickle with a side effect (it creates a marker folder when unpickled) in every place
    the code loads from: a checkpoint with a valid header and checksum (--ckpt, a train.py --out
    folder, train.py --resume), every kind of cache file under OUT/cache (features, both
    classifiers, generation batches), an earlier run's samples.npz, an .npz given as --data,
    metrics.py's feature files and a diffusers folder's .bin. Each plant is first shown live (an
    unsafe load creates the marker), then the tool must refuse it in one `error:` line, exit code 2,
    and the marker must not exist;
  - a second train.py or extract.py run into an --out that a running one holds is refused in one
    line;
  - an interrupted train.py --overwrite leaves the earlier run's checkpoint, config.json and
    samples.png as they were; reproduce.py --overwrite deletes nothing when a check fails;
  - retraining in place: the cache keys change with the weights, a rerun into the old --out is
    refused unless --overwrite, which recomputes; --resume refuses training images that changed;
  - Ctrl-C, running out of memory and a full disk are one line (exit 130, 2, 2), never a traceback.
"""
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

import common
import extract
import metrics
import reproduce
import train
from test_cli import EXTRACT_TINY, TINY_TRAIN, assert_one_error


class Plant:
    """Unpickling this calls os.mkdir(marker): the side effect a malicious file would hide."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def checkpoint_bytes(obj):
    """obj as save_checkpoint would write it, header and checksum included, bypassing its type
    check."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return common.CKPT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def live(marker, load):
    """The plant really runs code when loaded unsafely (so the test below can fail); marker
    removed."""
    load()
    assert os.path.isdir(marker), "the plant did not fire under an unsafe load"
    os.rmdir(marker)


def refused(main, argv, capsys, marker, needle=None):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.run_main(main, argv)
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if ln.strip() and not ln.startswith(("[", "note:"))]
    assert_one_error(e.value.code, err, argv, needle)
    assert not os.path.exists(marker), f"{argv}: the planted pickle ran"


def _exit(code):
    if code:
        raise SystemExit(code)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained model and one extraction of uncond, cond and side: every kind of cache
    file."""
    root = tmp_path_factory.mktemp("untrusted")
    train.main(["--out", str(root / "m")] + TINY_TRAIN)
    argv = ["--ckpt", str(root / "m" / "ckpt.pt"), "--out", str(root / "x"),
            "--methods", "uncond,cond,side", "--curve-points", "0"] + EXTRACT_TINY
    extract.main(argv)
    return root, argv


def test_a_planted_checkpoint_never_runs(run, tmp_path, capsys):
    root, _ = run
    marker = tmp_path / "MARKER"
    good = common.load_checkpoint(root / "m" / "ckpt.pt")
    for name, obj in (("top", {"ema": Plant(marker)}),
                      ("nested", dict(good, config=dict(good["config"], lr=Plant(marker))))):
        raw = checkpoint_bytes(obj)
        live(marker, lambda: torch.load(io.BytesIO(raw.split(b"\n", 2)[2]), weights_only=False))
        (tmp_path / f"{name}.pt").write_bytes(raw)
        refused(extract.main, ["--ckpt", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / "x")]
                + EXTRACT_TINY, capsys, marker, "could run code")
    # a raw pickle (no header) with a JSON beside it: not TorchScript either
    raw = pickle.dumps({"ema": Plant(marker)})
    (tmp_path / "raw.pt").write_bytes(raw)
    (tmp_path / "raw.json").write_text(json.dumps(dict(image_size=8)))
    refused(extract.main,
            ["--ckpt", str(tmp_path / "raw.pt"), "--data", "faces", "--out", str(tmp_path / "x")]
            + EXTRACT_TINY, capsys, marker, "not a TorchScript file")
    folder = tmp_path / "runfolder"  # a train.py --out folder as --ckpt, and as train.py --resume
    folder.mkdir()
    (folder / "ckpt.pt").write_bytes(checkpoint_bytes({"ema": Plant(marker)}))
    refused(extract.main, ["--ckpt", str(folder), "--out", str(tmp_path / "x")] + EXTRACT_TINY,
            capsys, marker, "could run code")
    refused(train.main, ["--out", str(folder), "--resume"] + TINY_TRAIN, capsys, marker,
            "could run code")


def test_every_cache_file_is_data_only(run, capsys):
    root, argv = run
    cache = root / "x" / "cache"
    marker = root / "MARKER"
    pts = sorted(p for p in cache.iterdir() if p.suffix == ".pt")
    npys = sorted(cache.glob("*/*.npy"))
    # features, clf-side, clf-cond
    assert {p.name.split("-")[0] for p in pts} == {"features", "clf"} and len(pts) == 3
    assert ({p.parent.name.rsplit("-", 1)[0] for p in npys}
            == {"syn", "gen-uncond", "gen-cond", "gen-side"})
    for path in pts + npys:
        keep = path.read_bytes()
        if path.suffix == ".pt":
            raw = checkpoint_bytes({"state": Plant(marker), "report": {}})
            live(marker, lambda: torch.load(io.BytesIO(raw.split(b"\n", 2)[2]), weights_only=False))
            path.write_bytes(raw)
        else:
            np.save(path, np.array([Plant(marker)], dtype=object))
            live(marker, lambda: np.load(path, allow_pickle=True))
        try:
            refused(extract.main, argv, capsys, marker, str(path))
        finally:
            path.write_bytes(keep)
    samples = root / "x" / "samples.npz"  # an earlier run's images, kept beside new methods
    keep = samples.read_bytes()
    np.savez(samples, images=np.array([Plant(marker)], dtype=object), method=np.array(["uncond"]),
             cluster=np.zeros(1), index=np.zeros(1))
    try:
        refused(extract.main, argv[:5] + ["side_random"] + argv[6:], capsys, marker, "samples.npz")
    finally:
        samples.write_bytes(keep)
    extract.main(argv)  # the restored cache is whole again: the same command succeeds


def test_pickled_arrays_are_refused(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    np.savez(tmp_path / "d.npz", images=np.array([Plant(marker)], dtype=object))
    live(marker, lambda: np.load(tmp_path / "d.npz", allow_pickle=True)["images"])
    refused(train.main,
            ["--out", str(tmp_path / "m"), "--data", str(tmp_path / "d.npz")] + TINY_TRAIN,
            capsys, marker, "d.npz")
    np.save(tmp_path / "f.npy", np.array([Plant(marker)], dtype=object))
    refused(lambda a: _exit(metrics.main(a)),
            [str(tmp_path / "f.npy")] * 2 + ["--similarity", "features"], capsys, marker, "f.npy")


def test_a_diffusers_bin_is_loaded_only_if_it_holds_tensors(tmp_path, capsys):
    if os.environ.get("REQUIRE_EXTRAS") != "1":
        pytest.importorskip("diffusers")
    marker = tmp_path / "MARKER"
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(
        _class_name="UNet2DModel", sample_size=8, in_channels=3, out_channels=3,
        block_out_channels=[16, 32], down_block_types=["DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D"], layers_per_block=1, norm_num_groups=8)))
    torch.save({"conv_in.weight": Plant(marker)}, folder / "diffusion_pytorch_model.bin")
    live(marker, lambda: torch.load(folder / "diffusion_pytorch_model.bin", weights_only=False))
    refused(extract.main,
            ["--ckpt", str(folder), "--data", "faces", "--out", str(tmp_path / "x")] + EXTRACT_TINY,
            capsys, marker, "diffusion_pytorch_model.bin")


def test_save_checkpoint_writes_only_plain_data(tmp_path):
    with pytest.raises(TypeError, match="numpy"):
        common.save_checkpoint({"x": np.zeros(2)}, tmp_path / "a.pt")
    with pytest.raises(TypeError, match="Plant"):
        common.save_checkpoint({"x": [1, Plant("m")]}, tmp_path / "a.pt")
    assert not os.path.exists(tmp_path / "a.pt")
    obj = {"w": torch.arange(3.0), "cfg": {"mults": (1, 2), "name": "x", "off": None, 7: True}}
    common.save_checkpoint(obj, tmp_path / "b.pt")
    back = common.load_checkpoint(tmp_path / "b.pt")
    assert torch.equal(back["w"], obj["w"]) and back["cfg"] == obj["cfg"]


# ----------------------------------------------------------------- one run per folder, nothing lost

@pytest.mark.parametrize("script", ["train", "extract"])
def test_a_second_run_into_a_held_out_is_refused(run, script, tmp_path, capsys):
    root, argv = run
    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out / common.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)  # held as a running train.py / extract.py holds it
    try:
        main, args = ((train.main, ["--out", str(out)] + TINY_TRAIN) if script == "train" else
                      (extract.main, ["--ckpt", str(root / "m" / "ckpt.pt"), "--out", str(out),
                                      "--methods", "uncond"] + EXTRACT_TINY))
        refused(main, args, capsys, tmp_path / "none", "in use by another")
        assert sorted(os.listdir(out)) == [common.LOCK_NAME]
    finally:
        os.close(fd)
    main(args)  # the lock is gone with its holder: the same command runs


def test_an_interrupted_overwrite_leaves_the_old_run_whole(tmp_path, monkeypatch):
    out = tmp_path / "m"
    train.main(["--out", str(out)] + TINY_TRAIN + ["--sample-n", "4"])
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "config.json", "samples.png")}

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    # Ctrl-C before the new checkpoint exists
    monkeypatch.setattr(train, "save_checkpoint", interrupted)
    with pytest.raises(SystemExit) as e:
        common.run_main(train.main, ["--out", str(out), "--overwrite", "--lr", "1e-3"] + TINY_TRAIN
                        + ["--sample-n", "4"])
    assert e.value.code == common.EXIT_INTERRUPTED
    assert {f: (out / f).read_bytes() for f in before} == before
    monkeypatch.undo()
    # completed: the old run is gone
    train.main(["--out", str(out), "--overwrite", "--lr", "1e-3"] + TINY_TRAIN)
    assert (json.loads((out / "config.json").read_text())["lr"] == 1e-3
            and not os.path.exists(out / "samples.png"))


def test_reproduce_overwrite_deletes_nothing_when_a_check_fails(tmp_path, capsys):
    out = tmp_path / "r"
    (out / "models" / "n8-u0").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    # fewer than the profile's sizes
    np.savez(tmp_path / "few.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    for bad in (["--data", str(tmp_path / "missing")],
                ["--device", "cuda"] if not torch.cuda.is_available() else [],
                ["--data", str(tmp_path / "few.npz")]):
        if bad:
            refused(reproduce.main, ["--profile", "smoke", "--out", str(out), "--overwrite"] + bad,
                    capsys, tmp_path / "none")
            assert (os.path.isdir(out / "models" / "n8-u0")
                    and os.path.exists(out / "summary.json")), bad


# -------------------------------------------------------------- results follow the weights and data

def test_retraining_in_place_recomputes_and_is_never_mixed_in(tmp_path, capsys):
    """The same flags, path and step, other images in the same .npz: only the weights' hash tells
    the two apart."""
    model, out, npz = tmp_path / "m", tmp_path / "x", tmp_path / "d.npz"
    flags = (["--ckpt", str(model / "ckpt.pt"), "--out", str(out), "--methods", "uncond"]
             + EXTRACT_TINY)
    rng = np.random.default_rng(0)
    np.savez(npz, images=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    train.main(["--out", str(model), "--data", str(npz)] + TINY_TRAIN)
    extract.main(flags)
    np.savez(npz, images=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    # retrained in place
    train.main(["--out", str(model), "--data", str(npz), "--overwrite"] + TINY_TRAIN)
    refused(extract.main, flags, capsys, tmp_path / "none", "other model weights")
    extract.main(flags + ["--overwrite"])
    # a new key: recomputed
    assert len([p for p in (out / "cache").iterdir() if p.name.startswith("gen-uncond")]) == 2
    # the retrained model's own generations
    extract.main(flags[:3] + [str(tmp_path / "fresh")] + flags[4:])
    assert np.array_equal(np.load(out / "samples.npz")["images"],
                          np.load(tmp_path / "fresh" / "samples.npz")["images"])


def test_resume_refuses_training_images_that_changed(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images)
    argv = ["--out", str(tmp_path / "m"), "--data", str(tmp_path / "d.npz")] + TINY_TRAIN
    train.main(argv)
    images[0, 0, 0, 0] ^= 1  # one bit of one pixel
    np.savez(tmp_path / "d.npz", images=images)
    refused(train.main, argv + ["--resume", "--steps", "4"], capsys, tmp_path / "none",
            "other images")


# ---------------------------------------------------------------------- one line, never a traceback

@pytest.mark.parametrize("exc,code,needle", [
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"), (MemoryError(), 2, "out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"), 2,
     "out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/ckpt.pt"), 2,
     "No space left on device: /x/ckpt.pt; free disk"),
    (OSError(errno.ELOOP, "Too many levels of symbolic links", "/x/a"), 2, "symbolic link")])
def test_interruptions_and_the_environment_give_one_line(exc, code, needle, capsys):
    def main(argv):
        raise exc
    with pytest.raises(SystemExit) as e:
        common.run_main(main, [])
    err = capsys.readouterr().err.strip().splitlines()
    assert (e.value.code == code and len(err) == 1 and err[0].startswith("error: ")
            and needle in err[0]), err
    with pytest.raises(RuntimeError, match="a bug"):  # other errors are bugs: their traceback stays
        common.run_main(lambda a: (_ for _ in ()).throw(RuntimeError("a bug")), [])
