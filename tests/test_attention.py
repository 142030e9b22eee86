"""Every attention backend against a float64 reference: outputs, dq/dk/dv, padding, empty rows.

Claims, for each backend present on the machine (absent ones skip with the reason):
- output and gradients of q, k, v match softmax(q k^T / sqrt(hd)) v over the valid keys, computed
  in float64 from the same inputs: fp32 within a tight tolerance; fp16/bf16 by the rule
  max|fast - ref64| <= 2 * max|lowp - ref64| + atol, lowp being plain torch attention computed in
  that low precision (the error torch's own ops would make);
- query length != key length, every key length from 0 (fully masked) to the maximum, B = 1, and
  self-attention (no mask);
- padded keys get exactly zero gradient, and changing them changes nothing (bitwise);
- a fully masked row gives exactly zeros and finite (zero) gradients, never NaN;
- auto follows the measured table; bad input fails with a one-line error naming the option;
- the sdpa / cudnn / auto paths trace under torch.compile(fullgraph=True): no graph break.

Inputs are fresh random numbers each run; a failing case prints its seed.
CPU runs math, sdpa, auto and flex (forward only: torch has no CPU backward for FlexAttention).
GPU cases (``gpu`` marker) add cudnn, compiled flex, flash (if flash-attn is installed), bf16.
Run: pytest tests/test_attention.py
"""

from __future__ import annotations

import random

import pytest
import torch

import nanodit.attention as A
from nanodit.attention import attention, auto_plan

CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu

# (name, B, T, L, nh, hd, key lengths or None for self-attention)
CPU_CASES = [
    ("sweep", 10, 13, 9, 2, 16, list(range(10))),  # every length 0..L, T != L
    ("B1", 1, 7, 12, 3, 8, [5]),
    ("self", 2, 11, 11, 2, 16, None),
]
# head dim 64 (the fast kernels want a multiple of 8); odd T and L as the model's buckets and T5 give
GPU_CASES = [
    ("sweep", 41, 100, 40, 2, 64, list(range(41))),
    ("B1", 1, 77, 130, 3, 64, [93]),
    ("self", 2, 200, 200, 2, 64, None),
]
ATOL = {torch.float16: 1e-3, torch.bfloat16: 4e-3}
FP32_TOL = dict(atol=2e-5, rtol=1e-4)


