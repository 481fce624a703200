"""Nothing a user types can hurt: every flag of every script, walked from the config
dataclasses (so a new field is covered without editing this file), with wrong-type, empty and
out-of-range values, must give exactly one `error:` line and exit code 2, no traceback, and leave
every file as it was. Then concrete cases found by a battery of bad inputs, the rerun rules of
train.py, extract.py and reproduce.py, and the permissions of atomically written files.

Everything runs `main(argv)` in-process (through common.run_main, as `python script.py` does) in
an empty working directory, so relative default outputs (runs/model, results, faces.png) would
show up there.
"""
import dataclasses
import json
import os
import stat

import numpy as np
import pytest
import torch

import bench
import common
import data
import extract
import metrics
import reproduce
import train

TINY_TRAIN = ["--steps", "2", "--n-train", "8", "--image-size", "8", "--base", "16",
              "--attn-res", "4", "--T", "10", "--sample-n", "0", "--sample-steps", "5",
              "--batch", "8", "--device", "cpu"]
SCRIPTS = [(train, train.TrainConfig), (extract, extract.ExtractConfig), (data, data.PreviewConfig),
           (bench, bench.BenchConfig), (reproduce, reproduce.ReproduceConfig)]


def snapshot(folder):
    """(path -> (size, mtime_ns, mode)) of every file and folder under `folder`."""
    out = {}
    for d, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def run(main, argv, capsys, where):
    """(exit code, stderr lines) of `python script.py argv`, asserting nothing under `where`
    changed."""
    before = snapshot(where)
    capsys.readouterr()
    try:
        common.run_main(main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert snapshot(where) == before, f"{argv}: files changed"
    return code, err


def assert_one_error(code, err, argv, needle=None):
    assert code == 2, (argv, code, err)
    assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err[0]
    if needle:
        assert needle in err[0], (argv, err)


def bad_values(f):
    """Values a user could type that the field's declaration must refuse (wrong type, empty, out of
    range)."""
    m, kind = f.metadata, common._kind(f)
    elem = common._elem(f) if kind is tuple else kind
    vals = []
    if kind is bool:
        return ["maybe"]
    if elem in (int, float):
        vals += (["abc", "nan" if elem is float else "1.5"] if kind is tuple
                 else ["abc", "", "inf" if elem is float else "1.5"])
        if isinstance(m.get("lo"), (int, float)):
            vals.append(str(m["lo"] - 1 if m["lo"] - 1 not in m["allow"] else m["lo"] - 2))
        if isinstance(m.get("gt"), (int, float)):
            vals.append(str(m["gt"]))
        if isinstance(m.get("lt"), (int, float)):
            vals.append(str(m["lt"]))
        if isinstance(m.get("hi"), (int, float)):
            vals.append(str(m["hi"] + 1))
        if isinstance(m.get("hi"), str):
            vals.append(str(10 ** 9))
    if m.get("choices") is not None:
        vals.append("bogus")
    if m.get("nonempty"):
        vals.append("")
    return vals


CASES = [(mod, f, v) for mod, cls in SCRIPTS for f in dataclasses.fields(cls)
         for v in bad_values(f)]


def test_the_table_covers_every_declared_range():
    """Every number field of every script declares a range, so the walk below tests each one's
    bounds."""
    for mod, cls in SCRIPTS:
        for f in dataclasses.fields(cls):
            if common._kind(f) in (int, float):
                m = f.metadata
                assert any(m.get(k) is not None for k in ("lo", "hi", "gt", "lt")), \
                    f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize("mod,f,value", CASES,
                         ids=[f"{m.__name__}--{f.name}={v!r}" for m, f, v in CASES])
def test_every_flag_refuses_bad_values_with_one_line(mod, f, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [common.flag_name(f), value]
    code, err = run(mod.main, argv, capsys, tmp_path)
    assert_one_error(code, err, argv, common.flag_name(f))


METRICS_CASES = [("--" + name.replace("_", "-"), v)
                 for name, default, _, valid in metrics.OPTIONS for v in
                 # (metrics.py's own argparse flags)
                 (["bogus"] if valid is not None and isinstance(default, str) else
                  ["abc", "1.5", "", str(valid[0] - 1), str(valid[1] + 1)] if valid is not None
                  else [])]


@pytest.mark.parametrize("flag,value", METRICS_CASES, ids=[f"{f}={v}" for f, v in METRICS_CASES])
def test_metrics_flags_refuse_bad_values_with_one_line(flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["a", "b", flag, value]
    code, err = run(lambda a: _exit(metrics.main(a)), argv, capsys, tmp_path)
    assert_one_error(code, err, argv, flag)


def _exit(code):
    if code:
        raise SystemExit(code)


@pytest.mark.parametrize("value", ["bogus", "cuda:x", ""])
def test_a_bad_device_is_refused_in_one_line_naming_the_flag(value, tmp_path, monkeypatch, capsys):
    """metrics.resolve_device is the one rule: the scripts (through common.resolve_device) and
    metrics.py's own CLI refuse a name that is no device, or cuda without a visible CUDA device,
    naming --device."""
    with pytest.raises(common.UserError, match="^--device "):
        common.resolve_device(value)
    assert common.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.chdir(tmp_path)
    argv = ["a", "b", "--device", value]
    code, err = run(lambda a: _exit(metrics.main(a)), argv, capsys, tmp_path)
    assert_one_error(code, err, argv, "--device")


def test_help_shows_each_default_once_with_its_range(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    # grad-clip; argparse's own "(default: ...)" is not added again
    assert text.count("(default: 1.0)") == 1
    assert "gradient-norm clip (Ho et al. 2020) [> 0.0] (default: 1.0)" in text
    assert "<lambda>" not in text


def test_messages_echo_values_as_typed_and_name_real_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run(reproduce.main, ["--sizes", "1"], capsys, tmp_path)
    assert_one_error(code, err, "--sizes 1", "--sizes 1: expected each >= 2")
    assert "1.0" not in err[0]
    code, err = run(reproduce.main, ["--sizes", "8.5"], capsys, tmp_path)
    assert_one_error(code, err, "--sizes 8.5", "expected an integer")
    code, err = run(train.main, ["--n-train", "x"], capsys, tmp_path)
    assert_one_error(code, err, "--n-train x", "--n-train: expected an integer, got 'x'")


# ------------------------------------------------------------------ concrete bad inputs, with files

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real 2-step 8-px checkpoint with T = 10, trained in-process."""
    out = tmp_path_factory.mktemp("model")
    train.main(["--out", str(out)] + TINY_TRAIN)
    return str(out / "ckpt.pt")


@pytest.mark.parametrize("argv,needle", [
    (["--grad-clip", "-1"], "--grad-clip"), (["--ckpt-every", "0"], "--ckpt-every"),
    (["--dropout", "2"], "--dropout"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--mults", "0,1"], "--mults"), (["--mults", ""], "--mults"),
    (["--num-res-blocks", "0"], "--num-res-blocks"),
    (["--num-res-blocks", "-1"], "--num-res-blocks"),
    (["--sample-n", "-3"], "--sample-n"), (["--warmup", "-10"], "--warmup"),
])
def test_train_cases_of_the_issue(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run(train.main, ["--out", str(tmp_path / "o")] + TINY_TRAIN + argv, capsys,
                    tmp_path)
    assert_one_error(code, err, argv, needle)


def test_train_out_naming_a_file_or_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    for out, needle in ((tmp_path / "f", "existing file"), (tmp_path / "f" / "sub", "is a file")):
        code, err = run(train.main, ["--out", str(out)] + TINY_TRAIN, capsys, tmp_path)
        assert_one_error(code, err, out, needle)


def read_only(folder):
    """Make `folder` read-only; skip when the user writes anyway (root ignores permission bits)."""
    os.chmod(folder, 0o555)
    try:
        open(os.path.join(folder, ".probe"), "w").close()
        os.unlink(os.path.join(folder, ".probe"))
        os.chmod(folder, 0o755)
        pytest.skip("permission bits do not stop this user (root)")
    except PermissionError:
        pass


def test_read_only_out_is_refused_before_any_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(ro)
    try:
        for main, argv in ((train.main, ["--out", str(ro / "m")] + TINY_TRAIN),
                           (data.main, ["--out", str(ro / "g.png")]),
                           (reproduce.main, ["--out", str(ro / "r")])):
            code, err = run(main, argv, capsys, tmp_path)
            assert_one_error(code, err, argv, "--out")
        code, err = run(lambda a: _exit(metrics.main(a)), ["a", "b", "--json", str(ro / "s.json")],
                        capsys, tmp_path)
        assert_one_error(code, err, "--json", "--json")
    finally:
        os.chmod(ro, 0o755)


def test_check_writable_refuses_read_only_places_even_for_root(tmp_path, monkeypatch):
    """Permission bits (os.access) and a read-only filesystem (statvfs ST_RDONLY) are both
    refused."""
    real = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode: False if os.fspath(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(common.UserError, match="--out .*cannot write"):
        common.check_writable(tmp_path / "x", "--out")
    monkeypatch.setattr(os, "access", real)
    flags = os.statvfs(tmp_path)

    class ReadOnly:
        f_flag = flags.f_flag | os.ST_RDONLY
    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly())
    with pytest.raises(common.UserError, match="read-only filesystem"):
        common.check_writable(tmp_path / "x", "--out")


def test_resume_without_checkpoint_says_so(tmp_path, capsys):
    capsys.readouterr()
    # reproduce.py always passes --resume
    train.main(["--out", str(tmp_path / "m"), "--resume"] + TINY_TRAIN)
    assert "--resume: " in capsys.readouterr().err  # not silent
    assert os.path.exists(tmp_path / "m" / "ckpt.pt")


@pytest.mark.parametrize("argv,needle", [
    (["--sample-steps", "50"], "the model's T = 10"), (["--similarity", "bogus"], "--similarity"),
    (["--sweep-n-gen", "-5"], "--sweep-n-gen"), (["--clf-lr", "-1"], "--clf-lr"),
    (["--clf-width", "0"], "--clf-width"),
    (["--grid-top", "-1"], "--grid-top"), (["--features", "nope"], "--features"),
])
def test_extract_cases_of_the_issue(ckpt, argv, needle, tmp_path, capsys):
    full = ["--ckpt", ckpt, "--out", str(tmp_path / "x"), "--sample-steps", "5"] + argv
    code, err = run(extract.main, full, capsys, tmp_path)
    assert_one_error(code, err, argv, needle)


def test_extract_refuses_a_cache_file_and_an_unknown_schedule(ckpt, tmp_path, capsys):
    ck = common.load_checkpoint(ckpt)
    common.save_checkpoint({"state": ck["ema"], "config": {"num_classes": 2}},
                           tmp_path / "clf-side-x.pt")  # like a cache file
    bad = dict(ck, config=dict(ck["config"], schedule="quadratic"))
    common.save_checkpoint(bad, tmp_path / "bad.pt")
    for path, needle in ((tmp_path / "clf-side-x.pt", "not a model checkpoint"),
                         (tmp_path / "bad.pt", "quadratic")):
        argv = ["--ckpt", str(path), "--out", str(tmp_path / "x"), "--sample-steps", "5"]
        code, err = run(extract.main, argv, capsys, tmp_path)
        assert_one_error(code, err, argv, needle)


class WrongShape(torch.nn.Module):  # TorchScript ε-models that are wrong in the ways issue 23 found
    def forward(self, x, t):
        return x[:, :1]


class ReturnsTuple(torch.nn.Module):
    def forward(self, x, t):
        return x, x


class NeedsLabels(torch.nn.Module):
    def forward(self, x, t, y):
        return x + y[:, None, None, None].float()


class Identity(torch.nn.Module):
    def forward(self, x, t):
        return x


SCHEDULE = dict(image_size=8, num_train_timesteps=10, beta_schedule="linear", beta_start=0.01,
                beta_end=0.2)


@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory):
    """Input files of the cases below: TorchScript models with their JSON, .npz variants, a text
    file."""
    d = tmp_path_factory.mktemp("inputs")
    for name, mod in (("wrong", WrongShape()), ("tuple", ReturnsTuple()), ("needsy", NeedsLabels()),
                      ("eps", Identity())):
        torch.jit.script(mod).save(str(d / f"{name}.pt"))
        (d / f"{name}.json").write_text(json.dumps(SCHEDULE))
    for name, change in (("cs", dict(clip_sample="false")), ("ist", dict(image_size=True)),
                         ("bigT", dict(num_train_timesteps=10 ** 10)),
                         ("tb", dict(trained_betas=[0.1, 0.2])), ("nc5", dict(num_classes=5)),
                         ("dm", dict(data="missing.npz"))):
        (d / f"{name}.pt").write_bytes((d / "eps.pt").read_bytes())
        (d / f"{name}.json").write_text(json.dumps(dict(SCHEDULE, **change)))
    images = data.load_data("faces", 8, n=12).images
    np.savez(d / "nolabels.npz", images=images)
    np.savez(d / "onelabel.npz", images=images, labels=np.full(12, 3))
    np.savez(d / "labelled.npz", images=images, labels=np.arange(12) % 2)
    np.savez(d / "biglabel.npz", images=images, labels=np.array([0] * 11 + [10 ** 12]))
    (d / "notes.txt").write_text("not a model")
    ck = common.load_checkpoint(ckpt)
    common.save_checkpoint(dict(ck, model_args=dict(ck["model_args"], image_size=10 ** 6)),
                           d / "huge.pt")
    return d


TS = ["--data", "{d}/labelled.npz", "--features", "pixels"]
ISSUE23 = [  # (script, argv with {d} = files, {c} = ckpt, the words the one error line must hold)
    ("train", ["--image-size", "65536"], "--image-size"), ("train", ["--T", "10000000000"], "--T"),
    ("train", ["--batch", "10000000"], "lower --n-train, --batch"),
    ("train", ["--attn-res", "5"], "--attn-res 5"),
    ("train", ["--data", "{d}/biglabel.npz", "--labels", "true"], "renumber"),
    ("train", ["--data", "{d}/nolabels.npz", "--labels", "true"], "--labels true needs labels"),
    ("extract", ["--sweep-k", "2,100"], "--sweep-k"),
    ("extract", ["--features", "{d}/notes.txt"], "--features"),
    ("extract", ["--similarity", "{d}/notes.txt"], "--similarity"),
    ("extract", ["--similarity", "{d}/eps.pt"], "--similarity"),
    ("extract", ["--data", "{d}/nolabels.npz", "--methods", "uncond,cond"], "--methods cond needs"),
    ("extract", ["--data", "{d}/onelabel.npz", "--methods", "uncond,cond"], "same label"),
    ("extract", ["--n-gen", "1000000000000"], "lower --n-gen"),
    ("extract", ["--curve-points", "1000000000"], "--curve-points"),
    ("extract", ["--ckpt", "{d}/huge.pt"], "declares sizes"),
    ("extract", ["--ckpt", "{d}/eps.pt", "--data", "{d}/labelled.npz"], "--features ddpm"),
    ("extract", ["--ckpt", "{d}/wrong.pt"] + TS, "returned shape (2, 1, 8, 8)"),
    ("extract", ["--ckpt", "{d}/tuple.pt"] + TS, "returned a tuple"),
    ("extract", ["--ckpt", "{d}/needsy.pt"] + TS, "num_classes = 0"),
    ("extract", ["--ckpt", "{d}/nc5.pt"] + TS, "num_classes = 5"),
    ("extract", ["--ckpt", "{d}/cs.pt"] + TS, 'clip_sample = "false" must be true or false'),
    ("extract", ["--ckpt", "{d}/ist.pt"] + TS, "image_size = true must be an integer"),
    ("extract", ["--ckpt", "{d}/bigT.pt"] + TS, "num_train_timesteps = 10000000000"),
    ("extract", ["--ckpt", "{d}/tb.pt"] + TS, "trained_betas must be"),
    ("extract", ["--ckpt", "{d}/dm.pt", "--features", "pixels"], "pass --data"),
]


@pytest.mark.parametrize("script,argv,needle", ISSUE23,
                         ids=[f"{s}:{' '.join(a)[:40]}" for s, a, _ in ISSUE23])
def test_cases_of_issue_23(script, argv, needle, files, ckpt, tmp_path, capsys):
    """Each refused before any work in one line (nothing written), TorchScript models probed on
    load."""
    argv = [a.format(d=files, c=ckpt) for a in argv]
    if script == "train":
        full = ["--out", str(tmp_path / "o")] + TINY_TRAIN + argv
    else:
        full = ["--ckpt", ckpt, "--out", str(tmp_path / "x")] + EXTRACT_TINY + argv
    code, err = run(train.main if script == "train" else extract.main, full, capsys, tmp_path)
    assert_one_error(code, err, argv, needle)


def test_reproduce_checks_extraction_settings_before_training(tmp_path, capsys):
    code, err = run(reproduce.main, ["--out", str(tmp_path / "r"), "--n-gen", "-5"], capsys,
                    tmp_path)
    assert_one_error(code, err, "--n-gen -5", "--n-gen")


# --------------------------------------------------------------------- reruns never destroy results

def test_train_rerun_into_a_finished_run_is_refused_unless_resume_or_overwrite(ckpt, tmp_path,
                                                                               capsys):
    out = tmp_path / "m"
    train.main(["--out", str(out)] + TINY_TRAIN)
    code, err = run(train.main, ["--out", str(out)] + TINY_TRAIN + ["--lr", "1e-3"], capsys,
                    tmp_path)
    assert_one_error(code, err, "rerun", "--overwrite")
    code, err = run(train.main, ["--out", str(out), "--resume"] + TINY_TRAIN + ["--lr", "1e-3"],
                    capsys, tmp_path)
    assert_one_error(code, err, "rerun", "different config")
    train.main(["--out", str(out), "--overwrite"] + TINY_TRAIN + ["--lr", "1e-3"])
    assert common.load_checkpoint(out / "ckpt.pt")["config"]["lr"] == 1e-3


def test_reproduce_rerun_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    cfg = dataclasses.asdict(reproduce.ReproduceConfig(out=str(out), profile="smoke"))
    (out / "summary.json").write_text(json.dumps(dict(config=cfg)))
    code, err = run(reproduce.main, ["--out", str(out), "--profile", "cpu"], capsys, tmp_path)
    assert_one_error(code, err, "rerun", "profile='smoke'")


EXTRACT_TINY = ["--n-gen", "4", "--batch", "4", "--n-syn", "8", "--K", "2", "--tau", "0",
                "--clf-steps", "2", "--clf-width", "8", "--sample-steps", "2", "--device", "cpu",
                "--grid-top", "2"]


def test_extract_rerun_adds_methods_and_refuses_other_settings(ckpt, tmp_path, capsys):
    out = tmp_path / "x"
    flags = ["--ckpt", ckpt, "--out", str(out)] + EXTRACT_TINY
    extract.main(flags + ["--methods", "uncond,side"])
    first = np.load(out / "samples.npz")
    side_imgs = first["images"][first["method"] == "side"]
    extract.main(flags + ["--methods", "side_random"])  # added beside the earlier methods
    rec = json.load(open(out / "metrics.json"))
    assert list(rec["methods"]) == ["uncond", "side", "side_random"]
    z = np.load(out / "samples.npz")
    assert sorted(set(z["method"])) == ["side", "side_random", "uncond"] and len(z["method"]) == 12
    assert np.array_equal(z["images"][z["method"] == "side"], side_imgs)
    report = (out / "REPORT.md").read_text()
    assert all(f"| {m} |" in report for m in ("uncond", "side", "side_random"))
    code, err = run(extract.main, flags + ["--methods", "uncond", "--eta", "0.5"], capsys, tmp_path)
    assert_one_error(code, err, "other settings", "eta=1.0")
    extract.main(flags + ["--methods", "uncond", "--eta", "0.5", "--overwrite"])
    assert list(json.load(open(out / "metrics.json"))["methods"]) == ["uncond"]
    assert sorted(os.listdir(out / "grids")) == [p for p in ["uncond.png"]
                                                 if os.path.exists(out / "grids" / p)]
    assert set(np.load(out / "samples.npz")["method"]) == {"uncond"}


# ------------------------------------------------------------------------- data that cannot be read

def bad_data(root):
    """name -> path of a data source each script must refuse in one line naming it (FIFOs:
    tests/test_images.py, in a subprocess with a timeout, as a regression would block)."""
    import gzip
    import struct
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    # a PNG header declaring 20,000 x 20,000 pixels (a decompression bomb), nothing decoded
    (root / "bomb").mkdir()
    (root / "bomb" / "big.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b""))
    (root / "empty.npz").write_bytes(b"")
    np.savez(root / "whole.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    (root / "cut.npz").write_bytes((root / "whole.npz").read_bytes()[:100])
    np.savez(root / "pickled.npz", images=np.array([{"a": 1}], dtype=object))
    np.savez(root / "f255.npz", images=np.full((2, 3, 8, 8), 200.0, np.float32))
    (root / "idx").mkdir()
    # 4 x 8 x 8 promised, 200 values given
    x = bytes([0, 0, 8, 3]) + struct.pack(">3I", 4, 8, 8) + bytes(200)
    (root / "idx" / (data.IDX_IMAGES + ".gz")).write_bytes(gzip.compress(x))
    (root / "idx" / (data.IDX_LABELS + ".gz")).write_bytes(
        gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 4, 0, 1, 0, 1])))
    return {"bomb": (root / "bomb", "decompression bomb"),
            "empty.npz": (root / "empty.npz", "not an .npz archive"),
            "cut.npz": (root / "cut.npz", "cannot be read as .npz"),
            "pickled.npz": (root / "pickled.npz", "pickled objects"),
            "f255.npz": (root / "f255.npz", "[0, 1] or [-1, 1]"),
            "idx": (root / "idx", "truncated")}


@pytest.mark.parametrize("name", ["bomb", "empty.npz", "cut.npz", "pickled.npz", "f255.npz", "idx"])
def test_unreadable_data_is_one_line_in_every_script(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path, needle = bad_data(tmp_path)[name]
    for main, argv in ((train.main,
                        ["--out", str(tmp_path / "m"), "--data", str(path)] + TINY_TRAIN),
                       (data.main,
                        ["--data", str(path), "--size", "8", "--out", str(tmp_path / "g.png")]),
                       (lambda a: _exit(metrics.main(a)), [str(path), str(path)])):
        if main is not data.main and main is not train.main and name == "idx":
            continue  # metrics.py reads image folders and .npz files, not IDX
        code, err = run(main, argv, capsys, tmp_path)
        assert_one_error(code, err, argv, needle)
        assert (os.path.basename(str(path)) in err[0]
                or name == "idx" and data.IDX_IMAGES in err[0]), err


def test_a_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "DATASETS_ROOT", str(tmp_path / "none"))
    for main, argv in ((train.main,
                        ["--out", str(tmp_path / "m"), "--data", "fashion-mnist"] + TINY_TRAIN),
                       (data.main, ["--data", "fashion-mnist", "--size", "8"])):
        code, err = run(main, argv, capsys, tmp_path)
        assert_one_error(code, err, argv, "apt-get install dataset-fashion-mnist")


def test_extract_refuses_grey_data_for_an_rgb_model(ckpt, tmp_path, capsys):
    np.savez(tmp_path / "grey.npz", images=np.zeros((10, 8, 8), np.uint8))  # (N, H, W): grey
    argv = ["--ckpt", ckpt, "--data", str(tmp_path / "grey.npz"), "--out", str(tmp_path / "x"),
            "--sample-steps", "5"]
    code, err = run(extract.main, argv, capsys, tmp_path)
    assert_one_error(code, err, argv, "3-channel (RGB) images but data")
    assert "1-channel (grey-scale)" in err[0]


# ----------------------------------------------------------------------------- permissions

@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_keep_the_umask_permissions(tmp_path, mask):
    old = os.umask(mask)
    try:
        common.atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as fh:  # what a plain open() gives: the reference
            fh.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) \
        == stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) == 0o666 & ~mask
