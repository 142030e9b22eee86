"""Plumbing of the Triton kernels: interpreter on CPU, lazy import, op registration, errors, determinism."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from kernel_cases import DEVICE, make_vecs

from nanodit.kernels import adaln, checks, flow_loss, get_ops, grid, reduce, ref, residual, tiling

KERNELS = [
    adaln._modulate_fwd_kernel,
    adaln._modulate_bwd_kernel,
    adaln._residual_modulate_fwd_kernel,
    adaln._residual_modulate_bwd_kernel,
    residual._gated_residual_fwd_kernel,
    residual._gated_residual_bwd_kernel,
    flow_loss._flow_loss_fwd_kernel,
    flow_loss._scale_rows_kernel,
    reduce._sum_blocks_kernel,
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is for machines without CUDA")
def test_interpreter_is_used_without_cuda():
    """Without CUDA every kernel is Triton's interpreted function (conftest set TRITON_INTERPRET in time)."""
    assert all(checks.is_interpreted(k) for k in KERNELS)


@pytest.mark.gpu
def test_compiled_kernels_on_gpu_reject_cpu_tensors():
    """On a GPU machine the kernels are compiled, and CPU tensors get a one-line error naming the option."""
    assert not any(checks.is_interpreted(k) for k in KERNELS)
    x, (shift, scale) = torch.randn(1, 2, 8), make_vecs(1, 8, 2, torch.float32, False)
    with pytest.raises(ValueError, match="model.kernels=triton needs CUDA tensors"):
        adaln.adaln_modulate(x, shift.cpu(), scale.cpu())


