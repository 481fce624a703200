"""The GPU path against the CPU reference (skipped without CUDA; `make gpu-check` runs them on a
GPU): exact kNN on the GPU equals the CPU search, bf16 training steps stay finite and follow fp32,
guided sampling on the GPU follows the CPU within float tolerance, compiled sampling equals
eager."""
import numpy as np
import pytest
import torch

import ddpm
import metrics
import side

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (make gpu-check)")


def small_unet(seed=0):
    torch.manual_seed(seed)
    return ddpm.UNet(image_size=8, base=16, mults=(1, 2),
                     attn_res=(4,)).eval().requires_grad_(False)


def test_exact_knn_on_the_gpu_equals_the_cpu():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (300, 8, 8, 3), generator=g, dtype=torch.uint8).numpy()
    k = torch.randint(0, 256, (500, 8, 8, 3), generator=g, dtype=torch.uint8).numpy()
    vc, ic = metrics.knn(q, k, k=5, device="cpu")
    vg, ig = metrics.knn(q, k, k=5, device="cuda")
    assert np.array_equal(np.asarray(ic), np.asarray(ig)) and np.allclose(vc, vg, atol=1e-12)


def test_bf16_training_follows_fp32():
    diffusion = ddpm.Diffusion(100, "cosine", "eps", device="cuda")
    losses = {}
    for amp in (False, True):
        model = small_unet().cuda().train().requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator(device="cuda").manual_seed(0)
        x0 = torch.rand(32, 3, 8, 8, generator=g, device="cuda") * 2 - 1
        for _ in range(20):
            t = torch.randint(100, (32,), generator=g, device="cuda")
            noise = torch.randn(x0.shape, generator=g, device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = diffusion.loss(model, x0, t, noise).float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[amp] = loss.item()
    assert (np.isfinite(losses[True])
            and abs(losses[True] - losses[False]) < 0.1 * losses[False] + 0.02)


def test_guided_sampling_on_the_gpu_follows_the_cpu():
    out = {}
    for dev in ("cpu", "cuda"):
        model, diffusion = small_unet().to(dev), ddpm.Diffusion(100, "cosine", "eps", device=dev)
        torch.manual_seed(1)
        clf = side.TimeResNet(4, 8, width=8, T=100).to(dev).eval().requires_grad_(False)
        cond_fn = side.guidance(clf, torch.tensor([0, 1, 2, 3] * 2, device=dev), 3.0)
        out[dev] = diffusion.sample(model, 8, ddpm.sample_generators(0, range(8)), steps=10,
                                    eta=1.0, cond_fn=cond_fn).cpu()
    assert (out["cpu"] - out["cuda"]).abs().max() < 1e-3


def test_compiled_sampling_equals_eager():
    model, diffusion = small_unet().cuda(), ddpm.Diffusion(100, "cosine", "eps", device="cuda")
    eager = diffusion.sample(model, 16, ddpm.sample_generators(0, range(16)), steps=5, eta=0.0)
    fast = diffusion.sample(torch.compile(model), 16, ddpm.sample_generators(0, range(16)), steps=5,
                            eta=0.0)
    assert (eager - fast).abs().max() < 1e-3
