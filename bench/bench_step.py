"""The nano-step workload: one full training step (forward, flow loss, backward, AdamW, EMA) at batch 16.

    pytest bench/bench_step.py --benchmark-only           # pytest-benchmark, GPU only
    python bench/bench_step.py --out bench/results/step.json [--variants ref-eager,triton-compile]

Workload (docs/design.md, "How performance is measured"): nano model (12 x 384, 6 heads), batch 16, 64x64x16 latents, T5 padded to 256
tokens with random valid lengths, DINO 1024-d, bf16 autocast unless the variant says fp32. Variants (dash-joined
words): nanodit with ``kernels=ref`` / ``triton``, then
- ``eager``: plain PyTorch autograd, one Python launch per op;
- ``compile``: ``torch.compile(model)`` (the Triton ops reach Inductor as triton ops; ``customop`` adds: as opaque
  custom ops, the older door);
- ``compile-cg``: ``mode="reduce-overhead"`` (Inductor's CUDA graphs around forward and backward);
- ``graph``: the whole eager step (forward, loss, backward, clipping, AdamW, EMA) captured once in one CUDA
  graph and replayed: no host cost at all, so it shows what the kernels save on the GPU;
- ``fp32``: no autocast;
and the diffusers ``PixArtTransformer2DModel`` peer at the nano size with the same loop. Reported: ms/step (median
of CUDA-event timed windows), samples/s, model TFLOP/s (FLOPs of one step from torch.utils.flop_counter), MFU
against the card's bf16 matmul peak measured in the same run, peak memory, and with ``--profile`` the GPU-busy ms
per step (sum of kernel times from torch.profiler) beside the wall ms: busy << wall means the host is the bottleneck.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # script mode: import nanodit from the repo
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/conftest.py helpers
from conftest import cuda_event_times, cuda_graph  # noqa: E402  (bench/conftest.py)

from nanodit.data.batch import Batch, make_batch  # noqa: E402

B, C, HW, L, DD, DT = 16, 16, 64, 256, 1024, 4096
VARIANTS = [
    "ref-eager",
    "triton-eager",
    "ref-graph",
    "triton-graph",
    "ref-compile",
    "triton-compile",
    "triton-compile-customop",
    "ref-compile-cg",
    "triton-compile-cg",
    "ref-eager-fp32",
    "triton-eager-fp32",
    "pixart-eager",
    "pixart-compile",
]


def random_batch(device, seed=0) -> Batch:
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None] < lens[:, None]  # (B, L)
    t5 = torch.randn(B, L, DT, generator=g).half() * mask[..., None]  # (B, L, Dt)
    latent = torch.randn(B, C, HW, HW, generator=g).half().to(device)
    dino = torch.randn(B, DD, generator=g).half().to(device)
    drop_text, drop_dino = (torch.rand(B, generator=g) < 0.2), (torch.rand(B, generator=g) < 0.2)
    flags = torch.stack([torch.zeros(B, dtype=torch.bool), drop_text, drop_dino]).to(device)  # (3, B)
    ids = [f"bench-{i}" for i in range(B)]
    return make_batch(latent, dino, t5.to(device), mask.to(device), flags, ids, [""] * B, 0)


class PixArtAdapter(torch.nn.Module):
    """diffusers PixArtTransformer2DModel at the nano size, called like NanoDiT (no DINO path)."""

    def __init__(self):
        super().__init__()
        from diffusers import PixArtTransformer2DModel

        self.net = PixArtTransformer2DModel(
            num_attention_heads=6,
            attention_head_dim=64,
            in_channels=C,
            out_channels=C,
            num_layers=12,
            cross_attention_dim=384,
            caption_channels=DT,
            patch_size=2,
            sample_size=HW,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        )

    def forward(self, x, t, dino, t5, t5_mask, drop_dino=None, drop_text=None):
        return self.net(
            x,
            encoder_hidden_states=t5.to(x.dtype),
            timestep=t * 1000,
            encoder_attention_mask=t5_mask.to(x.dtype),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample


def build(variant: str, device):
    from nanodit.config import ModelConfig
    from nanodit.kernels import flow_loss_ref
    from nanodit.model import build_model

    parts = variant.split("-")
    if parts[0] == "pixart":
        model = PixArtAdapter().to(device)
        flow_loss = flow_loss_ref
    else:
        model = build_model(ModelConfig(size="nano", kernels=parts[0]), DD, DT).to(device)
        flow_loss = model.ops.flow_loss
    fwd = model
    if "compile" in parts:
        fwd = torch.compile(model, mode="reduce-overhead" if "cg" in parts else None)
    precision = "fp32" if "fp32" in parts else "bf16"
    return model, fwd, flow_loss, precision


def make_step(variant: str, device):
    from nanodit.flow import training_loss
    from nanodit.optim import EMA, param_groups

    model, fwd, flow_loss, precision = build(variant, device)
    graphed = "graph" in variant.split("-")
    torch.backends.cuda.matmul.allow_tf32 = False
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    opt = torch.optim.AdamW(
        param_groups(model, 0.03), lr=1e-4, betas=(0.9, 0.95), fused=True, capturable=graphed
    )
    ema = EMA(model)
    # a captured graph replays the default generator's Philox stream safely; a private generator would need
    # registering with the graph, so the graph variants draw t and noise from the default one
    gen = None if graphed else torch.Generator(device=device).manual_seed(0)
    batch = random_batch(device)

    def step():
        loss, _ = training_loss(fwd, batch, flow_loss, gen, autocast=autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, 0.999)
        return loss

    if graphed:
        step = capture_step(step, opt)

    def flops() -> float:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            loss, _ = training_loss(model, batch, flow_loss, gen, autocast=autocast)
            loss.backward()
        opt.zero_grad(set_to_none=True)
        return float(fc.get_total_flops())

    return step, flops, model


def capture_step(step, opt):
    """The whole step in one CUDA graph; each call replays it. The gradients are set to None before the
    capture, so they are allocated from the graph's private pool."""
    replay, loss = cuda_graph(step, before_capture=lambda: opt.zero_grad(set_to_none=True))

    def run():
        replay()
        return loss

    return run


