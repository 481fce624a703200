"""side.py against independent references: bit-identity of λ=0 with unguided sampling, the guided
trajectory's classifier log-probability, per-sample gradients vs one-at-a-time and finite
differences, planted k-means partitions, cohesion computed by hand, the time module's place (forward
hooks), a classifier learning planted colours (and grey levels, at one channel), a TorchScript
embedding of grey images as their RGB replication, and every user mistake as a SideError. Tiny
sizes: seconds on CPU."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm  # noqa: E402
import side  # noqa: E402
import metrics  # noqa: E402
from side import SideError  # noqa: E402

T = 100  # a short chain keeps every sampling test under a second
PX = 8  # 8-px images


def tiny_unet(seed=0):
    """A random 8-px UNet whose zero-initialised output layer is randomised, so ε_θ is not
    identically 0."""
    torch.manual_seed(seed)
    m = ddpm.UNet(image_size=PX, channels=3, base=8, mults=(1, 2), num_res_blocks=1, attn_res=())
    torch.nn.init.normal_(m.out[-1].weight, std=0.1)
    return m.eval()


def random_classifier(num_classes=4, seed=0, time_dependent=True):
    """A random TimeResNet in eval mode with a randomised (not identity) time module."""
    torch.manual_seed(seed)
    c = side.TimeResNet(num_classes, image_size=PX, width=8, blocks=(1, 1),
                        time_dependent=time_dependent, T=T)
    if time_dependent:
        torch.nn.init.normal_(c.time_module.mlp[-1].weight, std=0.3)
    return c.eval().requires_grad_(False)


def colours(n, seed=0, noise=0.15, classes=4):
    """n 8-px images of `classes` solid colours plus Gaussian noise; label = colour index."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[-0.8, -0.8, 0.8], [0.8, -0.8, -0.8], [-0.8, 0.8, -0.8],
                            [0.8, 0.8, 0.8]])[:classes]
    y = torch.arange(n) % classes
    x = palette[y][:, :, None, None] + noise * torch.randn(n, 3, PX, PX, generator=g)
    return x.clamp(-1, 1), y


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second thread
    only adds contention (10x slower sampling seen). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(one_thread):
    """A SIDE classifier trained on the four colours (shared by the learning and guidance tests)."""
    x, y = colours(240)
    y[:8] = -1  # some dropped images: must be excluded
    d = ddpm.Diffusion(T)
    model, report = side.train_classifier(x, y, diffusion=d, steps=150, batch=32, width=8,
                                          holdout=0.2, log=None)
    return model, report, d


# ----------------------------------------------------------------------------- guidance


def test_scale_zero_is_bit_identical_to_unguided():
    unet, clf, d = tiny_unet(), random_classifier(), ddpm.Diffusion(T)
    cond = side.guidance(clf, torch.tensor([0, 1, 2, 3]), 0.0)
    x = torch.randn(4, 3, PX, PX)
    g = cond(x, torch.full((4,), 50))
    assert torch.equal(g, torch.zeros_like(x)) and not torch.signbit(g).any()  # exact +0, no -0
    for sampler, eta in [("ddim", 0.0), ("ddpm", 0.0)]:
        ref = d.sample(unet, 4, ddpm.sample_generators(7, range(4)), steps=10, eta=eta,
                       sampler=sampler)
        lam0 = d.sample(unet, 4, ddpm.sample_generators(7, range(4)), steps=10, eta=eta,
                        sampler=sampler, cond_fn=cond)
        assert torch.equal(ref, lam0)
    guided = d.sample(unet, 4, ddpm.sample_generators(7, range(4)), steps=10,
                      cond_fn=side.guidance(clf, torch.tensor([0, 1, 2, 3]), 5.0))
    assert not torch.equal(ref, guided)  # the hook is really used when λ > 0


