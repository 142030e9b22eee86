"""Parity of the adaLN kernels with their PyTorch twins: outputs and every gradient.

adaln_modulate(x, shift, scale), residual_adaln_modulate(x, y, gate|None, shift, scale) and
gated_residual_layer_norm(x, gate, y, weight, bias) against their ``*_ref`` twins, under the rule of ``kernel_cases``. On CPU (Triton's
interpreter) a subset of shapes in fp32; on a GPU the full grid in fp32, bf16 and fp16.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, ROW_CASES, compare, fresh_seed, make_rows, make_vecs

from nanodit.kernels import tiling
from nanodit.kernels.adaln import adaln_modulate, gated_residual_layer_norm, residual_adaln_modulate
from nanodit.kernels.ref import (
    adaln_modulate_ref,
    gated_residual_layer_norm_ref,
    residual_adaln_modulate_ref,
)


@pytest.mark.parametrize("shape,dtype,layout,sliced", ROW_CASES)
def test_modulate_matches_ref(shape, dtype, layout, sliced):
    """h, dx, dshift, dscale of adaln_modulate equal the reference's within the tolerance rule."""
    seed = fresh_seed()
    B, T, D = shape
    x = make_rows(B, T, D, dtype, layout, loc=1.5)  # a non-zero mean exercises the two-pass variance
    shift, scale = make_vecs(B, D, 2, dtype, sliced)
    name = f"modulate {shape} {dtype} {layout} sliced={sliced}"
    compare(name, adaln_modulate, adaln_modulate_ref, (x, shift, scale), [0, 1, 2], layout, seed)