def gpu_busy_ms(step, steps: int = 10) -> tuple[float, list, dict]:
    """GPU-busy ms per step (sum of device kernel/memcpy times, torch.profiler), the top kernels by time, and
    the host side: the top ops by self CPU ms per step and the kernel / graph launches per step."""
    from torch.profiler import ProfilerActivity, profile

    from nanodit.tracing import device_busy

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    busy, top, classes = device_busy(prof, steps)
    host = [e for e in prof.key_averages() if "CUDA" not in str(getattr(e, "device_type", ""))]
    host.sort(key=lambda e: -e.self_cpu_time_total)
    launch_keys = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
    info = {
        "host_top_self_ms": [
            [e.key[:60], round(e.self_cpu_time_total / steps / 1e3, 3), e.count // steps] for e in host[:10]
        ],
        "launches_per_step": {e.key: e.count // steps for e in host if e.key in launch_keys},
        "kernel_classes_ms": classes,
    }
    return busy, top, info


def time_steps(step, warmup=10, windows=5, per_window=10) -> list[float]:
    return cuda_event_times(step, warmup, windows, per_window)


def matmul_peak_tflops(device) -> float:
    """bf16 matmul ceiling measured here: 8192^3 on random data, median of 10."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return 2 * 8192**3 / (statistics.median(ts) * 1e-3) / 1e12


@contextlib.contextmanager
def compile_door(variant: str):
    """``customop`` variants compile the Triton ops through the custom-op door (see nanodit.kernels.doors)."""
    from nanodit.kernels import doors

    old = doors.COMPILE_DOOR
    doors.COMPILE_DOOR = "custom_op" if "customop" in variant.split("-") else "triton_op"
    torch._dynamo.reset()
    try:
        yield
    finally:
        doors.COMPILE_DOOR = old


def measure(variant: str, device, peak: float, profile: bool = False) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    from torch._dynamo.utils import counters

    with compile_door(variant):
        counters.clear()
        step, flops, _ = make_step(variant, device)
        fl = flops()
        times = time_steps(step)
        busy, top, host = gpu_busy_ms(step) if profile else (None, None, {})
        # what kept a compiled variant from one graph / one CUDA graph (empty when nothing did)
        skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k and "skip" in k}
        breaks = sum(counters["graph_break"].values())
    ms = statistics.median(times)
    tflops = fl / (ms * 1e-3) / 1e12
    row = {
        "variant": variant,
        "ms_per_step": ms,
        "ms_spread": [min(times), max(times)],
        "samples_per_s": B / (ms * 1e-3),
        "step_tflop": fl / 1e12,
        "tflops": tflops,
        "mfu": tflops / peak,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        "graph_breaks": breaks,
        "cudagraph_skips": skips,
    }
    if profile:
        row.update(gpu_busy_ms=busy, top_kernels=top, **host)
    return row


@pytest.fixture(scope="module")
def peak():
    return matmul_peak_tflops(torch.device("cuda"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_nano_step(benchmark, variant, peak, bench_meta):
    device = torch.device("cuda")
    if variant.startswith("pixart"):
        pytest.importorskip("diffusers")
    row = measure(variant, device, peak)
    with compile_door(variant):
        step, _, _ = make_step(variant, device)
        for _ in range(5):
            step()

    def run10():
        for _ in range(10):
            step()
        torch.cuda.synchronize()

    benchmark.pedantic(run10, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({**bench_meta, **row, "matmul_peak_tflops": peak})


def main() -> None:
    from conftest import machine_info

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="also GPU-busy ms per step and the top kernels")
    args = ap.parse_args()
    device = torch.device("cuda")
    meta = machine_info()
    peak = matmul_peak_tflops(device)
    rows = []
    for v in args.variants.split(","):
        if v.startswith("pixart"):
            try:
                import diffusers  # noqa: F401
            except ImportError:
                print(f"{v}: skipped (diffusers not installed)")
                continue
        try:
            rows.append(measure(v, device, peak, args.profile))
        except Exception as e:  # a failing variant is reported, the others still run
            rows.append({"variant": v, "error": f"{e.__class__.__name__}: {str(e).splitlines()[0][:300]}"})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        **meta,
        "matmul_peak_tflops": peak,
        "workload": f"nano-step B{B} {HW}x{HW}x{C} L{L}",
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"\n{meta['card']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}  "
        f"bf16 matmul peak {peak:.0f} TFLOP/s"
    )
    print(
        f"{'variant':24s} {'ms/step':>8s} {'GPU busy':>8s} {'samples/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} "
        f"{'mem GB':>7s}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:24s} ERROR {r['error'][:80]}")
        else:
            busy = f"{r['gpu_busy_ms']:8.2f}" if r.get("gpu_busy_ms") is not None else f"{'-':>8s}"
            print(
                f"{r['variant']:24s} {r['ms_per_step']:8.2f} {busy} {r['samples_per_s']:10.0f} "
                f"{r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {r['peak_mem_gb']:7.2f}"
            )


if __name__ == "__main__":
    main()