def backend_skip(backend: str, device: str, dtype: torch.dtype) -> str | None:
    """Why this backend cannot run here, or None (flex on CPU runs, forward only)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if backend in ("cudnn", "flash") and (device != "cuda" or not half):
        return f"{backend} runs on CUDA in fp16/bf16 only"
    if backend == "flash" and A.flash_variant(torch.cuda.get_device_capability()[0]) is None:
        return "flash-attn not installed (scripts/fetch_flash_wheels.sh carries flash-attn-4)"
    if backend == "flex" and device == "cuda" and not half:
        return "flex fp32 on GPU left out: each dtype is a fresh compile (fp32 flex is checked on CPU)"
    if device == "cpu" and half:
        return "low precision is checked on the GPU"
    return None


def impl(backend: str):
    """The callable under test: a public backend, or one SDPA kernel forced (auto's fallbacks)."""
    if backend.startswith("sdpa-"):
        return lambda q, k, v, m: A.attention_sdpa(q, k, v, m, kernels=(backend,))
    return lambda q, k, v, m: attention(q, k, v, m, backend=backend)


def combos():
    for backend in ("math", "sdpa", "sdpa-math", "auto", "flex"):
        for case in CPU_CASES:
            yield pytest.param(backend, "cpu", torch.float32, case, id=f"{backend}-cpu-fp32-{case[0]}")
    for backend in ("math", "sdpa", "sdpa-math", "sdpa-efficient", "auto", "flex", "cudnn", "flash"):
        for dtype in (torch.float32, torch.bfloat16):
            for case in GPU_CASES:
                name = f"{backend}-cuda-{str(dtype)[6:]}-{case[0]}"
                yield pytest.param(backend, "cuda", dtype, case, id=name, marks=GPU)


@pytest.fixture
def seed() -> int:
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


def make(case, device, dtype):
    _, B, T, L, nh, hd, lens = case
    q = torch.randn(B, T, nh, hd, device=device).to(dtype)
    k = torch.randn(B, L, nh, hd, device=device).to(dtype)
    v = torch.randn(B, L, nh, hd, device=device).to(dtype)
    mask = None
    if lens is not None:
        mask = torch.arange(L, device=device)[None] < torch.tensor(lens, device=device)[:, None]  # (B, L)
    dout = torch.randn(B, T, nh, hd, device=device).to(dtype)
    return q, k, v, mask, dout


def ref64(q, k, v, mask):
    """Masked softmax attention in float64, written apart from attention_math: exp, mask, normalise."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bthd,blhd->bhtl", q, k) / q.shape[-1] ** 0.5  # (B, nh, T, L)
    keep = torch.ones_like(s, dtype=torch.bool) if mask is None else mask[:, None, None, :].expand_as(s)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)  # (B, nh, T, 1); -inf on an empty row
    e = torch.exp(s - m.nan_to_num(0.0, neginf=0.0))  # masked keys: exp(-inf) = 0, gradient 0
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)  # empty row: 0 / tiny = 0
    return torch.einsum("bhtl,blhd->bthd", p, v)  # (B, T, nh, hd)


def lowp(q, k, v, mask):
    """Plain torch attention in the inputs' own precision: the yardstick for fp16/bf16 error."""
    s = torch.einsum("bthd,blhd->bhtl", q, k) * q.shape[-1] ** -0.5  # (B, nh, T, L)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhtl,blhd->bthd", p, v)  # (B, T, nh, hd)


def run(fn, q, k, v, mask, dout, grads=True):
    """fn's output and (dq, dk, dv) for the upstream gradient dout."""
    q, k, v = (t.detach().requires_grad_(grads) for t in (q, k, v))
    out = fn(q, k, v, mask)
    if not grads:
        return out.detach(), None
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out.detach(), (dq, dk, dv)


def assert_close_rule(fast, ref, low, dtype, what, seed):
    if dtype == torch.float32:
        torch.testing.assert_close(fast.double(), ref, **FP32_TOL, msg=lambda m: f"{what} (seed {seed}): {m}")
        return
    err = (fast.double() - ref).abs().max().item()
    bound = 2 * (low.double() - ref).abs().max().item() + ATOL[dtype]
    assert err <= bound, f"{what} (seed {seed}): max err {err:.3g} > bound {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# parity with the reference


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend,device,dtype,case", list(combos()))
def test_matches_reference(backend, device, dtype, case, seed):
    grads = not (backend == "flex" and device == "cpu")  # torch has no CPU backward for flex
    reason = backend_skip(backend, device, dtype)
    if reason:
        pytest.skip(reason)
    q, k, v, mask, dout = make(case, device, dtype)
    out, g = run(impl(backend), q, k, v, mask, dout, grads)
    assert out.dtype == dtype and out.shape == q.shape
    ref, gref = run(ref64, q.double(), k.double(), v.double(), mask, dout.double())
    low, glow = run(lowp, q, k, v, mask, dout) if dtype != torch.float32 else (None, (None,) * 3)
    assert_close_rule(out, ref, low, dtype, f"{backend} output", seed)
    if grads:
        for name, a, r, lo in zip("qkv", g, gref, glow):
            assert a.dtype == dtype
            assert_close_rule(a, r, lo, dtype, f"{backend} d{name}", seed)


# ---------------------------------------------------------------------------------------------
# padding and empty rows


def masked_combos():
    for p in combos():
        backend, device, dtype, case = p.values
        if case[-1] is not None:
            yield p


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend,device,dtype,case", list(masked_combos()))
def test_padded_keys_are_inert(backend, device, dtype, case, seed):
    grads = not (backend == "flex" and device == "cpu")  # torch has no CPU backward for flex
    reason = backend_skip(backend, device, dtype)
    if reason:
        pytest.skip(reason)
    fn = impl(backend)
    q, k, v, mask, dout = make(case, device, dtype)
    pad = ~mask  # (B, L)
    out1, g1 = run(fn, q, k, v, mask, dout, grads)
    k2, v2 = k.clone(), v.clone()
    k2[pad] = (torch.randn_like(k[pad].float()) * 10).to(dtype)
    v2[pad] = (torch.randn_like(v[pad].float()) * 10).to(dtype)
    out2, g2 = run(fn, q, k2, v2, mask, dout, grads)
    assert torch.equal(out1, out2), f"{backend}: padded key values changed the output (seed {seed})"
    # the test has power: changing one valid key does change the output
    k3 = k.clone()
    k3[mask] += 1
    assert not torch.equal(run(fn, q, k3, v, mask, dout, grads)[0], out1)  # same grad mode: no recompile
    if grads:
        dq1, dk1, dv1 = g1
        # dq within rounding, not bitwise: backward kernels may sum dq tiles with atomics in any order
        torch.testing.assert_close(g2[0], dq1, msg=lambda m: f"{backend}: padded keys changed dq: {m}")
        assert torch.count_nonzero(dk1[pad]) == 0, f"{backend}: nonzero dk at padded keys (seed {seed})"
        assert torch.count_nonzero(dv1[pad]) == 0, f"{backend}: nonzero dv at padded keys (seed {seed})"
        assert torch.count_nonzero(dk1[mask]) > 0 and torch.count_nonzero(dv1[mask]) > 0


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend,device,dtype,case", list(masked_combos()))
def test_fully_masked_row_gives_zeros(backend, device, dtype, case, seed):
    grads = not (backend == "flex" and device == "cpu")  # torch has no CPU backward for flex
    reason = backend_skip(backend, device, dtype)
    if reason:
        pytest.skip(reason)
    q, k, v, mask, dout = make(case, device, dtype)
    mask[0] = False  # row 0 sees no key at all (also for B = 1)
    out, g = run(impl(backend), q, k, v, mask, dout, grads)
    assert not out.isnan().any(), f"{backend}: NaN output (seed {seed})"
    assert torch.count_nonzero(out[0]) == 0, f"{backend}: fully masked row is not zero (seed {seed})"
    if out.shape[0] > 1:
        assert torch.count_nonzero(out[1:]) > 0
    if grads:
        dq, dk, dv = g
        assert all(t.isfinite().all() for t in g), f"{backend}: non-finite gradient (seed {seed})"
        assert torch.count_nonzero(dq[0]) == 0 and torch.count_nonzero(dk[0]) == 0
        assert torch.count_nonzero(dv[0]) == 0


@GPU
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["flex", "cudnn", "sdpa", "flash", "auto"])
@pytest.mark.parametrize("detached", [True, False], ids=["sampling", "leaves"])
def test_forward_only_at_the_nano_shape_matches_reference(backend, detached, seed):
    """Sampling and validation call attention under no_grad at the training shape (16 x 1024 queries, <= 256
    keys). torch 2.11's compiled forward-only FlexAttention faulted there on an H200 (illegal memory access,
    scripts/debug_flex.py), so flex runs uncompiled for forward-only calls; every backend's no-grad forward,
    with inputs that do or do not require grad, matches the reference."""
    reason = backend_skip(backend, "cuda", torch.bfloat16)
    if reason:
        pytest.skip(reason)
    q, k, v, mask, _ = make(
        ("nano", 16, 1024, 256, 6, 64, torch.randint(1, 257, (16,)).tolist()), "cuda", torch.bfloat16
    )
    if not detached:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        out = impl(backend)(q, k, v, mask)
    torch.cuda.synchronize()
    assert_close_rule(
        out, ref64(q, k, v, mask), lowp(q, k, v, mask), torch.bfloat16, f"{backend} no-grad", seed
    )


