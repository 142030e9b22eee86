"""Parity of the fused linear layer (``kernels.linear``) with ``F.linear``: output and the input, weight and bias
gradients, under the rule of ``kernel_cases``; the bias gradient's column sums against ``torch.sum``. On CPU (Triton's
interpreter) fp32 shapes; on a GPU also bf16 / fp16 and under bf16 autocast.
"""

from __future__ import annotations

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