def _trajectory_logp(d, unet, clf, target, cond_fn, steps=10, n=8):
    """log p_φ(c | x, t) of every x recorded along a sampling trajectory, t = the timestep x sits
    at."""
    seq = d.timesteps(steps)
    rec = []
    d.sample(unet, n, ddpm.sample_generators(3, range(n)), steps=steps, cond_fn=cond_fn,
             callback=lambda i, t, x, x0: rec.append((i, x.clone())))
    out = []
    for i, x in rec:
        t = torch.full((n,), int(seq[i - 1]) if i > 0 else 0)
        out.append(F.log_softmax(clf(x, t), 1)[torch.arange(n), target])
    return torch.stack(out)  # (steps, n)


def test_guidance_raises_target_logprob_along_trajectory(trained):
    clf, _, d = trained
    unet = tiny_unet()
    target = torch.arange(8) % 4
    plain = _trajectory_logp(d, unet, clf, target, None)
    weak = _trajectory_logp(d, unet, clf, target, side.guidance(clf, target, 3.0))
    guided = _trajectory_logp(d, unet, clf, target, side.guidance(clf, target, 10.0))
    assert ((guided - plain).mean(1) > 0).all()  # higher at every step, on average over samples
    assert guided.mean() > weak.mean() > plain.mean() + 0.1  # and more so with a larger scale
    assert (guided[-1] > plain[-1]).float().mean() >= 0.75  # the final images: most samples


def test_per_sample_gradient_equals_one_at_a_time_and_finite_differences():
    clf = random_classifier().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, PX, PX, generator=g, dtype=torch.float64)
    t, y = torch.tensor([0, 10, 50, 99]), torch.tensor([3, 0, 2, 1])
    batch = side.guidance(clf, y, 2.0)(x, t)
    for i in range(4):
        single = side.guidance(clf, y[i:i + 1], 2.0)(x[i:i + 1], t[i:i + 1])
        assert torch.allclose(batch[i:i + 1], single, rtol=1e-10, atol=1e-12)

    def logp(z):  # log p(y_i | z, t_i) for sample i = 2
        return float(F.log_softmax(clf(z[None], t[2:3]), 1)[0, y[2]])
    h = 1e-6
    for c, r, s in [(0, 3, 4), (2, 7, 0)]:
        xp, xm = x[2].clone(), x[2].clone()
        xp[c, r, s] += h
        xm[c, r, s] -= h
        fd = (logp(xp) - logp(xm)) / (2 * h)  # central difference
        assert batch[2, c, r, s].item() == pytest.approx(2.0 * fd, rel=1e-5, abs=1e-9)


def test_guidance_refuses_training_mode_and_nonfinite_gradient():
    clf = random_classifier()
    x, t = torch.randn(2, 3, PX, PX), torch.tensor([5, 5])
    clf.train()
    with pytest.raises(RuntimeError, match="eval"):
        side.guidance(clf, 0, 1.0)(x, t)
    clf.eval()
    clf.fc.weight.fill_(float("nan"))
    with pytest.raises(SideError, match=r"guidance.*timestep 5"):
        side.guidance(clf, 0, 1.0)(x, t)


# ----------------------------------------------------------------------------- k-means and cohesion


def planted(seed=0, k=5, d=8, spread=50.0):
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(k, d, generator=g)
    sizes = [10 + 7 * i for i in range(k)]
    truth = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    perm = torch.randperm(len(truth), generator=g)
    truth = truth[perm]
    return centres[truth] + torch.randn(len(truth), d, generator=g), truth