# ---------------------------------------------------------------------------------------------
# auto, errors, torch.compile


def test_auto_is_plain_sdpa_on_cpu_and_fp32():
    assert auto_plan("cpu", 0, "torch.float32", True) == ("sdpa",)
    assert auto_plan("cpu", 0, "torch.bfloat16", False) == ("sdpa",)
    assert auto_plan("cuda", 0, "torch.float32", True) == ("sdpa",)  # no table lookup for fp32


def test_auto_table_rows_name_their_source_and_known_providers():
    known = {"cudnn", "sdpa-efficient", "sdpa-flash", "flash", "flex"}
    for cc, row in A.AUTO_TABLE.items():
        assert isinstance(row["source"], str) and row["source"], cc
        for case in ("cross", "self"):
            assert set(row[case]) <= known and all(ms > 0 for ms in row[case].values()), (cc, case)


@GPU
@pytest.mark.parametrize("masked", [True, False])
def test_auto_follows_the_table_on_this_card(masked):
    row = A.AUTO_TABLE.get(torch.cuda.get_device_capability())
    plan = auto_plan("cuda", torch.cuda.current_device(), "torch.bfloat16", masked)
    if row is None:
        assert plan == ("sdpa",)
        return
    times = row["cross" if masked else "self"]
    assert plan[0] in times
    assert [times[n] for n in plan] == sorted(times[n] for n in plan)


def test_bad_inputs_fail_with_one_line_errors():
    q, k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"model\.attention='fast'"):
        attention(q, k, v, mask, backend="fast")
    with pytest.raises(ValueError, match="kv_mask must be a bool"):
        attention(q, k, v, mask.float(), backend="sdpa")
    with pytest.raises(ValueError, match="q must be"):
        attention(q[0], k, v, mask)
    with pytest.raises(ValueError, match="differ in B, nh or hd"):
        attention(q[:, :, :1], k, v, mask)
    if not CUDA:
        for backend in ("cudnn", "flash"):
            with pytest.raises(ValueError, match=rf"model\.attention='{backend}' needs CUDA"):
                attention(q, k, v, mask, backend=backend)
        with pytest.raises(ValueError, match="no backward on CPU"):
            attention(q.requires_grad_(), k, v, mask, backend="flex")


