"""A linear layer whose backward takes the bias gradient as a matrix-vector product.

``linear(x, weight, bias)`` is ``F.linear`` (the ref ops' ``linear``) forward and backward, but autograd's bias gradient
of a linear layer, ``grad.sum(0)`` over the B*T rows, runs as PyTorch's generic reduction, which on an H200 read
the nano step's (16384, N) bf16 gradients at 0.6-1.6 TB/s: 1.76 ms of the 16.9 ms of GPU work in a step (107
launches; bench/results/h200-2026-12-02/). Here the input and weight gradients are the same two matmuls autograd
runs, and in 16-bit dtypes the bias gradient is ``ones(1, M) @ grad``: cuBLAS reads the gradient at 1.6-3.4 TB/s
(a Triton two-stage column sum measured 1.0-3.2 TB/s in the same run), accumulating in fp32 and rounding once
to the gradient's dtype, as the reduction does. In fp32 the reduction stays (a matmul could round its inputs
to TF32).

Under autocast with fp32 parameters the weight and bias gradients come out of cuBLAS in fp32 (``torch.mm`` with
``out_dtype``): autograd's linear rounds them to bf16 and then casts them to the parameters' fp32, two kernels
per layer and one bf16 rounding more. The column-sum ones vectors are made once per row count.

Under autocast the inputs are cast as autocast casts a linear layer's (to the autocast dtype), the matmuls run in
that dtype, and each gradient is returned in its input's dtype (an input that is already in the autocast dtype,
such as the fused ops' h, is not copied). Inside a torch.compile trace the op is
``F.linear`` itself (Inductor writes its own reductions).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_MM_TO_FP32 = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(a, b, out_dtype=torch.float32) on CUDA
_ONES: dict[tuple, torch.Tensor] = {}  # (M, dtype, device) -> ones (1, M): the column-sum vectors, kept


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b returned in ``dtype``. 16-bit CUDA inputs with an fp32 result: cuBLAS writes its fp32 accumulator
    (no 16-bit rounding, no cast kernel); otherwise the product in the inputs' dtype, cast."""
    if dtype == torch.float32 and _MM_TO_FP32 and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(dtype)


def _ones(m: int, like: torch.Tensor) -> torch.Tensor:
    """ones (1, m) in like's dtype and device, made once per size outside CUDA-graph capture (a tensor first
    made during a capture holds nothing until the graph replays: it is made afresh there, inside the graph)."""
    key = (m, like.dtype, like.device)
    ones = _ONES.get(key)
    if ones is None:
        ones = torch.ones((1, m), dtype=like.dtype, device=like.device)
        if not torch.cuda.is_current_stream_capturing():
            _ONES[key] = ones
    return ones


def bias_grad(g: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(M, N) -> (N,): the column sums of g (fp32 accumulation) in ``dtype`` (default g's)."""
    dtype = dtype or g.dtype
    if g.dtype in (torch.bfloat16, torch.float16) and g.is_cuda:
        return _mm(_ones(g.shape[0], g), g, dtype).view(g.shape[1])
    return g.sum(0).to(dtype)


@contextlib.contextmanager
def autocast_weights(layers: Sequence[nn.Linear]) -> Iterator[None]:
    """Under autocast, the autocast copies of these layers' weights and biases, all made by one
    ``torch._foreach_copy_`` (a few multi-tensor kernels) where autocast casts each weight and bias on its own (two
    kernels a layer, 174 in a nano forward); ``linear`` calls on this thread inside the block use them.

    Model code enters it at the start of a forward (the copies are of the weights as they are then; a forward does
    not change them). The copies are fresh tensors each time, as autocast's are: a backward reads the copies its
    own forward saved, however many forwards ran in between. Outside autocast, inside torch.compile, for sharded or
    16-bit parameters it does nothing."""
    src = [t for m in layers for t in (m.weight, m.bias)]
    device = src[0].device.type if src else "cpu"
    if not src or torch.compiler.is_compiling() or not torch.is_autocast_enabled(device):
        yield
        return
    dtype = torch.get_autocast_dtype(device)
    if any(type(t.data) is not torch.Tensor or t.dtype == dtype for t in src):  # sharded (DTensor) or 16-bit
        yield
        return
    dst = [torch.empty_like(t, dtype=dtype) for t in src]
    with torch.no_grad():
        torch._foreach_copy_(dst, src)
    prev = getattr(_ACTIVE, "casts", None)
    _ACTIVE.casts = {id(t): d for t, d in zip(src, dst)}
    try:
        yield
    finally:
        _ACTIVE.casts = prev


_ACTIVE = threading.local()  # .casts: id(parameter) -> its autocast copy, inside autocast_weights


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype: its copy made by the enclosing ``autocast_weights`` if it has one, else ``t.to(dtype)``."""
    casts = getattr(_ACTIVE, "casts", None)
    made = casts.get(id(t)) if casts else None
    return made if made is not None and made.dtype == dtype else t.to(dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # what autocast does to a linear layer's inputs
            dt = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dt), _cast(weight, dt), _cast(bias, dt)
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
            dw = _mm(g2.t(), x.reshape(-1, x.shape[-1]), w_dtype)  # (N, K)
        if ctx.needs_input_grad[2]:
            db = bias_grad(g2, b_dtype)  # (N,)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with a bias and outside torch.compile, through ``_Linear``."""
    if bias is None or torch.compiler.is_compiling() or x.shape[-1] != weight.shape[-1]:
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)
