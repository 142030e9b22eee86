"""Shared pieces of the kernel parity tests: inputs in every layout, the three runs, the tolerance rule.

Every op is run three times on the same values:
- fast:  the Triton op on the inputs as given (any dtype, any layout);
- ref64: the ``*_ref`` twin on float64 copies (the truth);
- lowp:  the ``*_ref`` twin in the input dtype (what plain PyTorch achieves in that precision).
Rule, on the max norm of each output and each gradient:
    fp32:       max|fast - ref64| <= FP32_RTOL * max|ref64| + ATOL_ABS
    bf16/fp16:  max|fast - ref64| <= 2 * max|lowp - ref64| + eps/2 * max|ref64|
                                      + LOWP_ATOL_REL * max|ref64| + ATOL_ABS
eps/2 * max|ref64| is one rounding of the result (half an ulp at the largest value): two implementations
that each round once may differ by that much on one element even where the lowp run happened to land near
the truth everywhere -- a reduction of one term (dscale at T=1 is dh * xhat per element) over a few hundred
elements made the bare 2x rule fail ~1 run in 150 (H200, and a CPU emulation of the kernel's roundings).
(LOWP_ATOL_REL covers outputs that both compute and return in fp32, such as flow_loss's per-sample loss.)
Inputs are fresh random values every run; the seed is in every failure message
(``NANODIT_TEST_SEED=<seed>`` replays one).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_RTOL = 3e-5
LOWP_ATOL_REL = 1e-5
ATOL_ABS = 1e-7
LAYOUTS = ("contig", "bt_transposed", "row_padded", "d_strided")


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CPU_SHAPES = [(1, 1, 384), (2, 7, 383), (3, 33, 385), (1, 1024, 384), (2, 19, 1024)]
GPU_SHAPES = list(itertools.product((1, 4), (1, 7, 256, 1024, 1031), (383, 384, 385, 1024)))


def row_cases() -> list:
    """Cases of the (B, T, D) row ops, (shape, dtype, layout, sliced): the CPU subset, then the GPU grid."""
    out = [pytest.param(s, F32, "contig", True, id=f"{s}-f32-contig-sliced") for s in CPU_SHAPES]
    for layout, sliced in itertools.product(LAYOUTS, (True, False)):
        out.append(pytest.param((2, 9, 385), F32, layout, sliced, id=f"(2, 9, 385)-f32-{layout}-{sliced}"))
    gpu = pytest.mark.gpu
    for s, dt in itertools.product(GPU_SHAPES, (F32, BF16, F16)):
        out.append(pytest.param(s, dt, "contig", True, marks=gpu, id=f"gpu-{s}-{dt}-contig-sliced"))
    for s, dt, layout in itertools.product([(4, 257, 384), (1, 31, 1024)], (F32, BF16, F16), LAYOUTS):
        out.append(pytest.param(s, dt, layout, False, marks=gpu, id=f"gpu-{s}-{dt}-{layout}"))
    return out


ROW_CASES = row_cases()


def fresh_seed() -> int:
    """A new random seed per test (or NANODIT_TEST_SEED), set on torch's generators."""
    seed = int(os.environ.get("NANODIT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    return seed


def make_rows(B: int, T: int, D: int, dtype: torch.dtype, layout: str, loc: float = 0.0) -> torch.Tensor:
    """Random (B, T, D) values laid out in memory as `layout`."""
    kw = dict(device=DEVICE, dtype=dtype)
    if layout == "contig":
        return (torch.randn(B, T, D, **kw) + loc).contiguous()
    if layout == "bt_transposed":  # strides (D, B*D, 1): tokens of a sample are not adjacent
        return (torch.randn(T, B, D, **kw) + loc).transpose(0, 1)
    if layout == "row_padded":  # a slice of wider rows: row stride D+24, base pointer offset by 5 elements
        return (torch.randn(B, T, D + 24, **kw) + loc)[..., 5 : 5 + D]
    if layout == "d_strided":  # unit stride on T, not on D: the ops must copy
        return (torch.randn(B, D, T, **kw) + loc).transpose(1, 2)
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")


def make_vecs(B: int, D: int, k: int, dtype: torch.dtype, sliced: bool) -> list[torch.Tensor]:
    """k (B, D) per-sample vectors: chunk() slices of one (B, 6D) tensor (strides (6D, 1)) or separate."""
    if sliced:
        return list((0.5 * torch.randn(B, 6 * D, device=DEVICE, dtype=dtype)).chunk(6, dim=1)[:k])
    return [0.5 * torch.randn(B, D, device=DEVICE, dtype=dtype) for _ in range(k)]


def as_leaves(args, dtype: torch.dtype | None = None, contiguous: bool = False) -> list:
    """Detached copies (optionally cast / made contiguous) that require grad; None stays None."""
    out = []
    for a in args:
        if a is None or not torch.is_tensor(a):
            out.append(a)
            continue
        b = a.detach()
        b = b.to(dtype) if dtype is not None else b.clone()
        b = b.contiguous() if contiguous else b
        out.append(b.requires_grad_(True))
    return out


def same_layout(args) -> list:
    """Copies that keep each tensor's exact strides and offset (views of fresh leaf bases), so the
    fast op sees transposed / padded / chunk()-sliced memory; gradients are taken w.r.t. the views."""
    out = []
    for a in args:
        if a is None or not torch.is_tensor(a):
            out.append(a)
        elif a._base is None:
            out.append(a.detach().clone().requires_grad_(True))
        else:
            base = a._base.detach().clone().requires_grad_(True)
            out.append(base.as_strided(a.size(), a.stride(), a.storage_offset()))
    return out


def run(fn, args, cotangents, diff: list[int]):
    """outs = fn(*args); grads of sum(out * cotangent) w.r.t. args[i] for i in diff."""
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cots = [c.to(o.dtype) for o, c in zip(outs, cotangents)]
    grads = torch.autograd.grad(outs, [args[i] for i in diff], cots)
    return [o.detach() for o in outs], [g.detach() for g in grads]


def check(
    name: str,
    fast: torch.Tensor,
    ref64: torch.Tensor,
    lowp: torch.Tensor | None,
    seed: int,
    roundings: int = 1,
    mean_of: int = 0,
    input_dtype: torch.dtype | None = None,
) -> None:
    """The tolerance rule of the module docstring; also shape and dtype must match the reference's.

    roundings: how many times the fast value is rounded to the low-precision dtype by design, half an ulp of
    max|ref| each (2 for flow_loss's dL/dv: saved in v's dtype by the forward, scaled by the backward).
    mean_of=N: the value is an fp32 mean over N low-precision values (a scalar loss). Its rounding error is a
    random walk whose one sample in the low-precision reference may land near zero by chance, so the bound
    also allows the walk's typical size, eps * max|ref| / sqrt(N).
    input_dtype: the precision of the inputs when an output is fp32 but computed from low-precision values
    (the low-precision rule applies then, with that dtype's eps).
    """
    assert fast.shape == ref64.shape, (
        f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)} (seed {seed})"
    )
    if lowp is not None:
        assert fast.dtype == lowp.dtype, f"{name}: dtype {fast.dtype} != reference {lowp.dtype} (seed {seed})"
    ref = ref64.double()
    err = (fast.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    lowp_dtype = input_dtype if input_dtype not in (None, torch.float32) else getattr(lowp, "dtype", None)
    if lowp is None or lowp_dtype == torch.float32:
        bound = FP32_RTOL * scale + ATOL_ABS
    else:
        lerr = (lowp.double() - ref).abs().max().item()
        bound = 2 * lerr + LOWP_ATOL_REL * scale + ATOL_ABS
        bound += roundings * torch.finfo(lowp_dtype).eps / 2 * scale
        if mean_of:
            bound += torch.finfo(lowp_dtype).eps * scale / mean_of**0.5
    assert err <= bound, (
        f"{name}: max error {err:.3e} > bound {bound:.3e} (max|ref| {scale:.3e}, seed {seed})"
    )


def compare(name: str, fast_fn, ref_fn, args, diff: list[int], cot_layout: str, seed: int) -> None:
    """Run fast / ref64 / lowp on the same values and check every output and every gradient."""
    probe = ref_fn(*as_leaves(args))  # output shapes for the cotangents
    probe = probe if isinstance(probe, tuple) else (probe,)
    cots = []
    for o in probe:
        if o.dim() == 3:
            cots.append(make_rows(*o.shape, dtype=o.dtype, layout=cot_layout))
        else:
            cots.append(torch.randn(o.shape, device=DEVICE, dtype=o.dtype))
    poison()
    fast_args = same_layout(args)
    assert [a.stride() for a in fast_args if torch.is_tensor(a)] == [
        a.stride() for a in args if torch.is_tensor(a)
    ]
    f_out, f_grad = run(fast_fn, fast_args, cots, diff)
    r_out, r_grad = run(
        ref_fn, as_leaves(args, torch.float64, contiguous=True), [c.double() for c in cots], diff
    )
    l_out, l_grad = run(ref_fn, as_leaves(args, contiguous=True), cots, diff)
    for i, (f, r, lo) in enumerate(zip(f_out, r_out, l_out)):
        check(f"{name} out{i}", f, r, lo, seed)
    for i, f, r, lo in zip(diff, f_grad, r_grad, l_grad):
        check(f"{name} grad(arg{i})", f, r, lo, seed)


def poison() -> None:
    """On CUDA, hand the caching allocator NaN-filled memory, so an element a kernel forgets to write
    shows as NaN instead of a stale right answer."""
    if DEVICE.type == "cuda":
        torch.full((64 << 20,), float("nan"), device=DEVICE)