@pytest.mark.parametrize("gated", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("shape,dtype,layout,sliced", ROW_CASES)
def test_residual_modulate_matches_ref(shape, dtype, layout, sliced, gated):
    """x_new, h and the gradients of x, y, gate, shift, scale equal the reference's."""
    seed = fresh_seed()
    B, T, D = shape
    x = make_rows(B, T, D, dtype, layout, loc=0.5)
    y = make_rows(B, T, D, dtype, layout)
    shift, scale, gate = make_vecs(B, D, 3, dtype, sliced)
    args = (x, y, gate if gated else None, shift, scale)
    diff = [0, 1, 2, 3, 4] if gated else [0, 1, 3, 4]
    name = f"residual_modulate {shape} {dtype} {layout} sliced={sliced} gated={gated}"
    compare(name, residual_adaln_modulate, residual_adaln_modulate_ref, args, diff, layout, seed)


@pytest.mark.parametrize("shape,dtype,layout,sliced", ROW_CASES)
def test_residual_layer_norm_matches_ref(shape, dtype, layout, sliced):
    """x_new, h = LayerNorm(x_new) * weight + bias and the gradients of x, gate, y, weight, bias equal those of
    the reference (the gated residual, then F.layer_norm with the affine parameters)."""
    seed = fresh_seed()
    B, T, D = shape
    x = make_rows(B, T, D, dtype, layout, loc=0.5)
    y = make_rows(B, T, D, dtype, layout)
    (gate,) = make_vecs(B, D, 1, dtype, sliced)
    weight = (1 + 0.5 * torch.randn(D, device=DEVICE)).to(dtype)
    bias = (0.5 * torch.randn(D, device=DEVICE)).to(dtype)
    name = f"residual_layer_norm {shape} {dtype} {layout} sliced={sliced}"
    args = (x, gate, y, weight, bias)
    compare(
        name, gated_residual_layer_norm, gated_residual_layer_norm_ref, args, [0, 1, 2, 3, 4], layout, seed
    )


def test_residual_layer_norm_rejects_a_wrong_weight():
    x = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(
        ValueError, match=r"gated_residual_layer_norm: weight and bias must have shape \(8,\)"
    ):
        gated_residual_layer_norm(x, x[:, 0], x, torch.ones(4, device=DEVICE), torch.zeros(8, device=DEVICE))


PIPELINE_DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("dtype", PIPELINE_DTYPES, ids=str)
@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("gated", [True, False, None], ids=["gate", "nogate", "modulate"])
def test_pipeline_depths_match_ref(monkeypatch, stages, gated, dtype):
    """The adaLN backward loops at other pipeline depths than the default (tiling.BWD_STAGES) obey the same
    rule, with long loops (several tiles per program) and a ragged last tile."""
    monkeypatch.setattr(tiling, "BWD_STAGES", stages)
    monkeypatch.setattr(tiling, "BWD_PROGRAMS_PER_SM", 1)  # few programs -> long loops
    seed = fresh_seed()
    B, T, D = 2, 301, 384
    x = make_rows(B, T, D, dtype, "bt_transposed", loc=0.5)
    shift, scale, gate = make_vecs(B, D, 3, dtype, True)
    name = f"stages={stages} {dtype} gated={gated}"
    if gated is None:
        compare(name, adaln_modulate, adaln_modulate_ref, (x, shift, scale), [0, 1, 2], "contig", seed)
        return
    y = make_rows(B, T, D, dtype, "contig")
    args = (x, y, gate if gated else None, shift, scale)
    diff = [0, 1, 2, 3, 4] if gated else [0, 1, 3, 4]
    compare(name, residual_adaln_modulate, residual_adaln_modulate_ref, args, diff, "row_padded", seed)


def test_mixed_dtypes_follow_promotion():
    """fp32 residual stream + fp16 branch: x_new and h come back in the promoted dtype (fp32) like the ref."""
    x = torch.randn(2, 5, 64, device="cuda" if torch.cuda.is_available() else "cpu")
    y, (shift, scale) = torch.randn_like(x).half(), make_vecs(2, 64, 2, torch.float32, True)
    xn, h = residual_adaln_modulate(x, y, None, shift, scale)
    rxn, rh = residual_adaln_modulate_ref(x, y, None, shift, scale)
    assert xn.dtype == rxn.dtype == h.dtype == rh.dtype == torch.float32
    torch.testing.assert_close(xn, rxn)
    torch.testing.assert_close(h, rh, rtol=1e-5, atol=1e-5)


def test_unused_output_gets_zero_gradient():
    """Only h used downstream: the x_new cotangent arrives undefined and must count as zero."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = torch.randn(2, 6, 96, device=dev, requires_grad=True), torch.randn(2, 6, 96, device=dev)
    shift, scale = torch.randn(2, 96, device=dev), torch.randn(2, 96, device=dev)
    (gx,) = torch.autograd.grad(residual_adaln_modulate(x, y, None, shift, scale)[1].square().sum(), [x])
    (rx,) = torch.autograd.grad(residual_adaln_modulate_ref(x, y, None, shift, scale)[1].square().sum(), [x])
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-5)


def _branch_ops():
    """(name, fast, ref, args builder) for the three ops that make a branch input h."""

    def modulate_args(B, T, D):
        x = make_rows(B, T, D, torch.float32, "contig", loc=1.5)
        return (x, *make_vecs(B, D, 2, torch.bfloat16, True))

    def residual_args(B, T, D):
        x = make_rows(B, T, D, torch.float32, "contig", loc=0.5)
        y = make_rows(B, T, D, torch.bfloat16, "contig")
        shift, scale, gate = make_vecs(B, D, 3, torch.bfloat16, True)
        return (x, y, gate, shift, scale)

    def layer_norm_args(B, T, D):
        x = make_rows(B, T, D, torch.float32, "contig", loc=0.5)
        y = make_rows(B, T, D, torch.bfloat16, "contig")
        (gate,) = make_vecs(B, D, 1, torch.bfloat16, True)
        return (x, gate, y, 1 + 0.5 * torch.randn(D, device=DEVICE), 0.5 * torch.randn(D, device=DEVICE))

    return [
        ("modulate", adaln_modulate, adaln_modulate_ref, modulate_args),
        ("residual_modulate", residual_adaln_modulate, residual_adaln_modulate_ref, residual_args),
        ("residual_layer_norm", gated_residual_layer_norm, gated_residual_layer_norm_ref, layer_norm_args),
    ]


def test_ref_twins_store_h_in_the_autocast_dtype():
    """Under autocast the twins return h in the autocast dtype (the dtype the next linear layer casts it to), equal
    to the value without autocast cast once; the residual stream keeps its dtype (CPU bf16 autocast)."""
    seed = fresh_seed()
    for name, _, ref, make in _branch_ops():
        args = make(2, 9, 64)
        plain = ref(*args)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            auto = ref(*args)
        plain, auto = (
            (plain,) if torch.is_tensor(plain) else plain,
            (auto,) if torch.is_tensor(auto) else auto,
        )
        h_plain, h_auto = plain[-1], auto[-1]
        assert h_auto.dtype == torch.bfloat16, name
        assert torch.equal(h_auto, h_plain.to(torch.bfloat16)), (
            f"{name}: h is not the plain h cast (seed {seed})"
        )
        for p, a in zip(plain[:-1], auto[:-1]):
            assert a.dtype == p.dtype and torch.equal(a, p), f"{name}: x_new changed (seed {seed})"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 256, 384), (3, 257, 385), (1, 1, 1024)], ids=str)
def test_branch_ops_under_autocast_match_the_twins(shape):
    """fp32 residual stream, bf16 adaLN vectors and branch output, under bf16 autocast (the nano step): h comes out
    in bf16, x_new and each gradient in its input's dtype. Against the twin on fp32 copies of the same values (so
    that both do their arithmetic in fp32): h within one bf16 rounding (each rounds its fp32 value once), fp32
    results within FP32_RTOL, bf16 results within two bf16 roundings, of the largest value."""
    from kernel_cases import FP32_RTOL

    seed = fresh_seed()
    eps = torch.finfo(torch.bfloat16).eps
    for name, fast, ref, make in _branch_ops():
        args = make(*shape)
        results = []
        for fn, dtype in ((fast, None), (ref, torch.float32)):
            leaves = [a.detach().to(dtype or a.dtype).requires_grad_(True) for a in args]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(*leaves)
            out = (out,) if torch.is_tensor(out) else out
            gen = torch.Generator(device=DEVICE).manual_seed(seed)
            cots = [torch.randn(o.shape, device=DEVICE, generator=gen).to(o.dtype) for o in out]
            results.append((*out, *torch.autograd.grad(out, leaves, cots)))
        n_out = len(results[0]) - len(args)
        assert results[0][n_out - 1].dtype == torch.bfloat16, f"{name}: h is {results[0][n_out - 1].dtype}"
        for a, g in zip(args, results[0][n_out:]):
            assert g.dtype == a.dtype, f"{name}: a gradient in {g.dtype} for an input in {a.dtype}"
        for i, (got, want) in enumerate(zip(*results)):
            big = want.double().abs().max().item()
            rtol = eps if i == n_out - 1 else (2 * eps if got.dtype == torch.bfloat16 else FP32_RTOL)
            err = (got.double() - want.double()).abs().max().item()
            assert err <= rtol * big + 1e-6, (
                f"{name} {shape} output/grad {i}: {err:.3e} > {rtol * big:.3e} (seed {seed})"
            )
