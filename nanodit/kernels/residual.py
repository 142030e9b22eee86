"""The adaLN-Zero gated residual ``x + gate[b] * y`` as a Triton kernel beside its PyTorch twin.

x, y (B, T, D), any float dtypes and B/T strides; gate (B, D), e.g. a ``chunk()`` slice of the (B, 6D)
adaLN output. Computed in fp32, stored once in the promoted dtype (the reference rounds gate*y first).

Bytes model (e = bytes per element, N = B*T*D):
| direction | traffic |
|---|---|
| forward | read x, y, write out: 3Ne |
| backward | read dout, y, write dy: 3Ne (dx = dout is passed through, no copy) |
Backward math: dx = dout, dy = gate[b] * dout, dgate[b] = sum_T dout * y (two-stage, deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanodit.kernels import checks, doors, grid, reduce, tiling
from nanodit.kernels.ref import gated_residual_ref

__all__ = ["gated_residual", "gated_residual_ref"]


@triton.jit(do_not_specialize=["T"])
def _gated_residual_fwd_kernel(
    X, GATE, Y, OUT,
    T, D, s_xb, s_xt, s_gb, s_yb, s_yt,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < T)[:, None] & cmask[None, :]
    gate = tl.load(GATE + b * s_gb + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(X + b * s_xb + rows[:, None] * s_xt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * s_yb + rows[:, None] * s_yt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = x + gate[None, :] * y
    tl.store(OUT + (b * T + rows[:, None]) * D + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "tiles"])
def _gated_residual_bwd_kernel(
    DOUT, GATE, Y, DY, PART,
    T, D, tiles, s_db, s_dt, s_gb, s_yb, s_yt,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    blk, nblk = tl.program_id(0), tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gate = tl.load(GATE + b * s_gb + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    rows = blk * tiles * ROWS + tl.arange(0, ROWS)
    mask = (rows < T)[:, None] & cmask[None, :]
    d = tl.load(DOUT + b * s_db + rows[:, None] * s_dt + cols[None, :], mask=mask, other=0.0)
    y = tl.load(Y + b * s_yb + rows[:, None] * s_yt + cols[None, :], mask=mask, other=0.0)
    for i in range(tiles):
        # issue the next tile's loads first: they fly while this tile computes (software pipelining)
        nrows = rows + ROWS
        nmask = ((nrows < T) & (i + 1 < tiles))[:, None] & cmask[None, :]
        nd = tl.load(DOUT + b * s_db + nrows[:, None] * s_dt + cols[None, :], mask=nmask, other=0.0)
        ny = tl.load(Y + b * s_yb + nrows[:, None] * s_yt + cols[None, :], mask=nmask, other=0.0)
        d32 = d.to(tl.float32)
        dy = d32 * gate[None, :]
        tl.store(DY + (b * T + rows[:, None]) * D + cols[None, :], dy.to(DY.dtype.element_ty), mask=mask)
        acc += d32 * y.to(tl.float32)
        rows, mask, d, y = nrows, nmask, nd, ny
    tl.store(PART + (b * nblk + blk) * D + cols, tl.sum(acc, axis=0), mask=cmask)  # PART (B, nblk, D)


def _gated_residual_fwd(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, traced: bool = False
) -> torch.Tensor:
    checks.check_device(_gated_residual_fwd_kernel, x, gate, y)
    x, gate, y = checks.rows3d(x), checks.rows2d(gate), checks.rows3d(y)
    B, T, D = x.shape
    dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
    out = torch.empty((B, T, D), dtype=dtype, device=x.device)
    block_d, rows, warps = tiling.row_config(
        D, bwd=False, interpreted=checks.is_interpreted(_gated_residual_fwd_kernel)
    )
    doors.target(_gated_residual_fwd_kernel, traced)[(grid.cdiv(T, rows), B)](
        x, gate, y, out, T, D, x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        ROWS=rows, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out


def _gated_residual_bwd(
    dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, traced: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    dout, gate, y = checks.rows3d(dout), checks.rows2d(gate), checks.rows3d(y)
    B, T, D = y.shape
    block_d, rows, warps = tiling.row_config(
        D, bwd=True, interpreted=checks.is_interpreted(_gated_residual_bwd_kernel), residual=True
    )
    meta = dict(ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    dy = torch.empty((B, T, D), dtype=y.dtype, device=y.device)

    def args(part, tiles):
        return (
            dout, gate, y, dy, part, T, D, tiles,
            dout.stride(0), dout.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        )  # fmt: skip

    nblk, tiles = grid.wave_blocks(_gated_residual_bwd_kernel, args, meta, B, T, rows, y.device)
    part = torch.empty((B, nblk, D), dtype=torch.float32, device=y.device)
    doors.target(_gated_residual_bwd_kernel, traced)[(nblk, B)](*args(part, tiles), **meta)
    (dgate,) = reduce.sum_blocks(part[None], (gate.dtype,), traced)  # (B, D)
    return dy, dgate


def _gated_residual_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(gate, y)


def _gated_residual_backward(ctx, dout, bwd):
    gate, y = ctx.saved_tensors
    dy, dgate = bwd(dout, gate, y)
    return dout.to(ctx.x_dtype), dgate, dy  # dx = dout: no kernel, no copy when dtypes agree


class _GatedResidual(torch.autograd.Function):
    """Eager door: straight to the launchers. Under torch.compile the library ops below are used."""

    @staticmethod
    def forward(ctx, x, gate, y):
        out = _gated_residual_fwd(x, gate, y)
        _gated_residual_setup(ctx, (x, gate, y), out)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _gated_residual_backward(ctx, dout, _gated_residual_bwd)


def _gated_residual_fake(x, gate, y):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype)))


def _gated_residual_bwd_fake(dout, gate, y):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


_GATED_RESIDUAL = doors.CompileDoors(
    "gated_residual",
    _gated_residual_fwd_kernel,
    _gated_residual_fwd,
    _gated_residual_bwd,
    "(Tensor x, Tensor gate, Tensor y) -> Tensor",
    "(Tensor dout, Tensor gate, Tensor y) -> (Tensor, Tensor)",
    _gated_residual_fake,
    _gated_residual_bwd_fake,
    _gated_residual_setup,
    _gated_residual_backward,
)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate[b] * y; x, y (B, T, D), gate (B, D); result in the promoted dtype."""
    checks.check_rows("gated_residual", x)
    if y.shape != x.shape:
        raise ValueError(f"gated_residual: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    checks.check_vec("gated_residual", "gate", gate, x)
    if torch.compiler.is_compiling():
        return _GATED_RESIDUAL(x, gate, y)  # (B, T, D)
    return _GatedResidual.apply(x, gate, y)  # (B, T, D)
