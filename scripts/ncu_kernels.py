"""One forward + backward of each fused row op at the large benchmark shape, for Nsight Compute.

    ncu --clock-control none -k regex:'_kernel$' --set full python3 scripts/ncu_kernels.py [op ...]

ops: modulate, residual_modulate, residual_modulate_gated, gated_residual (default: these four), and
flow_loss. bf16, (256, 1024, 384) as in bench/bench_kernels.py (flow_loss: latents (256, 16, 64, 64), 10
t-bins: its forward kernel, the finishing kernel and the backward's scale); scale/shift/gate are chunk()
slices of one (B, 6D) tensor, as in the model. Each op runs once after one warm-up call at a tiny shape (compilation), so the
profiled launches are the large-shape ones (give ncu ``--launch-skip`` nothing).
"""

from __future__ import annotations

import sys

import torch

from nanodit.kernels import adaln_modulate, gated_residual, residual_adaln_modulate

B, T, D = 256, 1024, 384
LATENT = (16, 64, 64)  # flow_loss: (C, H, W) of the latents, as bench_kernels.LOSS_SHAPES


def run(op: str, b: int, t: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    if op == "flow_loss":
        from nanodit.kernels.flow_loss import flow_loss

        shape = (b, *LATENT) if t == T else (b, LATENT[0], 8, 8)
        v, x0, eps = rnd(*shape), rnd(*shape).detach(), rnd(*shape).detach()
        per_sample, _, _ = flow_loss(v, x0, eps, torch.rand(b, device="cuda", generator=g), None, 10)
        per_sample.mean().backward()
        torch.cuda.synchronize()
        return
    x, y = rnd(b, t, D), rnd(b, t, D)
    shift, scale, gate = rnd(b, 3 * D).chunk(3, dim=1)
    if op == "modulate":
        outs = (adaln_modulate(x, shift, scale),)
    elif op == "gated_residual":
        outs = (gated_residual(x, gate, y),)
    else:
        outs = residual_adaln_modulate(x, y, gate if op.endswith("gated") else None, shift, scale)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    ops = argv or ["modulate", "residual_modulate", "residual_modulate_gated", "gated_residual"]
    if any(not n.startswith("-") and n.endswith("_kernel") for n in ops):
        raise SystemExit("give op names, not kernel names")
    for op in ops:
        with torch.cuda.nvtx.range(f"warmup {op}"):
            run(op, 2, 8)  # compiles at D=384 outside the profiled shape (T is not specialised)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for op in ops:
        run(op, B, T)
    torch.cuda.cudart().cudaProfilerStop()
    print("ran", ", ".join(ops), f"at {(B, T, D)} bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
