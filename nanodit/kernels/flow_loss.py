"""The rectified-flow loss in one pass, as a Triton kernel beside its PyTorch twin.

    per_sample, bin_sum, bin_count = flow_loss(v, x0, eps, t, weight=None, nbins=10)

v, x0, eps (B, ...) any float dtypes; t (B,) in [0, 1]; weight (B,) or None. per_sample (B,) fp32 is
mean((v - (eps - x0))^2) per sample, times weight; bin_sum/bin_count (nbins,) fp32 are the unweighted
per-sample losses summed per t-bin, for logging (no gradient). Only v receives a gradient; x0, eps, t
and weight are constants.

One launch computes per-block partial sums of the squared error and writes dL/dv = 2 (v - (eps - x0)) / N
* weight[b] (N elements per sample) in v's dtype; a second, one-program launch adds the partials in a
fixed order, applies the weight and fills the t-bins. The backward is one scaled copy of the saved
gradient: dv = saved * grad_output[b]. Under ``torch.no_grad``, or when v needs no gradient, the dL/dv
write is skipped. Eager calls run an ``autograd.Function``; under torch.compile a library op (a triton op on
a GPU, a custom op under the interpreter; see ``doors.CompileDoors``).

Bytes model (e = bytes per element, M = B*N):
| direction | traffic |
|---|---|
| forward | read v, x0, eps, write dL/dv: 4Me (3Me without grad) |
| backward | read dL/dv, write dv: 2Me |
The eager reference reads v, x0, eps and writes err, err^2 (fp32 casts on top), then its backward
recomputes 2*err*grad in several passes. Per-sample sums are two-stage (per-block fp32 partials,
then a fixed-order sum): deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanodit.kernels import checks, doors, grid
from nanodit.kernels.ref import flow_loss_ref

__all__ = ["flow_loss", "flow_loss_ref"]

BLOCK = 2048  # elements per tile: 16 per thread at 4 warps (two 16-byte bf16 loads per tensor)
WARPS = 4
STAGES = 3  # tl.range(num_stages=...) of the forward loop: the next tiles' loads fly while one computes


@triton.jit(do_not_specialize=["tiles"])
def _flow_loss_fwd_kernel(
    V, X0, EPS, W, G, PART,
    N, tiles, s_vb, s_xb, s_eb, s_wb,
    HAS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    blk, nblk = tl.program_id(0), tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    coef = 2.0 / N  # from the int N: a float argument would reach Inductor-launched kernels as fp64
    if HAS_WEIGHT:
        coef = coef * tl.load(W + b * s_wb).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(0, tiles, num_stages=STAGES):
        offs = (blk * tiles + i) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        v = tl.load(V + b * s_vb + offs, mask=m, other=0.0).to(tl.float32)
        x0 = tl.load(X0 + b * s_xb + offs, mask=m, other=0.0).to(tl.float32)
        eps = tl.load(EPS + b * s_eb + offs, mask=m, other=0.0).to(tl.float32)
        err = v - (eps - x0)
        acc += err * err
        if WRITE_GRAD:
            tl.store(G + b * N + offs, (err * coef).to(G.dtype.element_ty), mask=m)
    tl.store(PART + b * nblk + blk, tl.sum(acc, axis=0))  # PART (B, nblk)


@triton.jit(do_not_specialize=["B", "nblk"])
def _flow_finish_kernel(
    PART, W, TT, PS, BSUM, BCNT,
    B, nblk, nbins, s_wb, s_tb, N,
    HAS_WEIGHT: tl.constexpr, BLOCK_B: tl.constexpr, NB: tl.constexpr, NBJ: tl.constexpr,
):  # fmt: skip
    """One program: per-sample sums of the partials (NBJ blocks a load, tree-summed, chunks in order), the
    weight, and the t-bin sums (one-hot rows summed in sample order: deterministic, unlike index_add's
    atomics). Loading [BLOCK_B, NBJ] partials at once keeps this launch to a few memory round trips."""
    bins = tl.arange(0, NB)
    acc_sum = tl.zeros([BLOCK_B, NB], dtype=tl.float32)
    acc_cnt = tl.zeros([BLOCK_B, NB], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        bs = start + tl.arange(0, BLOCK_B)
        m = bs < B
        raw = tl.zeros([BLOCK_B], dtype=tl.float32)
        for j0 in range(0, nblk, NBJ):
            js = j0 + tl.arange(0, NBJ)
            ptr = PART + bs.to(tl.int64)[:, None] * nblk + js[None, :]
            raw += tl.sum(tl.load(ptr, mask=m[:, None] & (js < nblk)[None, :], other=0.0), axis=1)
        raw = raw / N  # unweighted per-sample mean
        ps = raw
        if HAS_WEIGHT:
            ps = raw * tl.load(W + bs * s_wb, mask=m, other=0.0).to(tl.float32)
        tl.store(PS + bs, ps, mask=m)
        t = tl.load(TT + bs * s_tb, mask=m, other=0.0).to(tl.float32)
        idx = tl.minimum(tl.maximum((t * nbins).to(tl.int32), 0), nbins - 1)  # trunc, as .long() does
        hit = (idx[:, None] == bins[None, :]) & m[:, None]
        acc_sum += tl.where(hit, raw[:, None], 0.0)
        acc_cnt += tl.where(hit, 1.0, 0.0)
    tl.store(BSUM + bins, tl.sum(acc_sum, axis=0), mask=bins < nbins)
    tl.store(BCNT + bins, tl.sum(acc_cnt, axis=0), mask=bins < nbins)


@triton.jit
def _scale_rows_kernel(G, GO, DV, N, s_go, BLOCK: tl.constexpr):
    """dv[b, :] = g[b, :] * go[b]; g, dv contiguous (B, N)."""
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    s = tl.load(GO + b * s_go).to(tl.float32)
    g = tl.load(G + b * N + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(DV + b * N + offs, (g * s).to(DV.dtype.element_ty), mask=m)


FINISH_TILE = 4096  # elements of the finishing kernel's widest [BLOCK_B, NBJ | NB] tile: 32 per thread


def _finish_block_b(B: int, nblk: int, nbins: int) -> int:
    """Samples per step of the finishing kernel: all of them at once where the tile allows. It is one program
    and latency-bound (Nsight Compute, H200, B=256: 4.6 us of the op's ~40, at BLOCK_B=128 = two dependent
    rounds of loads), so fewer rounds are what shortens it."""
    if isinstance(B, torch.SymInt):
        return 128
    widest = max(grid.partial_tile(nblk), grid.next_pow2(nbins))
    return max(16, min(grid.next_pow2(B), FINISH_TILE // widest))


def _rows(a: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, N) with unit inner stride (a view when the layout allows)."""
    a = a.reshape(a.shape[0], -1)
    return a if a.stride(1) == 1 else a.contiguous()


