"""Parity of the gated-residual kernel with gated_residual_ref: x + gate[b] * y, its dx, dgate, dy."""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_cases import LAYOUTS, ROW_CASES, compare, fresh_seed, make_rows, make_vecs

from nanodit.kernels.ref import gated_residual_ref
from nanodit.kernels.residual import gated_residual


@pytest.mark.parametrize("shape,dtype,layout,sliced", ROW_CASES)
def test_gated_residual_matches_ref(shape, dtype, layout, sliced):
    """out, dx, dgate, dy of gated_residual equal the reference's within the tolerance rule."""
    seed = fresh_seed()
    B, T, D = shape
    x, y = make_rows(B, T, D, dtype, layout), make_rows(B, T, D, dtype, layout)
    (gate,) = make_vecs(B, D, 1, dtype, sliced)
    name = f"gated_residual {shape} {dtype} {layout} sliced={sliced}"
    compare(name, gated_residual, gated_residual_ref, (x, gate, y), [0, 1, 2], layout, seed)


@pytest.mark.parametrize(
    "xdt,ydt", [pytest.param(a, b, marks=pytest.mark.gpu) for a, b in itertools.product(
        (torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16, torch.float16)) if a != b]
    + [(torch.float32, torch.float32)],
)  # fmt: skip
def test_gated_residual_dtypes_follow_promotion(xdt, ydt):
    """Mixed dtypes give the promoted output dtype and each input's own gradient dtype, like the ref."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 9, 64, device=dev, dtype=xdt, requires_grad=True)
    y = torch.randn(2, 9, 64, device=dev, dtype=ydt, requires_grad=True)
    gate = torch.randn(2, 64, device=dev, dtype=ydt, requires_grad=True)
    out, ref = gated_residual(x, gate, y), gated_residual_ref(x, gate, y)
    assert out.dtype == ref.dtype
    grads = torch.autograd.grad(out.float().sum(), [x, gate, y])
    assert [g.dtype for g in grads] == [xdt, ydt, ydt]
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


def test_layout_list_is_covered():
    """Every layout the parity grid claims to test exists in kernel_cases (guards against a typo'd id)."""
    for layout in LAYOUTS:
        assert make_rows(1, 2, 8, torch.float32, layout).shape == (1, 2, 8)
