"""adaLN modulation and the fused block boundary, as Triton kernels beside their PyTorch twins.

    h = adaln_modulate(x, shift, scale)  # LayerNorm(x) * (1 + scale[b]) + shift[b]
    x_new, h = residual_adaln_modulate(x, y, gate, shift, scale)  # x + gate[b] * y, modulate(x_new)

x, y (B, T, D), any float dtype, any B/T strides; shift, scale, gate (B, D), e.g. ``chunk()`` slices of
one (B, 6D) adaLN output. LayerNorm has no affine and eps 1e-6; statistics and sums are fp32; outputs
are in the input dtype, except h under autocast in eager calls: it is stored in the autocast dtype, the dtype the
linear layer that reads it casts it to (``ref.branch_dtype``; the twins do the same). Eager calls run an
``autograd.Function``; under torch.compile the same code is a ``torch.library`` op with autograd (a triton op on a
GPU, a custom op under the interpreter; see ``doors.CompileDoors``), traced without a graph break. CPU tensors run
through Triton's interpreter (``TRITON_INTERPRET=1``).

The forwards also write each row's LayerNorm mean and rstd (fp32, 8 bytes a row: +0.5% over 2Ne at D=384,
bf16), which the backwards read instead of recomputing them: two of the four row reductions per tile and
their dependency chain leave the backward loop, which Nsight Compute showed issue- and latency-bound.

Bytes model (e = bytes per element, N = B*T*D; the (B, D) vectors, statistics and fp32 partials are not counted):
| op | forward | backward |
|---|---|---|
| modulate | read x, write h: 2Ne | read x, dh, write dx: 3Ne |
| residual_modulate, gate | read x, y, write x_new, h: 4Ne | read x_new, dx_new, dh, y, write dx, dy: 6Ne |
| residual_modulate, no gate | 4Ne | read x_new, dx_new, dh, write dx (= dy): 4Ne |
The eager reference moves 2-3x as much: LayerNorm, the fp32 casts, the scale and the shift each make a pass.

Backward math, per row (xhat = (x - mean) * rstd, s1 = 1 + scale[b], g = dh * s1):
    dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))
    dshift[b] = sum_T dh,  dscale[b] = sum_T dh * xhat
and for the boundary, with gx = dx_new + dx(h):  dx = gx, dy = gate * gx, dgate[b] = sum_T gx * y.
The sums over T are two-stage (see ``grid``): deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanodit.kernels import checks, doors, grid, reduce, tiling
from nanodit.kernels.ref import LN_EPS, adaln_modulate_ref, branch_dtype, residual_adaln_modulate_ref

__all__ = ["adaln_modulate", "adaln_modulate_ref", "residual_adaln_modulate", "residual_adaln_modulate_ref"]

# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _ln_rows(x, mask, D, eps):
    """fp32 tile (ROWS, BLOCK_D) -> (xhat with masked lanes 0, mean (ROWS,), rstd (ROWS,)); two-pass variance."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    return xc * rstd[:, None], mean, rstd


@triton.jit
def _store_stats(STATS, b, B, T, rows, mean, rstd):
    """STATS (2, B, T) fp32: the rows' mean and rstd, for the backward (8 bytes a row)."""
    rmask = rows < T
    tl.store(STATS + b * T + rows, mean, mask=rmask)
    tl.store(STATS + (B + b) * T + rows, rstd, mask=rmask)


