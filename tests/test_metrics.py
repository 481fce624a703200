"""Tests of metrics.py against independent references: brute-force full matrices, hand-made
matrices and distances, closed forms. Runs in seconds on CPU."""
import json
import math
import os

import numpy as np
import pytest
import torch

import metrics

RNG = np.random.default_rng(0)


def brute_topk(D, k, largest=False):
    """Reference top-k of a full matrix: order by value, then lowest index (np.lexsort)."""
    idx = np.stack([np.lexsort((np.arange(D.shape[1]), -row if largest else row))[:k] for row in D])
    return np.take_along_axis(D, idx, 1), idx


def int_sqdist(Q, K):
    return ((Q[:, None].astype(np.int64) - K[None].astype(np.int64)) ** 2).reshape(
        len(Q), len(K), -1).sum(-1)


# ----------------------------------------------------------------------------- exact search

@pytest.mark.parametrize("block_q,block_k", [(1, 1), (2, 3), (7, 5), (64, 64)])
def test_knn_equals_brute_force_with_ties_and_ragged_blocks(block_q, block_k):
    for trial in range(4):
        nq, nk, d = RNG.integers(1, 20), RNG.integers(2, 30), RNG.integers(1, 10)
        Q = RNG.integers(0, 3, (nq, d)).astype(np.uint8)  # 3 levels: many exact ties
        K = RNG.integers(0, 3, (nk, d)).astype(np.uint8)
        k = int(RNG.integers(1, nk + 1))
        D = int_sqdist(Q, K)
        ref_d, ref_i = brute_topk(D, k)
        for margin in (1, 16):
            v, i = metrics.knn(Q, K, k=k, block_q=block_q, block_k=block_k, margin=margin)
            np.testing.assert_array_equal(i, ref_i)  # lowest index wins every tie
            # uint8 -> [-1, 1] scale
            np.testing.assert_allclose(v, np.sqrt(ref_d / d) / 127.5, rtol=0, atol=1e-12)


def test_knn_float_l2_and_cosine_equal_brute_force():
    Q, K = RNG.normal(size=(23, 9)), RNG.normal(size=(41, 9))
    K[5::7] = K[4]  # duplicated keys tie exactly
    D = np.sqrt(((Q[:, None] - K[None]) ** 2).mean(-1))
    ref_d, ref_i = brute_topk(np.round(D, 12), 6)
    v, i = metrics.knn(Q, K, k=6, block_q=4, block_k=6)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(v, np.take_along_axis(D, ref_i, 1), atol=1e-12)
    S = ((Q / np.linalg.norm(Q, axis=1, keepdims=True))
         @ (K / np.linalg.norm(K, axis=1, keepdims=True)).T)
    ref_s, ref_i = brute_topk(np.round(S, 12), 6, largest=True)
    v, i = metrics.knn(torch.tensor(Q), K, k=6, metric="cos", block_q=5, block_k=4)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(v, np.take_along_axis(S, ref_i, 1), atol=1e-12)