def test_importing_the_package_does_not_import_the_kernels():
    """nanodit.kernels imports without Triton, and neither it nor the model (kernels=ref) defines a kernel:
    TRITON_INTERPRET, read when @triton.jit decorates, can still be set after they are imported."""
    code = (
        "import sys, nanodit.kernels; print('triton' in sys.modules);"
        "import nanodit.model; nanodit.kernels.get_ops('ref');"
        "print(any(m in sys.modules for m in ('nanodit.kernels.adaln', 'nanodit.kernels.tiling', 'nanodit.kernels.doors')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_get_ops_triton_has_the_ref_fields():
    """get_ops('triton') offers the same seven ops as get_ops('ref'), each a fused op of its own."""
    fast, slow = vars(get_ops("triton")), vars(get_ops("ref"))
    ops = {
        "modulate",
        "gated_residual",
        "residual_modulate",
        "residual_norm",
        "linear",
        "autocast_weights",
        "flow_loss",
    }
    assert fast.keys() == slow.keys() == ops
    assert fast["modulate"] is adaln.adaln_modulate and fast["flow_loss"] is flow_loss.flow_loss
    assert all(f is not slow[k] for k, f in fast.items())
    with pytest.raises(ValueError, match="model.kernels='cuda' is not one of"):
        get_ops("cuda")


def _bad_calls():
    x, v = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE)
    img, t = torch.randn(2, 4, 4, 4, device=DEVICE), torch.rand(2, device=DEVICE)
    wide = torch.randn(1, 1, 40000, device=DEVICE)
    return [
        ("modulate 2-D x", lambda: adaln.adaln_modulate(x[0], v, v), "expected x of shape"),
        ("modulate shift", lambda: adaln.adaln_modulate(x, v[:, :4], v), "shift must have shape"),
        ("modulate int", lambda: adaln.adaln_modulate(x.long(), v, v), "floating-point"),
        (
            "boundary y",
            lambda: adaln.residual_adaln_modulate(x, x[:, :2], None, v, v),
            "y must have x's shape",
        ),
        ("boundary gate", lambda: adaln.residual_adaln_modulate(x, x, v[:1], v, v), "gate must have shape"),
        ("residual gate", lambda: residual.gated_residual(x, v.T, x), "gate must have shape"),
        ("loss shapes", lambda: flow_loss.flow_loss(img, img[:1], img, t), "must share one shape"),
        ("loss t", lambda: flow_loss.flow_loss(img, img, img, t[:1]), "t and weight must have shape"),
        ("loss nbins", lambda: flow_loss.flow_loss(img, img, img, t, nbins=0), "nbins must be >= 1"),
        ("width", lambda: adaln.adaln_modulate(wide, wide[0], wide[0]), "limit"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_is_a_one_line_error(case):
    """Each misuse raises ValueError with one line that names the argument and what is wrong."""
    _, call, pattern = _bad_calls()[case]
    with pytest.raises(ValueError, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, raw, want",
    [
        ("NANODIT_BWD_TILES", "2048,4,16", (2048, 4, 16)),
        ("NANODIT_FWD_TILES", "512,1", (512, 1)),
        ("NANODIT_RES_BWD_TILES", "4096,8", (4096, 8)),
        ("NANODIT_BWD_TILES", "2048,4", None),
        ("NANODIT_FWD_TILES", "1000,2", None),
        ("NANODIT_FWD_TILES", "a,b", None),
        ("NANODIT_BWD_TILES", "2048,0,4", None),
    ],
)
def test_tile_override_from_the_environment(monkeypatch, name, raw, want):
    """A sweep's winner can be set without editing code; a malformed value is a one-line error naming it."""
    n = 3 if name == "NANODIT_BWD_TILES" else 2
    monkeypatch.setenv(name, raw)
    if want is None:
        with pytest.raises(ValueError, match=name) as info:
            tiling._env_ints(name, n)
        assert "\n" not in str(info.value)
    else:
        assert tiling._env_ints(name, n) == want
    monkeypatch.delenv(name)
    assert tiling._env_ints(name, n) is None


def test_backward_is_bitwise_deterministic():
    """The two-stage reductions over T (dshift, dscale, dgate) give identical bits run after run."""
    T = 1024 if DEVICE.type == "cuda" else 45
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    x = torch.randn(3, T, 384, device=DEVICE, dtype=dtype)
    y = torch.randn_like(x)
    mod = torch.randn(3, 6 * 384, device=DEVICE, dtype=dtype)

    def grads():
        m = mod.clone().requires_grad_(True)
        shift, scale, gate = m.chunk(6, 1)[:3]
        xn, h = adaln.residual_adaln_modulate(x, y, gate, shift, scale)
        out = residual.gated_residual(xn, gate, adaln.adaln_modulate(h, scale, shift))
        (g,) = torch.autograd.grad(out.float().square().sum(), [m])
        return g

    first = grads()
    assert all(torch.equal(first, grads()) for _ in range(2))


@pytest.mark.parametrize("suffix", ["", pytest.param("_tt", marks=pytest.mark.gpu)], ids=["custom", "triton"])
def test_custom_ops_pass_opcheck(suffix):
    """torch.library.opcheck: schemas, fake (meta) impls, autograd registration and AOT dispatch agree, for
    both compile doors (custom ops; triton ops, GPU only)."""
    x, y = torch.randn(2, 5, 48, device=DEVICE, requires_grad=True), torch.randn(2, 5, 48, device=DEVICE)
    shift, scale, gate = (p.requires_grad_(True) for p in make_vecs(2, 48, 3, torch.float32, False))
    v, x0 = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True), torch.randn(2, 3, 4, 4, device=DEVICE)
    op = lambda name: getattr(torch.ops.nanodit, name + suffix)
    calls = [
        (op("adaln_modulate"), (x, shift, scale)),
        (op("gated_residual"), (x, gate, y)),
        (op("residual_adaln_modulate"), (x, y, gate, shift, scale)),
        (op("residual_adaln_modulate"), (x, y, None, shift, scale)),
        (op("flow_loss"), (v, x0, x0, torch.rand(2, device=DEVICE), None, 10, True)),
        (
            op("flow_loss"),
            (v.detach(), x0, x0, torch.rand(2, device=DEVICE), torch.rand(2, device=DEVICE), 3, False),
        ),
    ]
    for fn, args in calls:
        torch.library.opcheck(fn, args)


def test_reference_twins_are_the_ones_beside_the_kernels():
    """Each kernel module re-exports its *_ref twin unchanged (one spec, no drift)."""
    assert adaln.adaln_modulate_ref is ref.adaln_modulate_ref
    assert adaln.residual_adaln_modulate_ref is ref.residual_adaln_modulate_ref
    assert residual.gated_residual_ref is ref.gated_residual_ref
    assert flow_loss.flow_loss_ref is ref.flow_loss_ref


def test_custom_op_door_equals_eager_door():
    """Under torch.compile the ops go through torch.ops.nanodit.*; eagerly through autograd.Functions.
    Both run the same launchers, so outputs and gradients must be bitwise equal. (The adaLN library ops
    also return the LayerNorm statistics, last, which the public functions drop.)"""
    x, y = torch.randn(2, 9, 80, device=DEVICE), torch.randn(2, 9, 80, device=DEVICE)
    mod = torch.randn(2, 6 * 80, device=DEVICE)
    v, x0, eps = (torch.randn(3, 4, 5, 5, device=DEVICE) for _ in range(3))
    t, w = torch.rand(3, device=DEVICE), torch.rand(3, device=DEVICE)
    ops = torch.ops.nanodit
    c = lambda m: m.chunk(6, 1)  # 6 x (B, D)
    pairs = [
        (lambda a, m: adaln.adaln_modulate(a, *c(m)[:2]), lambda a, m: ops.adaln_modulate(a, *c(m)[:2])[0]),
        (lambda a, m: residual.gated_residual(a, c(m)[2], y), lambda a, m: ops.gated_residual(a, c(m)[2], y)),
        (lambda a, m: adaln.residual_adaln_modulate(a, y, c(m)[2], *c(m)[:2]),
         lambda a, m: ops.residual_adaln_modulate(a, y, c(m)[2], *c(m)[:2])[:2]),
        (lambda a, m: adaln.residual_adaln_modulate(a, y, None, *c(m)[:2]),
         lambda a, m: ops.residual_adaln_modulate(a, y, None, *c(m)[:2])[:2]),
    ]  # fmt: skip
    for eager, op in pairs:
        results = []
        for fn in (eager, op):
            a, m = x.clone().requires_grad_(True), mod.clone().requires_grad_(True)
            outs = fn(a, m)
            outs = outs if isinstance(outs, tuple) else (outs,)
            results.append([*outs, *torch.autograd.grad(sum(o.square().sum() for o in outs), [a, m])])
        assert all(torch.equal(p, q) for p, q in zip(*results))
    results = []
    for call in (
        lambda vv: flow_loss.flow_loss(vv, x0, eps, t, w, 7),
        lambda vv: ops.flow_loss(vv, x0, eps, t, w, 7, True),
    ):
        vv = v.clone().requires_grad_(True)
        ps, bs, bc = call(vv)[:3]
        results.append([ps, bs, bc, *torch.autograd.grad(ps.square().sum(), [vv])])
    assert all(torch.equal(p, q) for p, q in zip(*results))


@pytest.mark.parametrize("B", [1, 3, 16, 64, 256, 1000])
@pytest.mark.parametrize("T", [1, 7, 1024])
@pytest.mark.parametrize("resident", [1, 6, 8])
def test_backward_grid_is_one_full_wave(monkeypatch, B, T, resident):
    """t_blocks covers every tile of every sample, never asks for more programs than the SMs hold at once
    (unless one per sample is already more), and leaves no SM idle when the samples can be split further."""
    monkeypatch.setattr(grid, "sm_count", lambda device: 132)
    rows = 2
    nblk, tiles = grid.t_blocks(B, T, rows, torch.device("cuda"), resident)
    n_tiles = -(-T // rows)
    assert nblk * tiles >= n_tiles and (nblk - 1) * tiles < n_tiles  # every tile, no empty block
    slots = resident * 132
    assert B * nblk <= max(slots, B)
    if nblk < n_tiles:  # could have split further: then the wave is nearly full
        assert B * (nblk + 1) > slots or B * nblk > slots // 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [384, 1024])
def test_backward_kernels_fit_without_spills(monkeypatch, dtype, D):
    """The backward kernels at the default tiles compile without register spills at the model's widths
    (aligned rows), and resident_per_sm agrees with the registers the compiled kernel reports (the grid of
    t_blocks is sized from it). Odd widths (narrow loads) may spill a few registers: not checked here."""
    monkeypatch.setattr(grid, "_RESIDENT", {})  # only this test's kernels
    monkeypatch.setattr(grid, "RESOURCES", {})
    x = torch.randn(2, 64, D, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.randn_like(x, requires_grad=True)
    shift, scale, gate = (p.requires_grad_(True) for p in make_vecs(2, D, 3, dtype, True))
    outs = [*adaln.residual_adaln_modulate(x, y, gate, shift, scale), adaln.adaln_modulate(x, shift, scale)]
    outs += [*adaln.residual_adaln_modulate(x, y, None, shift, scale), residual.gated_residual(x, gate, y)]
    torch.autograd.grad(sum(o.float().sum() for o in outs), [x, y, shift, scale, gate])
    checked = 0
    for key, per_sm in grid._RESIDENT.items():
        meta = dict(key[2])
        n_regs, n_spills, _ = grid.RESOURCES[key]
        assert n_spills == 0, f"{key[0].fn.__name__} {key[1]} {meta}: {n_spills} spilled registers"
        assert 1 <= per_sm <= 32 and (per_sm == 32 or per_sm * n_regs * 32 * meta["num_warps"] <= 65536)
        checked += 1
    assert checked >= 3


def test_resident_per_sm_takes_symbolic_sizes():
    """Under torch.compile with dynamic shapes the launchers see SymInts (unhashable: they cannot key the
    cache, and nothing can be compiled for them): resident_per_sm answers SYMBOLIC_RESIDENT without compiling.
    (opcheck's dynamic AOT-dispatch test on the GPU failed on exactly this before.)"""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    sym = ShapeEnv().create_unbacked_symint()
    for args, meta in (((torch.float32, sym, 16), {"ROWS": 2}), ((torch.float32, 8, 16), {"ROWS": sym})):
        got = grid.resident_per_sm(adaln._modulate_bwd_kernel, args, meta, torch.device("cuda"))
        assert got == grid.SYMBOLIC_RESIDENT


def test_t_blocks_under_symbolic_sizes_is_one_division():
    """In a dynamic-shape trace the backward grid is cdiv(T, rows * SYMBOLIC_TILES) with SYMBOLIC_TILES tiles
    a block: enough programs for every tile at any size, and no min/max chain for sympy to simplify (that
    chain kept opcheck's dynamic AOT-dispatch test on the GPU busy for minutes)."""
    import sympy
    from torch.fx.experimental.proxy_tensor import make_fx

    rows = 16

    def n_blocks(x):
        nblk, tiles = grid.t_blocks(x.shape[0], x.shape[1], rows, torch.device("cuda"), 4)
        assert tiles == grid.SYMBOLIC_TILES
        return x.new_zeros(nblk)

    gm = make_fx(n_blocks, tracing_mode="symbolic")(torch.randn(3, 100, 8))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    expr = out.meta["val"].shape[0].node.expr
    assert not expr.atoms(sympy.Min, sympy.Max), f"grid size {expr} is not one division"
    for B, T in ((1, 1), (5, 64), (2, 1000), (7, 1025)):
        nblk = gm(torch.randn(B, T, 8)).numel()
        assert nblk * grid.SYMBOLIC_TILES * rows >= T > (nblk - 1) * grid.SYMBOLIC_TILES * rows


def test_host_cdiv_and_next_pow2_match_triton():
    """The launchers' plain-Python cdiv / next_pow2 (triton's are jit functions, ~5 us a host call) agree with
    triton.cdiv / triton.next_power_of_2."""
    import triton

    assert all(grid.next_pow2(n) == triton.next_power_of_2(n) for n in range(1, 4100))
    assert all(grid.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 200) for b in range(1, 40))
