"""Parity of the one-pass flow-matching loss with flow_loss_ref: per-sample loss, t-bin sums, dL/dv."""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_cases import DEVICE, check, fresh_seed, poison

from nanodit.kernels.flow_loss import flow_loss
from nanodit.kernels.ref import flow_loss_ref

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CPU_SHAPES = [(1, 16, 4, 4), (3, 16, 8, 8), (2, 4, 33, 7), (5, 16, 64, 64)]
GPU_SHAPES = [(1, 16, 4, 4), (2, 4, 33, 7), (4, 16, 64, 64), (16, 16, 64, 64), (3, 16, 64, 48), (7, 3, 1, 1)]


def cases() -> list:
    """(shape, dtype, weighted, layout)."""
    out = [pytest.param(s, F32, w, "contig", id=f"{s}-f32-w{w}") for s in CPU_SHAPES for w in (False, True)]
    out += [
        pytest.param((3, 16, 8, 8), F32, True, lay, id=f"f32-{lay}") for lay in ("channels_last", "sliced")
    ]
    for s, dt, w in itertools.product(GPU_SHAPES, (F32, BF16, F16), (False, True)):
        out.append(pytest.param(s, dt, w, "contig", marks=pytest.mark.gpu, id=f"gpu-{s}-{dt}-w{w}"))
    for dt, lay in itertools.product((BF16, F16), ("channels_last", "sliced")):
        out.append(pytest.param((4, 16, 32, 32), dt, True, lay, marks=pytest.mark.gpu, id=f"gpu-{dt}-{lay}"))
    return out