@GPU
def test_flash_missing_says_how_to_install():
    if A.flash_variant(torch.cuda.get_device_capability()[0]) is not None:
        pytest.skip("flash-attn is installed here")
    q = torch.randn(1, 4, 1, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="pip install"):
        attention(q, q, q, None, backend="flash")


@pytest.mark.parametrize(
    "backend,device,dtype",
    [
        ("sdpa", "cpu", torch.float32),
        ("auto", "cpu", torch.float32),
        ("math", "cpu", torch.float32),
        pytest.param("cudnn", "cuda", torch.bfloat16, marks=GPU),
        pytest.param("auto", "cuda", torch.bfloat16, marks=GPU),
        pytest.param("sdpa", "cuda", torch.bfloat16, marks=GPU),
    ],
)
def test_traces_without_graph_breaks(backend, device, dtype):
    """fullgraph=True raises on any graph break; aot_eager also traces the backward."""
    torch._dynamo.reset()
    q, k, v, mask, dout = make(GPU_CASES[0] if device == "cuda" else CPU_CASES[0], device, dtype)
    fn = lambda q, k, v, m: attention(q, k, v, m, backend=backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c, g_c = run(compiled, q, k, v, mask, dout)
    out_e, g_e = run(fn, q, k, v, mask, dout)
    tol = dict(atol=0, rtol=0) if device == "cpu" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_c, out_e, **tol)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, **tol)


def test_empty_row_guard_makes_a_nan_prone_kernel_safe(seed):
    """torch's CPU kernels already return 0 on an empty row, so check the guard on a kernel that
    does not: plain softmax gives NaN there, and after _no_empty_rows exactly 0 with zero grads."""

    def plain(q, k, v, mask):
        s = torch.einsum("bthd,blhd->bhtl", q, k) * q.shape[-1] ** -0.5  # (B, nh, T, L)
        p = torch.softmax(s.masked_fill(~mask[:, None, None, :], float("-inf")), -1)
        return torch.einsum("bhtl,blhd->bthd", p, v)  # (B, T, nh, hd)

    def guarded(q, k, v, mask):
        mask, v = A._no_empty_rows(mask, v)
        return plain(q, k, v, mask)

    q, k, v, mask, dout = make(CPU_CASES[0], "cpu", torch.float32)
    assert not mask[0].any()
    assert plain(q, k, v, mask)[0].isnan().all()  # the hazard is real
    out, (dq, dk, dv) = run(guarded, q, k, v, mask, dout)
    ref, gref = run(ref64, q.double(), k.double(), v.double(), mask, dout.double())
    torch.testing.assert_close(out.double(), ref, **FP32_TOL)
    for a, r in zip((dq, dk, dv), gref):
        torch.testing.assert_close(a.double(), r, **FP32_TOL)
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(dq[0]) == 0
    assert torch.count_nonzero(dk[~mask]) == 0 and torch.count_nonzero(dv[~mask]) == 0


def test_auto_hands_over_when_its_first_kernel_cannot_run(monkeypatch, seed):
    """auto's SDPA order starts with the measured winner (cuDNN on Hopper); where that kernel cannot
    take the inputs (here: CPU) torch moves down the list instead of failing."""
    monkeypatch.setattr(A, "auto_plan", lambda *a: ("cudnn", "sdpa-efficient", "flex"))
    q, k, v, mask, dout = make(CPU_CASES[0], "cpu", torch.float32)
    out, g = run(lambda *a: attention(*a, backend="auto"), q, k, v, mask, dout)
    ref, gref = run(ref64, q.double(), k.double(), v.double(), mask, dout.double())
    torch.testing.assert_close(out.double(), ref, **FP32_TOL)
    for a, r in zip(g, gref):
        torch.testing.assert_close(a.double(), r, **FP32_TOL)
    with pytest.raises(RuntimeError):  # the same kernel forced alone does fail: the order is what helps
        A.attention_sdpa(q, k, v, mask, kernels=("cudnn",))


def test_constant_to_compile_leaves_torch_compilers_mark() -> None:
    """attention.constant_to_compile marks a function as torch.compiler.assume_constant_result does (it sets the
    mark without importing torch._dynamo); a torch that changes the mark fails here."""

    def probe_a() -> int:
        return 1

    def probe_b() -> int:
        return 1

    A.constant_to_compile(probe_a)
    torch.compiler.assume_constant_result(probe_b)
    assert vars(probe_a) == vars(probe_b) and vars(probe_b)


def test_model_import_does_not_load_dynamo() -> None:
    """Importing the trainer's model does not import torch._dynamo (seconds of start-up; only compile needs it)."""
    import subprocess
    import sys

    code = "import sys, nanodit.model; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
