"""torch.compile traces the Triton ops as single nodes: no graph break, and the same loss and gradients.

On CPU the compiled graph runs with the ``aot_eager`` backend (AOTAutograd traces forward and backward
through the ops' fake impls and autograd formulas; the kernels run in the interpreter, through the custom-op
door); on a GPU with Inductor, through both doors (``doors.COMPILE_DOOR``: triton ops, which Inductor
launches itself, and custom ops).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from kernel_cases import DEVICE, check, fresh_seed

from nanodit.kernels import get_ops

DOORS = [
    "custom_op",
    pytest.param("triton_op", marks=pytest.mark.gpu),  # wrap_triton cannot trace interpreted kernels
]


@contextlib.contextmanager
def door(name: str):
    """Compile through one door (read at trace time, so dynamo's caches are reset around it)."""
    from nanodit.kernels import doors

    old = doors.COMPILE_DOOR
    doors.COMPILE_DOOR = name
    torch._dynamo.reset()
    try:
        yield
    finally:
        doors.COMPILE_DOOR = old
        torch._dynamo.reset()


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


@pytest.mark.parametrize("name", DOORS)
def test_no_graph_break(name):
    """Dynamo captures the whole block, all Triton ops included, in one graph."""
    fast = get_ops("triton")
    with door(name):
        explained = torch._dynamo.explain(lambda *a: _block(fast, *a))(*_inputs())
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if "nanodit" in str(n.target)}
    assert len(ops) == 4 and all(("_tt." in o) == (name == "triton_op") for o in ops), ops


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
    lowp = [None] * 4
    if dtype != torch.float32:
        # torch's own bf16, eager and under the same compiler. Each rounds in its own places: eager after every
        # op; Inductor keeps the ops it fuses in fp32 registers, while the Triton ops round at their outputs,
        # as eager does. The fast graph mixes both, so its baseline is whichever torch bf16 run is further from
        # ref64 (seen on an H200 against the compiled ref alone: dx 1.12e-4 vs bound 0.96e-4).
        ref_compiled = torch.compile(lambda *a: _block(ref, *a), backend=backend, fullgraph=True)
        eager = _loss_and_grads(lambda *a: _block(ref, *a), inputs)
        compiled_ref = _loss_and_grads(ref_compiled, inputs)
        err = lambda a, w: (a.double() - w.double()).abs().max().item()
        lowp = [max(e, c, key=lambda a: err(a, w)) for e, c, w in zip(eager, compiled_ref, want)]
    for name, g, w, lo in zip(("loss", "dx", "dy", "dmod"), got, want, lowp):
        # the loss: fp32 means over B*T*D bf16 values (seen on an H200: 2.7e-4 against a lowp error of 0.8e-4,
        # at |loss| 5.6, i.e. 5e-5 relative, far below one bf16 ulp of the loss)
        mean_of = inputs[0].numel() if name == "loss" else 0
        check(f"compiled[{backend}] {name}", g, w, lo, seed, mean_of=mean_of, input_dtype=dtype)


@pytest.mark.parametrize("name", DOORS)
def test_compiled_matches_eager_ref(name):
    """fullgraph torch.compile (aot_eager on CPU, inductor on GPU) of the Triton block = eager ref."""
    with door(name):
        _compiled_matches_eager_ref("inductor" if DEVICE.type == "cuda" else "aot_eager", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("name", DOORS)
def test_compiled_bf16_inductor_matches_ref(name):
    """The same under Inductor in bf16, by the low-precision rule against torch.compile(ref) in bf16."""
    with door(name):
        _compiled_matches_eager_ref("inductor", torch.bfloat16)


@pytest.mark.gpu
def test_triton_op_door_equals_custom_op_door():
    """Inductor launching the kernels itself (triton ops) and calling the launchers (custom ops) run the same
    kernels on the same values: loss and gradients agree to fp32 rounding (Inductor may fuse the plain ops
    around the kernels differently in the two graphs, so bitwise equality is not promised)."""
    fast = get_ops("triton")
    inputs = _inputs(B=3, T=257, D=384, dtype=torch.float32)
    results = []
    for name in ("custom_op", "triton_op"):
        with door(name):
            compiled = torch.compile(lambda *a: _block(fast, *a), fullgraph=True)
            results.append(_loss_and_grads(compiled, inputs))
    for what, a, b in zip(("loss", "dx", "dy", "dmod"), *results):
        err, scale = (a - b).abs().max().item(), a.abs().max().item()
        assert err <= 1e-6 * scale + 1e-7, f"{what}: the two doors differ by {err:.3e} (max {scale:.3e})"