def test_knn_shift_tolerant_equals_brute_force():
    X = RNG.integers(0, 256, (25, 5, 6, 3)).astype(np.uint8)
    G = RNG.integers(0, 256, (6, 5, 6, 3)).astype(np.uint8)
    G[0] = np.concatenate([X[7][:1], X[7][:-1]], 0)  # X[7] moved down one row, top row repeated

    def translations(x):
        h, w = x.shape[:2]
        return [x[np.clip(np.arange(h) - dy, 0, h - 1)][:, np.clip(np.arange(w) - dx, 0, w - 1)]
                for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    D = np.array([[min(np.sqrt(((g.astype(float) - t) ** 2).mean()) for t in translations(x))
                   for x in X] for g in G]) / 127.5
    ref_d, ref_i = brute_topk(np.round(D, 12), 3)
    v, i = metrics.knn(G, X, k=3, shift=1, block_k=20)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(v, np.take_along_axis(D, ref_i, 1), atol=1e-12)
    assert i[0, 0] == 7 and v[0, 0] == 0.0


def test_knn_researches_rows_whose_bound_cannot_certify():
    # 30 identical copies each
    K = np.repeat(RNG.integers(0, 256, (3, 40)).astype(np.uint8), 30, axis=0)
    stats = {}
    v, i = metrics.knn(K[[0, 30, 89]], K, k=2, margin=4, stats=stats)
    assert stats["retried_rows"] == 3
    np.testing.assert_array_equal(i, [[0, 1], [30, 31], [60, 61]])
    np.testing.assert_array_equal(v, 0.0)


def test_streamed_ums_marks_equal_full_matrix():
    Q, K = (RNG.integers(0, 256, (30, 12)).astype(np.uint8),
            RNG.integers(0, 256, (50, 12)).astype(np.uint8))
    K[:6] = Q[:6]  # some exact matches (band edge at 0)
    D = np.sqrt(int_sqdist(Q, K) / 12) / 127.5
    bands = {"low": tuple(np.percentile(D, [4, 8])), "mid": tuple(np.percentile(D, [1, 4])),
             "high": (0.0, np.percentile(D, 1))}
    _, _, hits = metrics.knn(Q, K, k=1, bands=bands, block_q=7, block_k=9)
    for row, (lo, hi) in zip(hits, bands.values()):
        np.testing.assert_array_equal(row, metrics.in_band(D, lo, hi, "l2").any(0))


# ------------------------------------------------------------------------ SIDE's AMS / UMS formulas

def test_ams_ums_on_hand_made_similarity_matrix():
    S = np.array([[0.65, 0.62, 0.10, 0.45],
                  [0.55, 0.30, 0.20, 0.61],
                  [0.45, 0.40, 0.39, 0.10]])
    ams, ums = metrics.ams_ums(S, metrics.COS_BANDS, "cos")
    # best matches 0.65, 0.61, 0.45 -> high, high, low
    assert ams == pytest.approx({"low": 100 / 3, "mid": 0.0, "high": 200 / 3})
    # high: items 0, 1, 3 (0.65, 0.62, 0.61); mid: item 0 (0.55);
    # low: items 0, 1, 3 (0.45, 0.40, 0.45)
    assert ums == pytest.approx({"low": 100.0, "mid": 100 / 3, "high": 100.0})
    assert ums["high"] > ams["high"]


def test_band_edges_far_inclusive_near_exclusive():
    assert (list(metrics.in_band(np.array([0.4, 0.5, 0.6, 1.0]), 0.4, 0.5, "cos"))
            == [True, False, False, False])
    assert list(metrics.in_band(np.array([0.6, 1.0]), 0.6, 1.0, "cos")) == [True, True]
    assert (list(metrics.in_band(np.array([0.0, 0.07, 0.08]), 0.0, 0.07, "l2"))
            == [True, True, False])
    assert (list(metrics.in_band(np.array([0.07, 0.08, 0.095]), 0.07, 0.08, "l2"))
            == [False, True, False])


def test_ums_exceeds_ams_in_constructed_case():
    g = np.array([[1.0, 0.0, 0.0]])
    # three training items at cosine 0.65, 0.7 and 0.8 from the single generation, one far away
    train = np.array([[c, math.sqrt(1 - c * c), 0.0] for c in (0.65, 0.7, 0.8)] + [[0.0, 0.0, 1.0]])
    r = metrics.evaluate(g, train, similarity="features")
    assert r["ams"]["high"] == pytest.approx(100.0) and r["ums"]["high"] == pytest.approx(300.0)
    assert r["nn_index"][0] == 2 and r["nn_value"][0] == pytest.approx(0.8)


def test_percentile_and_replication_fraction():
    best = np.linspace(0, 1, 101)
    assert metrics.p95(best, "cos") == pytest.approx(0.95)
    assert metrics.p95(best, "l2") == pytest.approx(0.05)


def test_summarize_by_hand_with_values_on_the_thresholds():
    """summarize() on hand-made per-generation arrays, values placed on the edges: AMS / UMS per
    band, p95, the replicated fraction (cos: > 0.5, Somepalli et al.; L2: inside the nearest band,
    its far edge included) and the extracted sets (ratio strictly below 1 and 1/3)."""
    cos_bands = {"low": (0.4, 0.5), "mid": (0.5, 0.6), "high": (0.6, 1.0)}
    ums_index = {"low": np.array([], np.int64), "mid": np.array([3, 4]), "high": np.array([7])}
    s = metrics.summarize(np.array([0.5, 0.55, 0.6, 0.3]), np.array([3, 3, 7, 1]),
                          np.array([0.9, 1.0, 0.2, 5.0]), np.array([1 / 3, 0.1, 0.5, 0.0]),
                          ums_index, cos_bands, "cos", "generation", 50)
    # 0.5 is mid's near edge, 0.6 high's
    assert s["ams"] == {"low": 0.0, "mid": 50.0, "high": 25.0}
    # 2 and 1 training items over N_G = 4
    assert s["ums"] == {"low": 0.0, "mid": 50.0, "high": 25.0}
    # sorted 0.3, 0.5, 0.55, 0.6: position 0.95 * 3
    assert s["p95"] == pytest.approx(0.55 + 0.85 * 0.05)
    # 0.55 and 0.6; 0.5 is not > 0.5
    assert s["frac_replicated"] == 0.5 and s["replication_threshold"] == 0.5
    # ratios 0.9 and 0.2; 1.0 is not < 1
    assert s["carlini_indices"] == [3, 7] and s["carlini_extracted"] == 2
    # ratios 0.1 and 0; 1/3 is not < 1/3
    assert s["yoon_indices"] == [1, 3] and s["yoon_extracted"] == 2
    l2_bands = {"low": (0.08, 0.095), "mid": (0.07, 0.08), "high": (0.0, 0.07)}
    s = metrics.summarize(np.array([0.07, 0.075, 0.0, 0.2]), np.array([0, 1, 2, 3]), np.ones(4),
                          np.ones(4), {b: np.array([], np.int64) for b in l2_bands}, l2_bands, "l2",
                          "train", 3)
    # 0.07 is high's far edge, 0.075 mid's
    assert s["ams"] == {"low": 0.0, "mid": 25.0, "high": 50.0}
    # 5th percentile of 0, 0.07, 0.075, 0.2: position 0.05 * 3
    assert s["p95"] == pytest.approx(0.15 * 0.07)
    # 0 and 0.07 (edge included)
    assert s["frac_replicated"] == 0.5 and s["replication_threshold"] == 0.07
    assert (s["carlini_extracted"] == s["yoon_extracted"] == 0
            and (s["carlini_center"], s["carlini_n"]) == ("train", 3))


def test_carlini_and_yoon_ratios_by_hand():
    d_nn = np.array([1.0, 2.0, 0.0, 3.0])
    d_ref = np.array([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [3.0, 3.0, 9.0]])
    # means 3, 2, 0, 5 -> ratios 1/(0.5*3), 2/(0.5*2), 0 (exact copy), 3/(0.5*5)
    ratio, idx = metrics.carlini_ratio(d_nn, d_ref, nn_index=[5, 6, 5, 7])
    np.testing.assert_allclose(ratio, [2 / 3, 2.0, 0.0, 1.2])
    # ratios < 1: items 0 and 2, both matched to training image 5
    np.testing.assert_array_equal(idx, [5])
    ratio, idx = metrics.yoon_ratio([1.0, 1.0, 0.0, 2.0, 1.0], [3.5, 2.0, 0.0, 4.0, 3.0],
                                    nn_index=[4, 7, 4, 9, 2])
    np.testing.assert_allclose(ratio, [1 / 3.5, 0.5, 0.0, 0.5, 1 / 3])
    np.testing.assert_array_equal(idx, [4])  # 1/3 itself is not < 1/3


@pytest.mark.parametrize("center", ["generation", "train"])
def test_evaluate_carlini_and_yoon_equal_brute_force(center):
    T = RNG.integers(0, 256, (60, 4, 4, 3)).astype(np.uint8)
    G = RNG.integers(0, 256, (15, 4, 4, 3)).astype(np.uint8)
    # near copies
    G[:4] = np.clip(T[[3, 8, 8, 20]].astype(int) + RNG.integers(-3, 4, (4, 4, 4, 3)), 0, 255)
    r = metrics.evaluate(G, T, carlini_center=center)
    Dg = np.sqrt(int_sqdist(G, T) / 48) / 127.5
    Dt = np.sqrt(int_sqdist(T, T) / 48) / 127.5
    nn = Dg.argmin(1)
    srt = np.sort(Dg, 1)
    if center == "generation":
        ref = srt[:, :50].mean(1)
    else:
        ref = np.array([np.sort(np.delete(Dt[j], j))[:50].mean() for j in nn])
    c = srt[:, 0] / (0.5 * ref)
    y = srt[:, 0] / srt[:, 1]
    np.testing.assert_allclose(r["carlini_ratio"], c, rtol=1e-12)
    np.testing.assert_allclose(r["yoon_ratio"], y, rtol=1e-12)
    assert r["carlini_indices"] == sorted(set(nn[c < 1.0]))
    assert r["yoon_indices"] == sorted(set(nn[y < 1 / 3])) and {3, 8, 20} <= set(r["yoon_indices"])


def test_evaluate_invariant_to_order_of_sets():
    T = RNG.integers(0, 256, (40, 4, 4, 3)).astype(np.uint8)
    G = np.concatenate([T[:10], RNG.integers(0, 256, (20, 4, 4, 3)).astype(np.uint8)])
    G[:10] = np.clip(G[:10].astype(int) + RNG.integers(-6, 7, G[:10].shape), 0, 255)
    bands = "low=0.2:0.5,mid=0.05:0.2,high=0:0.05"
    a = metrics.evaluate(G, T, bands=bands)
    pg, pt = RNG.permutation(len(G)), RNG.permutation(len(T))
    b = metrics.evaluate(G[pg], T[pt], bands=bands)
    for key in ("ams", "ums", "p95", "frac_replicated", "carlini_extracted", "yoon_extracted"):
        assert a[key] == pytest.approx(b[key]), key
    np.testing.assert_array_equal(pt[b["nn_index"]], a["nn_index"][pg])
    assert sorted(pt[b["yoon_indices"]]) == a["yoon_indices"]


# ----------------------------------------------------------------------------- pixel-L2 bands

def test_calibration_on_constant_images_known_answer():
    levels = np.array([0, 40, 100, 200])
    T = np.broadcast_to(levels[:, None, None, None], (4, 8, 8, 3)).astype(np.uint8).copy()
    bands, st = metrics.calibrate_l2_bands(T)
    # brightness +3 % of level 200 = 6 levels; nearest distinct pair 40 levels apart
    a, b = 6 / 127.5, 40 / 127.5
    assert (st["distinct_nn_min"] == pytest.approx(b)
            and st["planted_max_in_high"] == pytest.approx(a))
    h = math.sqrt(a * b)
    assert bands["high"] == pytest.approx((0.0, h)) and bands["low"][1] == pytest.approx(b)
    assert bands["mid"] == pytest.approx((h, math.sqrt(h * b)))


def test_default_l2_bands_catch_planted_copies_and_exclude_distinct_faces():
    data = pytest.importorskip("data")
    T = data.make_faces(200, 16, seed=0)[0]
    fresh = data.make_faces(100, 16, seed=1)[0]  # distinct faces, never trained on
    planted = metrics._perturbations(T[:50], seed=3)
    for name in ("copy", "noise", "brightness"):
        r = metrics.evaluate(planted[name].astype(np.uint8), T)
        assert r["ams"]["high"] == 100.0 and (r["nn_index"] == np.arange(50)).all(), name
    for name in ("shift_x", "shift_y"):
        shifted = planted[name].astype(np.uint8)
        assert metrics.evaluate(shifted, T, shift=1)["ams"]["high"] == 100.0, name
        # plain L2 cannot: see METRICS.md
        assert metrics.evaluate(shifted, T)["ams"]["high"] < 50.0, name
    for shift in (0, 1):
        r = metrics.evaluate(fresh, T, shift=shift)
        assert all(v == 0.0 for v in list(r["ams"].values()) + list(r["ums"].values())), (
            shift, r["ams"], r["ums"])


# --------------------------------------------------------------------- SIDE Definition 1, Theorem 1

@pytest.mark.parametrize("copies", [1, 5])
def test_memorization_divergence_equals_closed_form_for_one_gaussian(copies):
    x1, mu, sigma, eps, d = (torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64),
                             torch.zeros(3, dtype=torch.float64), 1.5, 0.4, 3)
    train = x1.repeat(copies, 1)  # duplicates leave q_eps unchanged: checks the -log N of log q_eps
    log_p = metrics.gaussian_mixture_log_prob(mu[None], sigma)
    est, se = metrics.memorization_divergence(train, eps, log_p, n_samples=4000,
                                              generator=torch.Generator().manual_seed(1))
    kl = 0.5 * (d * eps ** 2 / sigma ** 2 + float(((x1 - mu) ** 2).sum()) / sigma ** 2 - d
                + 2 * d * math.log(sigma / eps))
    assert abs(est - kl) < 4 * se + 1e-9 and se < 0.05