def _flow_loss_fwd(
    v: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor | None,
    nbins: int,
    need_grad: bool,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> per_sample (B,), bin_sum (nbins,), bin_count (nbins,), dL/dv shaped like v (empty without grad)."""
    checks.check_device(_flow_loss_fwd_kernel, v, x0, eps, t, weight)
    B = v.shape[0]
    v2, x2, e2 = _rows(v), _rows(x0), _rows(eps)
    N = v2.shape[1]
    grad = torch.empty(v.shape if need_grad else (0,), dtype=v.dtype, device=v.device)
    w = t if weight is None else weight  # any read-only pointer: unused without a weight
    meta = dict(
        HAS_WEIGHT=weight is not None, WRITE_GRAD=need_grad, BLOCK=BLOCK, STAGES=STAGES, num_warps=WARPS
    )

    def args(part, tiles):
        return v2, x2, e2, w, grad, part, N, tiles, v2.stride(0), x2.stride(0), e2.stride(0), w.stride(0)

    # one full wave of what fits on the SMs, as the row kernels' backward (grid.t_blocks)
    nblk, tiles = grid.wave_blocks(_flow_loss_fwd_kernel, args, meta, B, N, BLOCK, v.device)
    part = torch.empty((B, nblk), dtype=torch.float32, device=v.device)
    doors.target(_flow_loss_fwd_kernel, traced)[(nblk, B)](*args(part, tiles), **meta)
    per_sample = torch.empty((B,), dtype=torch.float32, device=v.device)
    bin_sum, bin_count = (torch.empty((nbins,), dtype=torch.float32, device=v.device) for _ in range(2))
    doors.target(_flow_finish_kernel, traced)[(1,)](
        part, w, t, per_sample, bin_sum, bin_count, B, nblk, nbins, w.stride(0), t.stride(0), N,
        HAS_WEIGHT=weight is not None, BLOCK_B=_finish_block_b(B, nblk, nbins), NB=grid.next_pow2(nbins),
        NBJ=grid.partial_tile(nblk), num_warps=4,
    )  # fmt: skip
    return per_sample, bin_sum, bin_count, grad


def _flow_loss_bwd(grad: torch.Tensor, go: torch.Tensor, traced: bool = False) -> torch.Tensor:
    B = grad.shape[0]
    N = grad.numel() // B
    dv = torch.empty_like(grad, memory_format=torch.contiguous_format)
    doors.target(_scale_rows_kernel, traced)[(grid.cdiv(N, BLOCK), B)](
        grad, go, dv, N, go.stride(0), BLOCK=BLOCK, num_warps=WARPS
    )
    return dv


def _flow_loss_setup(ctx, inputs, output):
    ctx.need_grad = inputs[-1]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[3])


def _flow_loss_backward(ctx, go, bwd):
    if not ctx.need_grad:
        raise RuntimeError("flow_loss: backward through a loss computed with need_grad=False")
    (grad,) = ctx.saved_tensors
    return bwd(grad, go), None, None, None, None, None, None  # only v gets a gradient


class _FlowLoss(torch.autograd.Function):
    """Eager door: straight to the launchers. Under torch.compile the library ops below are used."""

    @staticmethod
    def forward(ctx, v, x0, eps, t, weight, nbins, need_grad):
        ctx.set_materialize_grads(False)  # else autograd fills a v-sized zero cotangent for dL/dv
        out = _flow_loss_fwd(v, x0, eps, t, weight, nbins, need_grad)
        _flow_loss_setup(ctx, (v, x0, eps, t, weight, nbins, need_grad), out)
        return out

    @staticmethod
    def backward(ctx, go, _bin_sum, _bin_count, _grad):
        if go is None:  # per_sample unused downstream
            return (None,) * 7
        return _flow_loss_backward(ctx, go, _flow_loss_bwd)


def _flow_loss_fake(v, x0, eps, t, weight, nbins, need_grad):
    vec = lambda n: v.new_empty((n,), dtype=torch.float32)
    return vec(v.shape[0]), vec(nbins), vec(nbins), v.new_empty(v.shape if need_grad else (0,))


def _flow_loss_bwd_fake(grad, go):
    return grad.new_empty(grad.shape)


_FLOW_LOSS = doors.CompileDoors(
    "flow_loss",
    _flow_loss_fwd_kernel,
    _flow_loss_fwd,
    _flow_loss_bwd,
    "(Tensor v, Tensor x0, Tensor eps, Tensor t, Tensor? weight, int nbins, bool need_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "(Tensor grad, Tensor go) -> Tensor",
    _flow_loss_fake,
    _flow_loss_bwd_fake,
    _flow_loss_setup,
    lambda ctx, go, _bs, _bc, _g, bwd: _flow_loss_backward(ctx, go, bwd),
)


def flow_loss(
    v: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor | None = None,
    nbins: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample flow-matching MSE to eps - x0 (x weight), and per-t-bin sums; see the module docstring."""
    B = v.shape[0]
    if v.dim() < 2 or x0.shape != v.shape or eps.shape != v.shape:
        raise ValueError(
            f"flow_loss: v, x0, eps must share one shape (B, ...), got {tuple(v.shape)}, "
            f"{tuple(x0.shape)}, {tuple(eps.shape)}"
        )
    if t.shape != (B,) or (weight is not None and weight.shape != (B,)):
        wshape = None if weight is None else tuple(weight.shape)
        raise ValueError(
            f"flow_loss: t and weight must have shape (B,) = ({B},), got {tuple(t.shape)}, {wshape}"
        )
    if nbins < 1:
        raise ValueError(f"flow_loss: nbins must be >= 1, got {nbins}")
    need_grad = torch.is_grad_enabled() and v.requires_grad
    args = (
        v,
        x0.detach(),
        eps.detach(),
        t.detach(),
        None if weight is None else weight.detach(),
        nbins,
        need_grad,
    )
    op = _FLOW_LOSS if torch.compiler.is_compiling() else _FlowLoss.apply
    per_sample, bin_sum, bin_count, _ = op(*args)  # (B,), (nbins,), (nbins,), dL/dv
    return per_sample, bin_sum, bin_count