@triton.jit(do_not_specialize=["T"])
def _modulate_fwd_kernel(
    X, SHIFT, SCALE, H, STATS,
    T, D, s_xb, s_xt, s_shb, s_scb, EPS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b, B = tl.program_id(1).to(tl.int64), tl.num_programs(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < T)[:, None] & cmask[None, :]
    shift = tl.load(SHIFT + b * s_shb + cols, mask=cmask, other=0.0).to(tl.float32)
    scale1 = 1.0 + tl.load(SCALE + b * s_scb + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(X + b * s_xb + rows[:, None] * s_xt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat, mean, rstd = _ln_rows(x, mask, D, EPS)
    h = xhat * scale1[None, :] + shift[None, :]
    out = (b * T + rows[:, None]) * D + cols[None, :]  # outputs are contiguous (B, T, D)
    tl.store(H + out, h.to(H.dtype.element_ty), mask=mask)
    _store_stats(STATS, b, B, T, rows, mean, rstd)


@triton.jit
def _modulate_bwd_tile(x, dh, mask, mean, rstd, scale1, D):
    """One [ROWS, BLOCK_D] tile of the modulate backward, given the forward's row mean and rstd
    -> (dx fp32, dh * xhat, dh) (the last two summed over rows into dscale, dshift)."""
    xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)  # the forward's, bitwise
    g32 = dh.to(tl.float32)
    g = g32 * scale1[None, :]
    c1 = tl.sum(g * xhat, axis=1) / D
    c2 = tl.sum(g, axis=1) / D
    dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    return dx, g32 * xhat, g32


@triton.jit(do_not_specialize=["T", "tiles"])
def _modulate_bwd_kernel(
    DH, X, STATS, SCALE, DX, PART,
    T, D, tiles, s_dhb, s_dht, s_xb, s_xt, s_scb,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    blk, nblk = tl.program_id(0), tl.num_programs(0)
    b, B = tl.program_id(1).to(tl.int64), tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    scale1 = 1.0 + tl.load(SCALE + b * s_scb + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_scale = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_shift = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    first = blk * tiles * ROWS + tl.arange(0, ROWS)
    # Triton's pipeliner issues the loads of the next STAGES - 1 tiles (through shared memory) while this
    # tile computes: deeper in flight than prefetching one tile by hand (kernels_sweep_2.txt)
    for i in tl.range(0, tiles, num_stages=STAGES):
        rows = first + i * ROWS
        mask = (rows < T)[:, None] & cmask[None, :]
        x = tl.load(X + b * s_xb + rows[:, None] * s_xt + cols[None, :], mask=mask, other=0.0)
        dh = tl.load(DH + b * s_dhb + rows[:, None] * s_dht + cols[None, :], mask=mask, other=0.0)
        mean = tl.load(STATS + b * T + rows, mask=rows < T, other=0.0)
        rstd = tl.load(STATS + (B + b) * T + rows, mask=rows < T, other=0.0)
        dx, ds, dsh = _modulate_bwd_tile(x, dh, mask, mean, rstd, scale1, D)
        tl.store(DX + (b * T + rows[:, None]) * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        acc_scale += ds
        acc_shift += dsh
    part = PART + (b * nblk + blk) * D + cols  # PART (2, B, nblk, D) fp32
    tl.store(part, tl.sum(acc_scale, axis=0), mask=cmask)
    tl.store(part + B * nblk * D, tl.sum(acc_shift, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["T"])
def _residual_modulate_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, XN, H, STATS,
    T, D, s_xb, s_xt, s_yb, s_yt, s_gb, s_shb, s_scb, EPS: tl.constexpr,
    HAS_GATE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b, B = tl.program_id(1).to(tl.int64), tl.num_programs(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < T)[:, None] & cmask[None, :]
    shift = tl.load(SHIFT + b * s_shb + cols, mask=cmask, other=0.0).to(tl.float32)
    scale1 = 1.0 + tl.load(SCALE + b * s_scb + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(X + b * s_xb + rows[:, None] * s_xt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * s_yb + rows[:, None] * s_yt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + b * s_gb + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * gate[None, :]
    out = (b * T + rows[:, None]) * D + cols[None, :]
    xn = (x + y).to(XN.dtype.element_ty)
    tl.store(XN + out, xn, mask=mask)
    # normalise the stored (rounded) x_new, as the reference does and as the backward recomputes
    xhat, mean, rstd = _ln_rows(xn.to(tl.float32), mask, D, EPS)
    h = xhat * scale1[None, :] + shift[None, :]
    tl.store(H + out, h.to(H.dtype.element_ty), mask=mask)
    _store_stats(STATS, b, B, T, rows, mean, rstd)


@triton.jit(do_not_specialize=["T", "tiles"])
def _residual_modulate_bwd_kernel(
    DXN, DH, XN, STATS, Y, GATE, SCALE, DX, DY, PART,
    T, D, tiles, s_dxnb, s_dxnt, s_dhb, s_dht, s_yb, s_yt, s_gb, s_scb,
    HAS_GATE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    blk, nblk = tl.program_id(0), tl.num_programs(0)
    b, B = tl.program_id(1).to(tl.int64), tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    scale1 = 1.0 + tl.load(SCALE + b * s_scb + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + b * s_gb + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_scale = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_shift = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    first = blk * tiles * ROWS + tl.arange(0, ROWS)
    for i in tl.range(0, tiles, num_stages=STAGES):  # pipelined like _modulate_bwd_kernel's loop
        rows = first + i * ROWS
        mask = (rows < T)[:, None] & cmask[None, :]
        own = (b * T + rows[:, None]) * D + cols[None, :]  # x_new, dx, dy: contiguous (B, T, D)
        xn = tl.load(XN + own, mask=mask, other=0.0)
        dh = tl.load(DH + b * s_dhb + rows[:, None] * s_dht + cols[None, :], mask=mask, other=0.0)
        dxn = tl.load(DXN + b * s_dxnb + rows[:, None] * s_dxnt + cols[None, :], mask=mask, other=0.0)
        if HAS_GATE:
            y = tl.load(Y + b * s_yb + rows[:, None] * s_yt + cols[None, :], mask=mask, other=0.0)
        mean = tl.load(STATS + b * T + rows, mask=rows < T, other=0.0)
        rstd = tl.load(STATS + (B + b) * T + rows, mask=rows < T, other=0.0)
        dx, ds, dsh = _modulate_bwd_tile(xn, dh, mask, mean, rstd, scale1, D)
        gx = dxn.to(tl.float32) + dx  # the residual stream's gradient passes straight through
        tl.store(DX + own, gx.to(DX.dtype.element_ty), mask=mask)
        acc_scale += ds
        acc_shift += dsh
        if HAS_GATE:
            tl.store(DY + own, (gx * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
            acc_gate += gx * y.to(tl.float32)
    part = PART + (b * nblk + blk) * D + cols  # PART (2 or 3, B, nblk, D) fp32: scale, shift[, gate]
    plane = B * nblk * D
    tl.store(part, tl.sum(acc_scale, axis=0), mask=cmask)
    tl.store(part + plane, tl.sum(acc_shift, axis=0), mask=cmask)
    if HAS_GATE:
        tl.store(part + 2 * plane, tl.sum(acc_gate, axis=0), mask=cmask)


# ---------------------------------------------------------------------------------------------
# launchers (plain functions on tensors; the custom ops below wrap them)


def _sum_dtype(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.dtype:
    """The dtype of x + gate * y (x + y without a gate): torch's promotion of the three."""
    return torch.promote_types(x.dtype, y.dtype if gate is None else torch.promote_types(y.dtype, gate.dtype))


def _new_stats(B: int, T: int, device: torch.device) -> torch.Tensor:
    return torch.empty((2, B, T), dtype=torch.float32, device=device)  # mean, rstd of each row


def _modulate_fwd(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    traced: bool = False,
    h_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> h (B, T, D) in h_dtype (default x's), stats (2, B, T) fp32 (the rows' mean and rstd, kept for the
    backward)."""
    checks.check_device(_modulate_fwd_kernel, x, shift, scale)
    x, shift, scale = checks.rows3d(x), checks.rows2d(shift), checks.rows2d(scale)
    B, T, D = x.shape
    h = torch.empty((B, T, D), dtype=h_dtype or x.dtype, device=x.device)
    stats = _new_stats(B, T, x.device)
    block_d, rows, warps = tiling.row_config(
        D, bwd=False, interpreted=checks.is_interpreted(_modulate_fwd_kernel)
    )
    doors.target(_modulate_fwd_kernel, traced)[(grid.cdiv(T, rows), B)](
        x, shift, scale, h, stats, T, D, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), LN_EPS,
        ROWS=rows, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return h, stats


def _modulate_bwd(
    dh: torch.Tensor,
    x: torch.Tensor,
    stats: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, scale, dh = checks.rows3d(x), checks.rows2d(scale), checks.rows3d(dh)
    B, T, D = x.shape
    block_d, rows, warps = tiling.row_config(
        D, bwd=True, interpreted=checks.is_interpreted(_modulate_bwd_kernel)
    )
    meta = dict(ROWS=rows, BLOCK_D=block_d, STAGES=tiling.BWD_STAGES, num_warps=warps)
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device)

    def args(part, tiles):
        return (
            dh, x, stats, scale, dx, part, T, D, tiles,
            dh.stride(0), dh.stride(1), x.stride(0), x.stride(1), scale.stride(0),
        )  # fmt: skip

    nblk, tiles = grid.wave_blocks(_modulate_bwd_kernel, args, meta, B, T, rows, x.device)
    part = torch.empty((2, B, nblk, D), dtype=torch.float32, device=x.device)
    doors.target(_modulate_bwd_kernel, traced)[(nblk, B)](*args(part, tiles), **meta)
    dscale, dshift = reduce.sum_blocks(part, (scale.dtype, shift.dtype), traced)  # 2 x (B, D)
    return dx, dshift, dscale


def _residual_modulate_fwd(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    traced: bool = False,
    h_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> x_new, h (B, T, D) (h in h_dtype, default x_new's), stats (2, B, T) fp32 (mean and rstd of x_new's
    rows)."""
    checks.check_device(_residual_modulate_fwd_kernel, x, y, gate, shift, scale)
    x, y, shift, scale = checks.rows3d(x), checks.rows3d(y), checks.rows2d(shift), checks.rows2d(scale)
    gate = None if gate is None else checks.rows2d(gate)
    B, T, D = x.shape
    dtype = _sum_dtype(x, y, gate)
    xn = torch.empty((B, T, D), dtype=dtype, device=x.device)
    h = torch.empty((B, T, D), dtype=h_dtype or dtype, device=x.device)
    stats = _new_stats(B, T, x.device)
    block_d, rows, warps = tiling.row_config(
        D, bwd=False, interpreted=checks.is_interpreted(_modulate_fwd_kernel)
    )
    g = shift if gate is None else gate  # any pointer: unused when HAS_GATE is False
    doors.target(_residual_modulate_fwd_kernel, traced)[(grid.cdiv(T, rows), B)](
        x, y, g, shift, scale, xn, h, stats, T, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        g.stride(0), shift.stride(0), scale.stride(0), LN_EPS,
        HAS_GATE=gate is not None, ROWS=rows, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return xn, h, stats


def _residual_modulate_bwd(
    dxn: torch.Tensor,
    dh: torch.Tensor,
    xn: torch.Tensor,
    stats: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    x_dtype: torch.dtype,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx, dy, dgate, dshift, dscale; without a gate (y is then None) dy and dgate are empty: dy = dx."""
    dxn, dh, scale = checks.rows3d(dxn), checks.rows3d(dh), checks.rows2d(scale)
    xn = xn.contiguous()  # our own forward output: already contiguous (the kernel indexes it so)
    has_gate = gate is not None
    y, gate = (checks.rows3d(y), checks.rows2d(gate)) if has_gate else (xn, None)  # xn: an unread stand-in
    B, T, D = xn.shape
    block_d, rows, warps = tiling.row_config(
        D, bwd=True, interpreted=checks.is_interpreted(_modulate_bwd_kernel)
    )
    meta = dict(HAS_GATE=has_gate, ROWS=rows, BLOCK_D=block_d, STAGES=tiling.BWD_STAGES, num_warps=warps)
    dx = torch.empty((B, T, D), dtype=x_dtype, device=xn.device)
    dy = torch.empty((B, T, D) if has_gate else (0,), dtype=y.dtype, device=xn.device)
    g = scale if gate is None else gate

    def args(part, tiles):
        return (
            dxn, dh, xn, stats, y, g, scale, dx, dy, part, T, D, tiles,
            dxn.stride(0), dxn.stride(1), dh.stride(0), dh.stride(1), y.stride(0), y.stride(1),
            g.stride(0), scale.stride(0),
        )  # fmt: skip

    nblk, tiles = grid.wave_blocks(_residual_modulate_bwd_kernel, args, meta, B, T, rows, xn.device)
    part = torch.empty((3 if has_gate else 2, B, nblk, D), dtype=torch.float32, device=xn.device)
    doors.target(_residual_modulate_bwd_kernel, traced)[(nblk, B)](*args(part, tiles), **meta)
    if has_gate:
        dscale, dshift, dgate = reduce.sum_blocks(
            part, (scale.dtype, shift.dtype, gate.dtype), traced
        )  # 3 x (B, D)
    else:
        dscale, dshift = reduce.sum_blocks(part, (scale.dtype, shift.dtype), traced)  # 2 x (B, D)
        dgate = part.new_empty((0,))
    return dx, dy, dgate, dshift, dscale


# ---------------------------------------------------------------------------------------------
# autograd: one formula, three doors. Eager calls go through an autograd.Function straight to the
# launchers (the least host time per call); under torch.compile the same formulas sit behind torch.library
# ops (doors.CompileDoors): triton ops on a GPU (Inductor launches the kernels itself), custom ops under the
# interpreter. Dynamo traces either as single nodes (no graph break); AOTAutograd differentiates them
# with the backward ops. The forward ops return the LayerNorm statistics as a last output, which the
# public functions drop and the backward reads (never differentiated: its gradient is ignored).


def _modulate_setup(ctx, inputs, output):
    x, shift, scale = inputs
    ctx.save_for_backward(x, output[-1], shift, scale)


def _modulate_backward(ctx, dh, _dstats, bwd):
    x, stats, shift, scale = ctx.saved_tensors
    return bwd(dh, x, stats, shift, scale)  # dx, dshift, dscale


class _Modulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale):
        h, stats = _modulate_fwd(x, shift, scale, h_dtype=branch_dtype(x))
        _modulate_setup(ctx, (x, shift, scale), (h, stats))
        return h

    @staticmethod
    def backward(ctx, dh):
        return _modulate_backward(ctx, dh, None, _modulate_bwd)


def _residual_modulate_setup(ctx, inputs, output):
    x, y, gate, shift, scale = inputs
    ctx.x_dtype, ctx.y_dtype, ctx.has_gate = x.dtype, y.dtype, gate is not None
    # without a gate the backward never reads y: do not keep it alive
    ctx.save_for_backward(output[0], output[-1], y if ctx.has_gate else None, gate, shift, scale)


def _residual_modulate_backward(ctx, dxn, dh, _dstats, bwd):
    xn, stats, y, gate, shift, scale = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = bwd(dxn, dh, xn, stats, y, gate, shift, scale, ctx.x_dtype)
    if not ctx.has_gate:
        return dx, dx.to(ctx.y_dtype), None, dshift, dscale  # x + y: both receive the same gradient
    return dx, dy, dgate, dshift, dscale


class _ResidualModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale):
        h_dtype = branch_dtype(x, _sum_dtype(x, y, gate))
        xn, h, stats = _residual_modulate_fwd(x, y, gate, shift, scale, h_dtype=h_dtype)
        _residual_modulate_setup(ctx, (x, y, gate, shift, scale), (xn, h, stats))
        return xn, h

    @staticmethod
    def backward(ctx, dxn, dh):
        return _residual_modulate_backward(ctx, dxn, dh, None, _residual_modulate_bwd)


def _stats_fake(x):
    return x.new_empty((2, x.shape[0], x.shape[1]), dtype=torch.float32)


def _modulate_fake(x, shift, scale):
    return x.new_empty(x.shape), _stats_fake(x)


def _modulate_bwd_fake(dh, x, stats, shift, scale):
    return x.new_empty(x.shape), shift.new_empty(shift.shape), scale.new_empty(scale.shape)


_MODULATE = doors.CompileDoors(
    "adaln_modulate",
    _modulate_fwd_kernel,
    _modulate_fwd,
    _modulate_bwd,
    "(Tensor x, Tensor shift, Tensor scale) -> (Tensor, Tensor)",
    "(Tensor dh, Tensor x, Tensor stats, Tensor shift, Tensor scale) -> (Tensor, Tensor, Tensor)",
    _modulate_fake,
    _modulate_bwd_fake,
    _modulate_setup,
    _modulate_backward,
)


def _residual_modulate_fake(x, y, gate, shift, scale):
    dtype = _sum_dtype(x, y, gate)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype), _stats_fake(x)


def _residual_modulate_bwd_fake(dxn, dh, xn, stats, y, gate, shift, scale, x_dtype):
    has_gate = gate is not None
    return (
        xn.new_empty(xn.shape, dtype=x_dtype),
        xn.new_empty(xn.shape if has_gate else (0,), dtype=y.dtype if has_gate else xn.dtype),
        xn.new_empty(gate.shape if has_gate else (0,), dtype=gate.dtype if has_gate else torch.float32),
        shift.new_empty(shift.shape),
        scale.new_empty(scale.shape),
    )


_RESIDUAL_MODULATE = doors.CompileDoors(
    "residual_adaln_modulate",
    _residual_modulate_fwd_kernel,
    _residual_modulate_fwd,
    _residual_modulate_bwd,
    "(Tensor x, Tensor y, Tensor? gate, Tensor shift, Tensor scale) -> (Tensor, Tensor, Tensor)",
    "(Tensor dxn, Tensor dh, Tensor xn, Tensor stats, Tensor? y, Tensor? gate, Tensor shift, Tensor scale, "
    "ScalarType x_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _residual_modulate_fake,
    _residual_modulate_bwd_fake,
    _residual_modulate_setup,
    _residual_modulate_backward,
)


# ---------------------------------------------------------------------------------------------
# public ops (same signatures and semantics as the *_ref twins)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = LayerNorm(x) * (1 + scale[b]) + shift[b], in x's dtype; x (B, T, D), shift/scale (B, D)."""
    checks.check_rows("adaln_modulate", x)
    checks.check_vec("adaln_modulate", "shift", shift, x)
    checks.check_vec("adaln_modulate", "scale", scale, x)
    if torch.compiler.is_compiling():
        return _MODULATE(x, shift, scale)[0]  # (B, T, D); [1] is the statistics
    return _Modulate.apply(x, shift, scale)  # (B, T, D)


def residual_adaln_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block boundary in one pass: x' = x + gate[b] * y (gate None: x + y), h = adaln_modulate(x')."""
    checks.check_rows("residual_adaln_modulate", x)
    if y.shape != x.shape:
        raise ValueError(
            f"residual_adaln_modulate: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}"
        )
    for key, p in (("gate", gate), ("shift", shift), ("scale", scale)):
        if p is not None:
            checks.check_vec("residual_adaln_modulate", key, p, x)
    if torch.compiler.is_compiling():
        xn, h, _ = _RESIDUAL_MODULATE(x, y, gate, shift, scale)  # 2 x (B, T, D), the statistics
        return xn, h
    return _ResidualModulate.apply(x, y, gate, shift, scale)  # 2 x (B, T, D)


def gated_residual_layer_norm(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_residual_layer_norm_ref`` in one pass: an affine LayerNorm is adaLN modulation with the same
    shift (``bias``) and scale (``weight - 1``) for every sample, so x' = x + gate[b] * y and its LayerNorm come
    from ``residual_adaln_modulate`` (the parameters' gradients: the per-sample ones summed over the batch by
    ``expand``'s backward). h is in ``branch_dtype``, as the reference's."""
    B, D = x.shape[0], x.shape[-1]
    if weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(
            f"gated_residual_layer_norm: weight and bias must have shape ({D},), got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    return residual_adaln_modulate(x, y, gate, bias.expand(B, D), (weight - 1).expand(B, D))