def test_log_q_eps_equals_direct_sum():
    T = torch.tensor(RNG.normal(size=(7, 2)))
    x = torch.tensor(RNG.normal(size=(5, 2)))
    eps = 0.7
    direct = torch.stack([torch.exp(-((xi - T) ** 2).sum(1) / (2 * eps ** 2)).mean()
                          / (2 * math.pi * eps ** 2) for xi in x]).log()
    torch.testing.assert_close(metrics.log_q_eps(x, T, eps), direct)


# ------------------------------------------------------------------------- embeddings, loading, CLI

class MeanColour(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def test_torchscript_embedding_cosine_by_hand(tmp_path):
    path = tmp_path / "embed.pt"
    torch.jit.script(MeanColour()).save(str(path))
    colours = np.array([[200, 30, 30], [190, 40, 35], [20, 20, 220]], np.uint8)
    img = lambda c: np.broadcast_to(c, (1, 8, 8, 3)).copy()  # noqa: E731
    G, T = img(colours[0]), np.concatenate([img(colours[1]), img(colours[2])])
    r = metrics.evaluate(G, T, similarity="embed", embed=str(path), embed_size=16)
    # constant images: resize-invariant
    e = (colours / 255.0 - metrics.IMAGENET_MEAN) / metrics.IMAGENET_STD
    cos = e[1:] @ e[0] / np.linalg.norm(e[1:], axis=1) / np.linalg.norm(e[0])
    assert (r["nn_index"][0] == cos.argmax()
            and r["nn_value"][0] == pytest.approx(cos.max(), abs=1e-6))


def test_load_images_folder_and_npz(tmp_path):
    from PIL import Image
    for cls, n in (("b", 2), ("a", 1)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((6, 10, 3), 40 * i, np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png")
    x = metrics.load_images(tmp_path / "imgs", size=4)
    files = metrics.image_files(tmp_path / "imgs")
    assert x.shape == (3, 4, 4, 3) and [os.path.relpath(f, tmp_path / "imgs") for f in files] == \
        [os.path.join("a", "0.png"), os.path.join("b", "0.png"), os.path.join("b", "1.png")]
    # a/0.png, then b/0.png and b/1.png: sorted paths
    assert np.all(x[0] == 0) and np.all(x[2] == 40)
    f = np.linspace(-1, 1, 2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    np.savez(tmp_path / "f.npz", images=f, labels=np.array([1, 0]))
    x = metrics.load_images(tmp_path / "f.npz")
    np.testing.assert_array_equal(x,
                                  np.clip(np.round((f.transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255))


def test_cli_writes_json_and_rejects_bad_input(tmp_path, capsys):
    T = RNG.integers(0, 256, (20, 8, 8, 3)).astype(np.uint8)
    np.savez(tmp_path / "train.npz", images=T)
    np.savez(tmp_path / "gen.npz", images=T[:5])
    out = tmp_path / "m.json"
    assert metrics.main([str(tmp_path / "gen.npz"), str(tmp_path / "train.npz"), "--json", str(out),
                         "--device", "cpu"]) == 0
    s = json.loads(out.read_text())
    assert s["n_generated"] == 5 and s["n_train"] == 20 and s["similarity"] == "l2"
    assert s["ams"]["high"] == 100.0 and s["ums"]["high"] == 100.0 and s["yoon_extracted"] == 5
    assert {"bands", "p95", "carlini_extracted"} <= set(s)
    nan = np.full((3, 3, 8, 8), np.nan, np.float32)
    np.savez(tmp_path / "nan.npz", images=nan)
    np.savez(tmp_path / "small.npz", images=T[:, :4, :4])
    np.savez(tmp_path / "empty.npz", images=T[:0])
    capsys.readouterr()
    for bad in ("missing.npz", "nan.npz", "small.npz", "empty.npz"):
        assert metrics.main([str(tmp_path / bad), str(tmp_path / "train.npz")]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
