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
q, k, v, mask, dout, valid = BA.make_inputs(case)
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
