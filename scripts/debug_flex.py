"""Where does FlexAttention fault in bench/bench_attention.py on the GPU? Runs the benchmark's own inputs
through the stages the benchmark uses (fwd+bwd eager, forward under no_grad, CUDA-graph capture), each in
order with CUDA_LAUNCH_BLOCKING=1 semantics expected from the caller, printing which stage fails.

    CUDA_LAUNCH_BLOCKING=1 PYTHONPATH=. python scripts/debug_flex.py [cross|self]
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_attention as BA  # noqa: E402


def stage(name, fn):
    try:
        out = fn()
        torch.cuda.synchronize()
        print(f"{name}: ok", flush=True)
        return out
    except Exception:
        print(f"{name}: FAILED", flush=True)
        traceback.print_exc()
        sys.exit(1)


case = sys.argv[1] if len(sys.argv) > 1 else "cross"
variant = sys.argv[2] if len(sys.argv) > 2 else "stages"
q, k, v, mask, dout, valid = BA.make_inputs(case)
if variant != "stages":
    # forward-only calls, each variant in its own process (a fault poisons the CUDA context):
    #   leaves    the benchmark's inputs (leaves that require grad) under no_grad: the faulting call
    #   detached  inputs that do not require grad, under no_grad (what sampling does), compiled flex
    #   eager     torch's flex_attention uncompiled (scores materialised), no_grad
    from nanodit import attention as A

    lens = mask.sum(1, dtype=torch.int32) if mask is not None else None
    with torch.no_grad():
        if variant == "leaves":
            stage("no_grad forward, leaves", lambda: BA.provider_fn("flex")(q, k, v, mask))
        elif variant == "detached":
            qd, kd, vd = (t.detach() for t in (q, k, v))
            stage("no_grad forward, detached", lambda: BA.provider_fn("flex")(qd, kd, vd, mask))
        elif variant == "eager":
            qd, kd, vd = (t.detach() for t in (q, k, v))
            stage("no_grad forward, uncompiled", lambda: A._flex_core(qd, kd, vd, lens))
    sys.exit(0)
print(case, "lens", None if mask is None else mask.sum(1).tolist(), flush=True)
fn = BA.provider_fn("flex")
out = stage("forward (grad)", lambda: fn(q, k, v, mask))
stage("backward", lambda: torch.autograd.grad(out, (q, k, v), dout))
for i in range(3):
    stage(f"fwd+bwd {i}", lambda: torch.autograd.grad(fn(q, k, v, mask), (q, k, v), dout))


def fwd_nograd():
    with torch.no_grad():
        return fn(q, k, v, mask)


stage("forward (no_grad)", fwd_nograd)
stage(
    "cuda graph of fwd+bwd",
    lambda: BA.graphed(lambda: torch.autograd.grad(fn(q, k, v, mask), (q, k, v), dout))(),
)
print("all stages ok")
