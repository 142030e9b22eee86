"""Parity of the fused linear layer (``kernels.linear``) with ``F.linear``: output and the input, weight and bias
gradients, under the rule of ``kernel_cases``; the bias gradient's column sums against ``torch.sum``. On CPU (Triton's
interpreter) fp32 shapes; on a GPU also bf16 / fp16 and under bf16 autocast.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICE, check, compare, fresh_seed, make_rows

from nanodit.kernels.linear import bias_grad, linear

gpu = pytest.mark.gpu
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

SUM_CASES = [
    pytest.param(m, n, F32, id=f"{m}x{n}-f32") for m, n in [(1, 1), (37, 5), (300, 130), (1000, 384), (0, 7)]
] + [
    pytest.param(m, n, dt, marks=gpu, id=f"gpu-{m}x{n}-{dt}")
    for m, n in [(16384, 1152), (16384, 384), (16384, 1536), (4097, 385), (16, 2304), (257, 1)]
    for dt in (F32, BF16, F16)
]


@pytest.mark.parametrize("m,n,dtype", SUM_CASES)
def test_bias_grad_matches_the_reduction(m, n, dtype):
    """The column sums against float64, within the rule against torch's own reduction in that dtype."""
    seed = fresh_seed()
    g = torch.randn(m, n, device=DEVICE).to(dtype)
    got = bias_grad(g)
    check(f"bias_grad {m}x{n} {dtype}", got, g.double().sum(0), g.sum(0), seed)


LINEAR_CASES = [
    pytest.param((2, 7, 33), 19, F32, id="(2,7,33)->19-f32"),
    pytest.param((1, 1, 384), 1152, F32, id="(1,1,384)->1152-f32"),
    pytest.param((3, 65, 96), 130, F32, id="(3,65,96)->130-f32"),
] + [
    pytest.param(s, n, dt, marks=gpu, id=f"gpu-{s}->{n}-{dt}")
    for s, n in [((4, 1024, 384), 1152), ((16, 1024, 1536), 384), ((3, 257, 385), 129)]
    for dt in (F32, BF16, F16)
]


@pytest.mark.parametrize("shape,n_out,dtype", LINEAR_CASES)
def test_linear_matches_ref(shape, n_out, dtype):
    """y and the gradients of x, weight and bias equal F.linear's (autograd's matmuls and reduction)."""
    seed = fresh_seed()
    B, T, K = shape
    x = make_rows(B, T, K, dtype, "contig")
    w = (torch.randn(n_out, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(n_out, device=DEVICE).to(dtype)
    compare(f"linear {shape}->{n_out} {dtype}", linear, F.linear, (x, w, b), [0, 1, 2], "contig", seed)


@gpu
def test_linear_under_autocast_matches_ref():
    """fp32 parameters and input under bf16 autocast: y in bf16 and gradients in each input's dtype, as
    autocast's own linear gives them, within two bf16 roundings of its values."""
    seed = fresh_seed()
    x = torch.randn(4, 300, 384, device=DEVICE, requires_grad=True)
    w = (torch.randn(768, 384, device=DEVICE) / 20).requires_grad_(True)
    b = torch.randn(768, device=DEVICE, requires_grad=True)
    cot = torch.randn(4, 300, 768, device=DEVICE)
    results = []
    for fn in (linear, F.linear):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x, w, b)
        grads = torch.autograd.grad(y, [x, w, b], cot.to(y.dtype))
        results.append((y, *grads))
    for i, (got, want) in enumerate(zip(*results)):
        assert got.dtype == want.dtype and got.shape == want.shape, i
        tol = 2 * torch.finfo(torch.bfloat16).eps * want.double().abs().max().item()
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol, f"autocast linear out/grad {i}: {err:.3e} > {tol:.3e} (seed {seed})"


def test_linear_without_bias_or_inside_compile_is_f_linear():
    x, w = torch.randn(2, 3, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    assert torch.equal(linear(x, w, None), F.linear(x, w, None))
    with pytest.raises(RuntimeError):  # a wrong shape is F.linear's own error
        linear(x, torch.randn(4, 7, device=DEVICE), torch.zeros(4, device=DEVICE))


def _layers(seed: int) -> list[torch.nn.Linear]:
    torch.manual_seed(seed)
    return [torch.nn.Linear(24, 40), torch.nn.Linear(40, 24), torch.nn.Linear(24, 7)]


def _run_layers(layers, x, fn, casts: bool):
    """x through the layers under CPU bf16 autocast, inside autocast_weights if casts; -> y, x.grad, param grads."""
    from nanodit.kernels.linear import autocast_weights

    for m in layers:
        m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = autocast_weights(layers) if casts else contextlib.nullcontext()
        with ctx:
            h = x
            for m in layers:
                h = fn(h, m.weight, m.bias)
    h.float().square().sum().backward()
    return [h, x.grad] + [t.grad for m in layers for t in (m.weight, m.bias)]


def test_autocast_weights_match_autocasts_own_casts():
    """Inside ``autocast_weights`` the layers' output and every gradient equal F.linear's under autocast bitwise
    (CPU bf16 autocast: the copies are the same roundings autocast makes, one per weight)."""
    seed = fresh_seed()
    x = torch.randn(3, 5, 24)
    got = _run_layers(_layers(seed), x, linear, casts=True)
    want = _run_layers(_layers(seed), x, F.linear, casts=False)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"output/grad {i} differs (seed {seed})"


def test_autocast_weights_make_no_per_layer_casts():
    """The point of the copies: inside ``autocast_weights`` a layer's forward casts nothing (its input is already
    bf16 after the first layer; weights and biases come from the one foreach copy); outside, two casts a layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nanodit.kernels.linear import autocast_weights

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                self.n += 1
            return func(*args, **(kwargs or {}))

    layers = _layers(fresh_seed())
    x = torch.randn(2, 3, 24).to(torch.bfloat16)
    counts = []
    for casts in (True, False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with autocast_weights(layers) if casts else contextlib.nullcontext():
                with Casts() as mode:
                    h = x
                    for m in layers:
                        h = linear(h, m.weight, m.bias)
        counts.append(mode.n)
    assert counts == [0, 2 * len(layers)], counts


def test_autocast_weights_copies_are_per_forward():
    """Two forwards, then the first one's backward: each backward reads the copies of its own forward, taken
    before the weights changed, exactly as autocast's own casts are kept."""
    seed = fresh_seed()
    layers = _layers(seed)
    x = torch.randn(2, 4, 24)
    from nanodit.kernels.linear import autocast_weights

    outs = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16), autocast_weights(layers):
            h = x
            for m in layers:
                h = linear(h, m.weight, m.bias)
        outs.append(h)
        with torch.no_grad():
            for m in layers:
                m.weight.mul_(1.5)
    outs[0].float().sum().backward()
    first = [m.weight.grad.clone() for m in layers]
    ref_layers = _layers(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x
        for m in ref_layers:
            h = F.linear(h, m.weight, m.bias)
    h.float().sum().backward()
    for i, (g, m) in enumerate(zip(first, ref_layers)):
        assert torch.equal(g, m.weight.grad), f"layer {i}: the first backward read other copies (seed {seed})"
