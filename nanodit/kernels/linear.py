"""A linear layer whose backward takes the bias gradient as a matrix-vector product.

``linear(x, weight, bias)`` is ``F.linear`` (the ref ops' ``linear``) forward and backward, but autograd's bias gradient
of a linear layer, ``grad.sum(0)`` over the B*T rows, runs as PyTorch's generic reduction, which on an H200 read
the nano step's (16384, N) bf16 gradients at 0.6-1.6 TB/s: 1.76 ms of the 16.9 ms of GPU work in a step (107
launches; bench/results/h200-2026-12-02/). Here the input and weight gradients are the same two matmuls autograd
runs, and in 16-bit dtypes the bias gradient is ``ones(1, M) @ grad``: cuBLAS reads the gradient at 1.6-3.4 TB/s
(a Triton two-stage column sum measured 1.0-3.2 TB/s in the same run), accumulating in fp32 and rounding once
to the gradient's dtype, as the reduction does. In fp32 the reduction stays (a matmul could round its inputs
to TF32).

Under autocast the inputs are cast as autocast casts a linear layer's (to the autocast dtype), the matmuls run in
that dtype, and each gradient is returned in its input's dtype. Inside a torch.compile trace the op is
``F.linear`` itself (Inductor writes its own reductions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bias_grad(g: torch.Tensor) -> torch.Tensor:
    """(M, N) -> (N,): the column sums of g in g's dtype (fp32 accumulation)."""
    if g.dtype in (torch.bfloat16, torch.float16) and g.is_cuda:
        return (torch.ones((1, g.shape[0]), dtype=g.dtype, device=g.device) @ g).view(g.shape[1])
    return g.sum(0)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # what autocast does to a linear layer's inputs
            dt = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
        with torch.autocast(device, enabled=False):
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g2 = grad.reshape(-1, grad.shape[-1]).to(x.dtype)  # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ weight).view(x.shape).to(x_dtype)  # (..., K)
        if ctx.needs_input_grad[1]:
            dw = (g2.t() @ x.reshape(-1, x.shape[-1])).to(w_dtype)  # (N, K)
        if ctx.needs_input_grad[2]:
            db = bias_grad(g2).to(b_dtype)  # (N,)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with a bias and outside torch.compile, through ``_Linear``."""
    if bias is None or torch.compiler.is_compiling() or x.shape[-1] != weight.shape[-1]:
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)
