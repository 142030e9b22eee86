"""Flow matching: logit-normal t, interpolation, loss, the Euler sampler and dual guidance."""

from __future__ import annotations

import contextlib

import pytest
import torch

from nanodit.data.batch import make_batch
from nanodit.flow import guided_velocity, interpolate, sample_euler, sample_t, target, training_loss
from nanodit.kernels import flow_loss_ref


def test_logit_normal_t():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    t = sample_t(200_000, 0.0, 1.0, g, "cpu")
    z = torch.logit(t.double())
    assert 0 < t.min() and t.max() < 1
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    t2 = sample_t(200_000, 0.5, 2.0, g, "cpu")
    z2 = torch.logit(t2.double())
    assert abs(z2.mean() - 0.5) < 0.03 and abs(z2.std() - 2) < 0.03


def test_interpolation_endpoints_and_target():
    x0, eps = torch.randn(4, 16, 6, 8), torch.randn(4, 16, 6, 8)
    assert torch.equal(interpolate(x0, eps, torch.zeros(4)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(4)), eps)
    t = torch.rand(4)
    xt = interpolate(x0, eps, t)
    # d x_t / d t = eps - x0 = target
    d = (interpolate(x0, eps, t + 1e-3) - xt) / 1e-3
    torch.testing.assert_close(d, target(x0, eps), rtol=1e-2, atol=1e-2)


def test_flow_loss_ref():
    v, x0, eps = torch.randn(5, 16, 4, 4), torch.randn(5, 16, 4, 4), torch.randn(5, 16, 4, 4)
    t = torch.tensor([0.05, 0.15, 0.16, 0.95, 0.999])
    per, bsum, bcount = flow_loss_ref(v, x0, eps, t, None, 10)
    manual = ((v - (eps - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(per, manual)
    assert bcount.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    torch.testing.assert_close(bsum[1], manual[1] + manual[2])
    w = torch.rand(5)
    torch.testing.assert_close(flow_loss_ref(v, x0, eps, t, w, 10)[0], manual * w)


def test_euler_with_the_exact_velocity_returns_the_data():
    """For one data point the exact velocity is (x_t - x0) / t, constant along the path: Euler is exact."""
    x0 = torch.randn(3, 16, 6, 6)

    def model(x, t, *cond):
        return (x - x0) / t.view(-1, 1, 1, 1)

    out = sample_euler(model, torch.randn_like(x0), None, None, None, steps=50)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_dual_guidance_formula():
    B = 2
    vals = {(True, True): 1.0, (False, True): 3.0, (False, False): 10.0}  # (drop_dino, drop_text) -> v

    def model(x, t, dino, t5, mask, drop_dino=None, drop_text=None):
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = vals[(bool(drop_dino[i]), bool(drop_text[i]))]
        return out

    x = torch.randn(B, 16, 4, 4)
    args = (
        x,
        torch.full((B,), 0.5),
        torch.randn(B, 8),
        torch.randn(B, 3, 8),
        torch.ones(B, 3, dtype=torch.bool),
    )
    v = guided_velocity(model, *args, s_dino=2.0, s_text=3.0)
    # v00 + s_d (vd0 - v00) + s_t (vdt - vd0) = 1 + 2*2 + 3*7
    torch.testing.assert_close(v, torch.full_like(x, 26.0))


def test_training_loss_uses_the_generator_and_targets():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    unused = torch.zeros(4, 1)  # the zero model reads only x_t
    flags = torch.zeros(3, 4)
    batch = make_batch(torch.randn(4, 16, 4, 4), unused, unused, unused, flags, list("abcd"), [""] * 4, 0)
    zero = lambda x, *a: torch.zeros_like(x)
    l1, s1 = training_loss(zero, batch, flow_loss_ref, g1)
    l2, _ = training_loss(zero, batch, flow_loss_ref, g2)
    assert torch.equal(l1, l2)
    assert s1["bin_count"].sum() == 4
    # a zero model's loss is E|eps - x0|^2 ~ 2 for unit-variance data
    assert 1.0 < l1.item() < 3.0


@pytest.mark.gpu
def test_euler_sampler_as_a_cuda_graph_gives_the_same_numbers():
    """sample_euler(cuda_graph=True) replays the captured velocity: bitwise the eager sampler's output, with
    guidance (the 3-pass batch) and with a planted fault's hook (captured with the model), in bf16 autocast."""
    from nanodit.config import ModelConfig
    from nanodit.model import build_model
    from nanodit.validation.selftest import planted

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny"), 24, 40).to(dev).eval().requires_grad_(False)
    for p in model.parameters():  # adaLN-Zero starts at zero: give every path an effect
        p.data.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(5, 16, 12, 20, generator=g).to(dev)  # (B, C, H, W)
    dino = torch.randn(5, 24, generator=g).to(dev)
    t5 = torch.randn(5, 7, 40, generator=g).to(dev)
    mask = (torch.arange(7)[None] < torch.tensor([7, 3, 1, 5, 2])[:, None]).to(dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for s_d, s_t, fault in ((1.0, 1.0, None), (1.5, 3.0, None), (1.0, 1.0, "const_dino")):
        outs = []
        for graph in (False, True):
            with planted(model, fault, dino.mean(0).cpu().numpy()) if fault else contextlib.nullcontext():
                outs.append(
                    sample_euler(model, noise, dino, t5, mask, 6, s_d, s_t, autocast, cuda_graph=graph)
                )
        assert torch.equal(outs[0], outs[1]), (s_d, s_t, fault)
