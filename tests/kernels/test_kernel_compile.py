"""torch.compile traces the Triton ops as single nodes: no graph break, and the same loss and gradients.

On CPU the compiled graph runs with the ``aot_eager`` backend (AOTAutograd traces forward and backward
through the ops' fake impls and autograd formulas; the kernels run in the interpreter); on a GPU with
Inductor.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, check, fresh_seed

from nanodit.kernels import get_ops


def _block(ops, x, y, mod, x0, eps, t):
    """All four ops the way a DiT block and the loss use them, with plain torch ops in between."""
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=1)  # 6 x (B, D)
    h = ops.modulate(x, shift_a, scale_a)  # (B, T, D)
    x = ops.gated_residual(x, gate_a, torch.tanh(h))  # (B, T, D)
    x, h = ops.residual_modulate(x, y, None, shift_m, scale_m)  # 2 x (B, T, D)
    x, h = ops.residual_modulate(x, 0.5 * h, gate_m, shift_a, scale_m)  # 2 x (B, T, D)
    per_sample, bin_sum, _ = ops.flow_loss(h, x0, eps, t)  # (B,), (nbins,)
    return per_sample.mean() + x.square().mean() + 0 * bin_sum.sum()


def _inputs(B=2, T=13, D=96, dtype=torch.float32):
    x, y, x0, eps = (torch.randn(B, T, D, device=DEVICE, dtype=dtype) for _ in range(4))
    mod = 0.5 * torch.randn(B, 6 * D, device=DEVICE, dtype=dtype)
    return x, y, mod, x0, eps, torch.rand(B, device=DEVICE)


def _loss_and_grads(fn, inputs):
    x, y, mod = (a.clone().requires_grad_(True) for a in inputs[:3])
    loss = fn(x, y, mod, *inputs[3:])
    return [loss.detach(), *torch.autograd.grad(loss, [x, y, mod])]


def test_no_graph_break():
    """Dynamo captures the whole block, all Triton ops included, in one graph."""
    fast = get_ops("triton")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda *a: _block(fast, *a))(*_inputs())
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def _compiled_matches_eager_ref(backend: str, dtype: torch.dtype):
    seed = fresh_seed()
    fast, ref = get_ops("triton"), get_ops("ref")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _block(fast, *a), backend=backend, fullgraph=True)
    inputs = _inputs(dtype=dtype)
    got = _loss_and_grads(compiled, inputs)
    want = _loss_and_grads(
        lambda *a: _block(ref, *a), [a.double() if a.is_floating_point() else a for a in inputs]
    )
    lowp = _loss_and_grads(lambda *a: _block(ref, *a), inputs) if dtype != torch.float32 else [None] * 4
    for name, g, w, lo in zip(("loss", "dx", "dy", "dmod"), got, want, lowp):
        check(f"compiled[{backend}] {name}", g, w, lo, seed)


def test_compiled_matches_eager_ref():
    """fullgraph torch.compile (aot_eager on CPU, inductor on GPU) of the Triton block = eager ref."""
    _compiled_matches_eager_ref("inductor" if DEVICE.type == "cuda" else "aot_eager", torch.float32)


@pytest.mark.gpu
def test_compiled_bf16_inductor_matches_ref():
    """The same under Inductor in bf16, by the low-precision rule."""
    _compiled_matches_eager_ref("inductor", torch.bfloat16)
