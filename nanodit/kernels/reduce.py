"""The second stage of the (B, D) reductions over T: per-block fp32 partials summed in a fixed order.

One small kernel adds every block of up to three partial planes and casts each to its output's dtype in one
launch (see ``grid`` for why the sums are two-stage)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanodit.kernels.doors import target
from nanodit.kernels.grid import cdiv, partial_tile


@triton.jit(do_not_specialize=["BD", "plane", "nblk"])
def _sum_blocks_kernel(
    PART, OUT0, OUT1, OUT2, BD, plane, D, nblk, K: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr
):
    """OUTk[b, d] = sum_j PART[k, b, j, d]; PART (K, B, nblk, D) fp32. NB blocks at a time are loaded as
    one [NB, BLOCK] tile and tree-summed: the same order on every run."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat b * D + d
    m = offs < BD
    base = (offs // D).to(tl.int64) * nblk * D + offs % D
    # plane = BD * nblk comes from the host (an i64 argument when it needs one): a scalar argument may reach
    # this code as a Python int (Inductor's mutation analysis of the kernel), which has no .to()
    js = tl.arange(0, NB)
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, nblk, NB):
        ptr = PART + base[None, :] + (j0 + js)[:, None] * D
        mm = (j0 + js < nblk)[:, None] & m[None, :]
        acc0 += tl.sum(tl.load(ptr, mask=mm, other=0.0), axis=0)
        if K > 1:
            acc1 += tl.sum(tl.load(ptr + plane, mask=mm, other=0.0), axis=0)
        if K > 2:
            acc2 += tl.sum(tl.load(ptr + 2 * plane, mask=mm, other=0.0), axis=0)
    tl.store(OUT0 + offs, acc0.to(OUT0.dtype.element_ty), mask=m)
    if K > 1:
        tl.store(OUT1 + offs, acc1.to(OUT1.dtype.element_ty), mask=m)
    if K > 2:
        tl.store(OUT2 + offs, acc2.to(OUT2.dtype.element_ty), mask=m)


def sum_blocks(
    part: torch.Tensor, dtypes: tuple[torch.dtype, ...], traced: bool = False
) -> tuple[torch.Tensor, ...]:
    """Second stage: (K, B, nblk, D) fp32 partials -> K separate (B, D) tensors in ``dtypes``, fixed order."""
    K, B, nblk, D = part.shape
    outs = tuple(torch.empty((B, D), dtype=dt, device=part.device) for dt in dtypes)
    # unused pointers when K < 3: the (read-only) partials, never an output -- two arguments aliasing one
    # output would be two separate results after functionalization (Inductor's view of the kernel)
    o = outs + (part,) * (3 - K)
    block, nb = 128, partial_tile(nblk)
    target(_sum_blocks_kernel, traced)[(cdiv(B * D, block),)](
        part, o[0], o[1], o[2], B * D, B * D * nblk, D, nblk, K=K, NB=nb, BLOCK=block, num_warps=4
    )
    return outs