def same_partition(a, b):
    """True iff the two labellings define the same partition (equal up to a permutation of
    labels)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_planted_clusters():
    Z, truth = planted()
    C, assign, inertia = side.kmeans(Z, 5, seed=0)
    assert same_partition(assign, truth)
    means = torch.stack([Z[truth == k].mean(0) for k in range(5)])  # the optimum, by hand
    ref = sum(float(((Z[truth == k] - means[k]) ** 2).sum()) for k in range(5))
    assert inertia == pytest.approx(ref, rel=1e-5)
    for k in range(5):
        assert torch.allclose(C[assign[truth == k][0]], means[k], atol=1e-4)


def test_kmeans_deterministic_for_a_seed():
    Z = torch.randn(120, 4,
                    generator=torch.Generator().manual_seed(5))  # no structure: the seed decides
    a, b = side.kmeans(Z, 6, n_init=2, seed=11), side.kmeans(Z, 6, n_init=2, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    gen1, gen2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(side._kmeanspp(Z, 6, gen1), side._kmeanspp(Z, 6, gen2))


def test_lloyd_reseeds_empty_cluster_and_reaches_a_fixed_point():
    Z, _ = planted(seed=2, k=3)
    C0 = torch.stack([Z[0], Z[1], torch.full((8,), 1e4)])  # the third centre attracts nobody
    C, assign = side._lloyd(Z, C0, iters=100)
    assert torch.bincount(assign, minlength=3).min() > 0
    # Lloyd fixed point: centroids are member means, members are nearest their centroid
    for k in range(3):
        assert torch.allclose(C[k], Z[assign == k].mean(0), atol=1e-4)
    assert torch.equal(torch.cdist(Z, C).argmin(1), assign)


def cohesion_example():
    """Two tight clusters around e1, e2 and one diffuse cluster around e3 + 0.2 e1, in 10-D. Member
    u = m ± a e_j (j = 3..9) has centroid ∝ m, so its cohesion is |m| / sqrt(|m|² + a²), by hand."""
    e = torch.eye(10)
    groups, cohesion = [], []
    for m, a in [(e[0], 0.1), (e[1], 0.1), (e[2] + 0.2 * e[0], 2.0)]:
        groups.append(torch.stack([m + s * a * e[j] for j in range(3, 10) for s in (1, -1)]))
        cohesion.append(float(m.norm() / math.sqrt(float(m.norm()) ** 2 + a * a)))
    truth = torch.cat([torch.full((14,), i) for i in range(3)])
    return torch.cat(groups), truth, cohesion  # cohesion ≈ [0.995, 0.995, 0.454]


def test_cluster_cohesion_by_hand():
    Z, truth, hand = cohesion_example()
    Zn = F.normalize(Z, dim=1)
    C = torch.stack([Zn[truth == k].mean(0) for k in range(3)]
                    + [torch.ones(10)])  # 4th cluster: empty
    coh = side.cluster_cohesion(Zn, truth, C)
    assert coh[:3].tolist() == pytest.approx(hand, abs=1e-6) and coh[3] == 0


@pytest.mark.parametrize("drop", [False, True])
def test_cohesion_filter_keeps_tight_and_drops_diffuse(drop):
    Z, truth, hand = cohesion_example()
    s = side.surrogate_labels(3.0 * Z, 3, tau=0.5,
                              drop_rejected=drop)  # scale: features are L2-normalised
    assert sorted(s.cohesion) == pytest.approx(sorted(hand), abs=1e-5)
    assert s.num_classes == 2 and len(s.kept) == 2 and sorted(s.sizes) == [14, 14, 14]
    la, lb, ld = s.labels[truth == 0], s.labels[truth == 1], s.labels[truth == 2]
    assert (la == la[0]).all() and (lb == lb[0]).all() and {int(la[0]), int(lb[0])} == {0, 1}
    assert torch.allclose(s.centroids[la[0]], torch.eye(10)[0] / math.sqrt(1.01),
                          atol=1e-5)  # e1 cluster's mean
    assert [s.sizes[k] for k in s.kept] == [14, 14] and all(s.cohesion[k] >= 0.5 for k in s.kept)
    if drop:
        assert (ld == -1).all()
    else:  # nearest kept centroid: the diffuse cluster leans towards e1
        assert (ld == la[0]).all()


def test_tau_low_keeps_all_and_tau_high_keeps_none():
    Z, _, hand = cohesion_example()
    assert side.surrogate_labels(Z, 3, tau=0.4).num_classes == 3
    with pytest.raises(SideError, match=r"tau=0.999.*best seen 0.995.*lower --tau"):
        side.surrogate_labels(Z, 3, tau=0.999)


@pytest.mark.parametrize("kw,msg", [(dict(tau=-0.1), "tau=-0.1"), (dict(tau=1.5), "tau=1.5"),
                                    (dict(K=1), "K=1"), (dict(K=43), "K=43")])
def test_surrogate_label_user_errors(kw, msg):
    Z, _, _ = cohesion_example()
    args = dict(K=3, tau=0.5) | kw
    with pytest.raises(SideError, match=msg):
        side.surrogate_labels(Z, args.pop("K"), **args)
    with pytest.raises(SideError, match="K=50"):
        side.kmeans(Z, 50)


# ----------------------------------------------------------------------------- the classifier


def test_time_module_sits_right_after_first_batchnorm():
    clf = random_classifier()
    order, seen = [], {}

    def hook(name):
        def f(mod, inp, out):
            order.append(name)
            seen[name] = (inp[0].detach(), out.detach())
        return f
    clf.bn1.register_forward_hook(hook("bn1"))
    clf.time_module.register_forward_hook(hook("time"))
    clf.layers[0].register_forward_hook(hook("block"))
    x = torch.randn(3, 3, PX, PX)
    clf(x, torch.tensor([0, 40, 99]))
    assert order == ["bn1", "time", "block"]
    assert torch.equal(seen["time"][0], seen["bn1"][1])  # the time module gets the BN output
    assert torch.equal(seen["block"][0],
                       F.relu(seen["time"][1]))  # then ReLU, then the residual stages
    assert not torch.allclose(clf(x, torch.tensor([0, 0, 0])), clf(x, torch.tensor([99, 99, 99])))
    plain = random_classifier(time_dependent=False)
    assert plain.time_module is None and not any(isinstance(m, side.TimeFiLM)
                                                 for m in plain.modules())
    assert torch.equal(plain(x, torch.tensor([0, 0, 0])), plain(x, None))


def test_classifier_learns_planted_colours(trained):
    model, report, _ = trained
    assert report["n_train"] + report["n_holdout"] == 232 and report["num_classes"] == 4
    assert set(report["heldout_acc_by_t"]) == {0, 10, 25, 50, 75}
    assert report["heldout_acc_by_t"][0] > 0.9 and report["train_acc"] > 0.9
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x, y = colours(40, seed=9)  # fresh images, independent of the training draw
    assert (model(x, torch.zeros(40, dtype=torch.long)).argmax(1) == y).float().mean() > 0.9


def test_time_independent_baseline_trains_on_clean_images():
    x, y = colours(80, seed=1)
    model, report = side.train_classifier(x, y, steps=40, batch=16, width=8, holdout=0.25, log=None)
    assert model.time_module is None and list(report["heldout_acc_by_t"]) == [0]
    assert report["heldout_acc_by_t"][0] > 0.9


def test_a_grey_classifier_learns_brightness_and_guides_one_channel():
    """One channel: p_φ(y | x_t, t) on grey images of 3 brightness levels learns them, and its
    guidance gradient is a (N, 1, H, W) tensor that raises the target's log-probability (first-order
    check)."""
    y = torch.arange(120) % 3
    noise = torch.randn(120, 1, PX, PX, generator=torch.Generator().manual_seed(3))
    x = torch.tensor([-0.7, 0.0, 0.7])[y][:, None, None, None] + 0.15 * noise  # three grey levels
    d = ddpm.Diffusion(T)
    model, report = side.train_classifier(x, y, diffusion=d, steps=80, batch=32, width=8,
                                          holdout=0.25, log=None)
    assert model.channels == 1 and report["heldout_acc_by_t"][0] > 0.9
    xt, t = torch.randn(4, 1, PX, PX, generator=torch.Generator().manual_seed(4)), torch.full((4,),
                                                                                              20)
    g = side.guidance(model, 2, 1.0)(xt, t)
    assert g.shape == (4, 1, PX, PX)
    logp = lambda z: F.log_softmax(model(z, t), 1)[:, 2].sum()  # noqa: E731
    assert logp(xt + 1e-2 * g) > logp(xt)


def test_nan_loss_is_a_user_error():
    x, y = colours(16)
    x[:, 0, 0, 0] = float("nan")
    with pytest.raises(SideError, match=r"classifier training.*step 0"):
        side.train_classifier(x, y, steps=5, batch=16, width=8, holdout=0.0, log=None)


# ----------------------------------------------------------------------------- features


def test_ddpm_features_shape_determinism_and_pooling():
    unet, d = tiny_unet(), ddpm.Diffusion(T)
    x, _ = colours(6)
    Z = side.extract_features(x, "ddpm", unet, d, batch=4)
    C = unet.mid[2].out_layers[-1].out_channels
    assert Z.shape == (6, 5 * C) and Z.dtype == torch.float32
    assert torch.allclose(Z, side.extract_features(x, "ddpm", unet, d, batch=256),
                          atol=1e-5)  # batch-free
    assert torch.allclose(Z[:, :C], Z[:, C:].reshape(6, C, 4).mean(2),
                          atol=1e-5)  # GAP = mean of the 2×2 grid
    assert side.extract_features(x, "pixels").shape == (6, 3 * PX * PX)
    with pytest.raises(SideError, match="t_feat=100"):
        side.extract_features(x, "ddpm", unet, d, t_feat=100)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_embedding_preprocessing(tmp_path):
    class SpatialMean(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))
    path = str(tmp_path / "embed.pt")
    torch.jit.script(SpatialMean()).save(path)
    rgb = torch.tensor([[-1.0, 0.0, 0.6], [0.2, -0.4, 1.0]])
    x = rgb[:, :, None, None].expand(2, 3, PX, PX)  # solid colours: resizing changes nothing
    # ImageNet's, as SSCD uses
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    sscd = lambda x: metrics.sscd_preprocess(x,
                                             12)  # noqa: E731  (what extract.py passes, at 12 px)
    Z = side.extract_features(x, path, preprocess=sscd)
    assert torch.allclose(Z, ((rgb + 1) / 2 - mean) / std, atol=1e-5)
    assert torch.allclose(side.extract_features(x, path), (rgb + 1) / 2,
                          atol=1e-5)  # no preprocess: [0, 1]
    # one channel: replicated to RGB at the embedding's input
    grey = rgb[:, :1, None, None].expand(2, 1, PX, PX)
    assert torch.allclose(side.extract_features(grey, path, preprocess=sscd),
                          ((rgb[:, :1] + 1) / 2 - mean) / std, atol=1e-5)


def test_feature_user_errors(tmp_path):
    x = torch.zeros(2, 3, PX, PX)
    with pytest.raises(SideError, match="nothing is downloaded"):
        side.extract_features(x, str(tmp_path / "sscd_missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(SideError, match="not a TorchScript"):
        side.extract_features(x, str(junk))
    with pytest.raises(SideError, match="needs the DDPM"):
        side.extract_features(x, "ddpm")


def test_side_extract_as_a_library_with_lambda_zero_is_plain_sampling():
    """The README's library use: side.extract with its default hooks (no cache, side.sampler) runs
    Algorithm 1 end to end; at λ = 0 the guidance adds nothing, so generation i is plain DDIM
    sampling from ddpm.sample_generators(seed, [i]), bit for bit (sampled here without side.py)."""
    model, d = tiny_unet(), ddpm.Diffusion(T, "cosine", "eps")
    s = side.Settings(n_syn=12, K=2, tau=0.0, lam=0.0, clf_steps=2, clf_width=8,
                      sampling=dict(sampler="ddim", sample_steps=4, eta=1.0))
    x, info = side.extract(model, d, s, n=5, seed=3, log=lambda m: None)
    plain = d.sample(model, 5, ddpm.sample_generators(3, range(5)), steps=4, eta=1.0,
                     sampler="ddim")
    assert x.shape == (5, 3, PX, PX) and torch.equal(x, plain)
    assert info["scale"] == 0.0 and info["K"] == 2 and len(info["cluster"]) == 5
    r = metrics.evaluate(x, plain, bands="high=0:0.01")  # each generation is its own copy
    assert r["ams"]["high"] == 100.0 and r["ums"]["high"] == 100.0