def make(shape, dtype, layout) -> torch.Tensor:
    if layout == "contig":
        return torch.randn(shape, device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        return torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # every other sample of a larger batch: batch stride 2N
        return torch.randn((2 * shape[0],) + shape[1:], device=DEVICE, dtype=dtype)[::2]
    raise ValueError(layout)


@pytest.mark.parametrize("shape,dtype,weighted,layout", cases())
def test_flow_loss_matches_ref(shape, dtype, weighted, layout):
    """per_sample, bin_sum, bin_count and dL/dv equal the reference's within the tolerance rule."""
    seed = fresh_seed()
    B = shape[0]
    v, x0, eps = make(shape, dtype, layout), make(shape, dtype, "contig"), make(shape, dtype, layout)
    t = torch.rand(B, device=DEVICE)
    t[0] = 1.0  # the top edge falls in the last bin (clamped), as in the ref
    weight = torch.rand(B, device=DEVICE) + 0.5 if weighted else None
    go = torch.randn(B, device=DEVICE)  # arbitrary per-sample upstream gradient
    outs = {}
    for key, fn, vv in (
        ("fast", flow_loss, v),
        ("ref64", flow_loss_ref, v.double()),
        ("lowp", flow_loss_ref, v),
    ):
        vv = vv.detach().clone().requires_grad_(True)
        args = (x0.double(), eps.double()) if key == "ref64" else (x0, eps)
        poison()
        ps, bs, bc = fn(vv, *args, t, weight, nbins=7)
        (dv,) = torch.autograd.grad(ps, [vv], go.to(ps.dtype))
        outs[key] = (ps.detach(), bs, bc, dv)
    for i, name in enumerate(("per_sample", "bin_sum", "bin_count", "dv")):
        f, r, lo = outs["fast"][i], outs["ref64"][i], outs["lowp"][i]
        rounds = 2 if name == "dv" else 1  # dL/dv: saved in v's dtype, then scaled by the upstream gradient
        check(f"flow_loss {name} {shape} {dtype} w={weighted} {layout}", f, r, lo, seed, roundings=rounds)
    assert torch.equal(outs["fast"][2], outs["lowp"][2])  # counts are exact


def test_flow_loss_mean_backward_and_mixed_dtypes():
    """The training use: loss = per_sample.mean() (an expanded, stride-0 cotangent), x0 in another dtype."""
    seed = fresh_seed()
    v = torch.randn(4, 16, 8, 8, device=DEVICE, requires_grad=True)
    x0 = torch.randn(4, 16, 8, 8, device=DEVICE, dtype=torch.float64)
    eps, t = torch.randn(4, 16, 8, 8, device=DEVICE), torch.rand(4, device=DEVICE)
    (g,) = torch.autograd.grad(flow_loss(v, x0, eps, t)[0].mean(), [v])
    (r,) = torch.autograd.grad(flow_loss_ref(v, x0, eps, t)[0].mean(), [v])
    assert g.dtype == v.dtype
    check("flow_loss mean-grad", g, r, None, seed)


def test_flow_loss_without_grad_skips_the_gradient():
    """Under no_grad the loss is the same and carries no graph (the dL/dv write is skipped)."""
    v, x0, eps = (torch.randn(2, 4, 8, 8, device=DEVICE) for _ in range(3))
    t = torch.rand(2, device=DEVICE)
    with torch.no_grad():
        ps, bs, bc = flow_loss(v.requires_grad_(True), x0, eps, t)
    assert ps.grad_fn is None
    torch.testing.assert_close(ps, flow_loss_ref(v, x0, eps, t)[0], rtol=1e-5, atol=1e-7)


def test_flow_loss_bins_sum_to_the_batch():
    """Every sample lands in exactly one bin; bin sums add up to the unweighted total."""
    v, x0, eps = (torch.randn(9, 2, 4, 4, device=DEVICE) for _ in range(3))
    t = torch.tensor([0.0, 0.05, 0.1, 0.5, 0.55, 0.999, 1.0, 0.3, 0.7], device=DEVICE)
    ps, bs, bc = flow_loss(v, x0, eps, t, weight=torch.full((9,), 3.0, device=DEVICE), nbins=10)
    assert bc.sum().item() == 9 and bc[9].item() == 2 and bc[0].item() == 2
    torch.testing.assert_close(bs.sum(), ps.sum() / 3, rtol=1e-5, atol=0)


@pytest.mark.parametrize("blocks", ["many", "long"])
def test_flow_loss_many_blocks_and_long_loops(monkeypatch, blocks):
    """Small tiles force the grid's edges: "many" gives each sample more than 32 partial sums (the finish
    kernel loads them 32 at a time, in order), "long" one program per sample looping over every tile
    (the pipelined loop with a ragged last tile)."""
    from nanodit.kernels import flow_loss as fl
    from nanodit.kernels import tiling

    seed = fresh_seed()
    monkeypatch.setattr(fl, "BLOCK", 16)
    if blocks == "many":
        monkeypatch.setattr(tiling, "INTERPRET_PROGRAMS", 200)  # CPU: 60 blocks a sample (a GPU: 119)
        monkeypatch.setattr(tiling, "BWD_PROGRAMS_PER_SM", 200)
    else:
        monkeypatch.setattr(tiling, "BWD_PROGRAMS_PER_SM", 1)
        monkeypatch.setattr(tiling, "INTERPRET_PROGRAMS", 1)
    B = 2 if blocks == "many" else 1
    v = torch.randn(B, 4, 25, 19, device=DEVICE, requires_grad=True)  # N = 1900: 119 tiles of 16
    x0, eps = torch.randn_like(v), torch.randn_like(v)
    t = torch.rand(B, device=DEVICE)
    ps, bs, bc = flow_loss(v, x0, eps, t, nbins=4)
    (dv,) = torch.autograd.grad(ps.sum(), [v])
    vr = v.detach().double().requires_grad_(True)
    rps, rbs, rbc = flow_loss_ref(vr, x0.double(), eps.double(), t, nbins=4)
    (rdv,) = torch.autograd.grad(rps.sum(), [vr])
    for name, f, r in (("per_sample", ps, rps), ("bin_sum", bs, rbs), ("dv", dv, rdv)):
        check(f"flow_loss {blocks} {name}", f, r, None, seed)
    assert torch.equal(bc, rbc.float())


def test_flow_loss_finish_takes_the_batch_in_one_step_where_it_fits():
    """The finishing kernel (one program) takes every sample at once up to its tile budget: one round of
    loads at B = 256 (the large benchmark shape), smaller steps where the partials or bins are wide."""
    from nanodit.kernels import flow_loss as fl

    assert fl._finish_block_b(256, 4, 10) == 256
    assert fl._finish_block_b(16, 8, 10) == 16
    assert fl._finish_block_b(1, 1, 10) == 16  # the least step
    assert fl._finish_block_b(1000, 119, 10) == fl.FINISH_TILE // 32  # 32 partials a load
    assert fl._finish_block_b(256, 4, 1000) == 16  # 1024 bins: the tile budget bounds the step


def test_flow_loss_finish_loops_over_samples(monkeypatch):
    """A batch larger than the finishing kernel's step: per-sample losses, bin sums and counts still match
    (the loop over sample steps, with a ragged last step)."""
    from nanodit.kernels import flow_loss as fl

    seed = fresh_seed()
    monkeypatch.setattr(fl, "FINISH_TILE", 64)  # 8 bins (nbins 7): 16 samples a step, 3 steps for 40
    assert fl._finish_block_b(40, 1, 7) == 16
    v = torch.randn(40, 2, 4, 4, device=DEVICE, requires_grad=True)
    x0, eps = torch.randn_like(v), torch.randn_like(v)
    t, w = torch.rand(40, device=DEVICE), torch.rand(40, device=DEVICE) + 0.5
    ps, bs, bc = flow_loss(v, x0, eps, t, w, nbins=7)
    (dv,) = torch.autograd.grad(ps.sum(), [v])
    vr = v.detach().double().requires_grad_(True)
    rps, rbs, rbc = flow_loss_ref(vr, x0.double(), eps.double(), t, w, nbins=7)
    (rdv,) = torch.autograd.grad(rps.sum(), [vr])
    for name, f, r in (("per_sample", ps, rps), ("bin_sum", bs, rbs), ("dv", dv, rdv)):
        check(f"flow_loss finish loop {name}", f, r, None, seed)
    assert torch.equal(bc, rbc.float())
