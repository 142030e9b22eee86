"""Launch helpers shared by the Triton kernels: tile sizes, grid sizes, device and layout checks,
and the second stage of the (B, D) reductions over T.

Importing this module imports Triton, so only the Triton kernel modules import it (``nanodit.kernels``
itself does not).

Tiles. A row kernel holds a [ROWS, BLOCK_D] tile in registers: BLOCK_D = next power of two >= D
(the tail is masked), ROWS so a tile is FWD_TILE / BWD_TILE elements; many small programs per SM keep
the ~30 KB/SM in flight that HBM3e needs at ~1 us latency, and the adaLN backward loops are pipelined by
Triton (``tl.range(num_stages=BWD_STAGES)``: the next tiles' loads fly while this one computes).
Loads are 16-byte vectors whenever D and the row stride are multiples of 16 (Triton specialises
integer arguments divisible by 16, so D and every stride stay specialised: a batch stride of unknown
divisibility alone makes every row address unaligned and the loads scalar); other D still work, with
narrower loads. T and loop counts are ``do_not_specialize``: they change values, never the code.

Reductions over T (dscale, dshift, dgate). A backward program owns a block of consecutive tokens
of one sample, loops over its tiles, and writes one fp32 partial per (b, block, d); a second,
small kernel (``sum_blocks``) adds the blocks in order and casts to each output's dtype in one launch.
Same shapes -> same order -> bitwise the same result on every run (no atomics).

Backward grids are one full wave. ``resident_per_sm`` reads the compiled kernel's registers and shared
memory (Triton's ``warmup``: compiles, launches nothing) and gives how many of its programs an SM holds at
once; ``t_blocks`` then splits each sample's tokens into floor(resident * SMs / B) blocks. Nsight Compute on
an H200 (bench/results/h200-2026-11-27-s4/ncu_*) showed why: the adaLN backward needs 128-185 registers a
thread, so an SM holds 4-8 of its 64-thread programs, and the old fixed "4 per SM, rounded up" grid left it
at 0.73 waves and 17% achieved occupancy (rounding up instead makes a second, mostly empty wave).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

MAX_D = 32768  # one row must fit a program's registers
# Tile sizes (elements of one [ROWS, BLOCK_D] tile), warps and pipelining stages: the winners of
# `bench_kernels.py --sweep` on an H200 (bf16, D=384, % of copy bandwidth over the nano and large shapes);
# the measurements: bench/results/h200-2026-11-27-s4/kernels_sweep.txt (3 stages: no register spills at the
# model widths, scripts/ptxas_regs.py). NANODIT_{FWD,BWD,RES_BWD}_TILES / NANODIT_BWD_STAGES override them.
FWD_TILE, FWD_WARPS = 1024, 1
BWD_TILE, BWD_WARPS = 1024, 2
BWD_STAGES = 3  # tl.range(num_stages=...) of the adaLN backward loops; 1 = no pipelining
RES_BWD_TILE, RES_BWD_WARPS = 2048, 2
BWD_PROGRAMS_PER_SM = 32  # cap on backward programs per SM; the grid fills what fits (resident_per_sm)


def _env_ints(name: str, n: int) -> tuple[int, ...] | None:
    """Override a tile config from the environment (another card, a sweep's winner) without editing code:
    NANODIT_FWD_TILES=tile,warps, NANODIT_BWD_TILES=tile,warps,max_programs_per_sm (adaLN backward),
    NANODIT_RES_BWD_TILES=tile,warps (gated-residual backward); a malformed value is a one-line error."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        vals = tuple(int(v) for v in raw.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n or any(v <= 0 for v in vals) or vals[0] & (vals[0] - 1):
        raise ValueError(
            f"{name}={raw!r}: expected {n} positive integers 'tile,warps{',programs_per_sm' * (n == 3)}'"
            " with tile a power of two"
        )
    return vals


FWD_TILE, FWD_WARPS = _env_ints("NANODIT_FWD_TILES", 2) or (FWD_TILE, FWD_WARPS)
BWD_TILE, BWD_WARPS, BWD_PROGRAMS_PER_SM = _env_ints("NANODIT_BWD_TILES", 3) or (
    BWD_TILE,
    BWD_WARPS,
    BWD_PROGRAMS_PER_SM,
)
RES_BWD_TILE, RES_BWD_WARPS = _env_ints("NANODIT_RES_BWD_TILES", 2) or (RES_BWD_TILE, RES_BWD_WARPS)
if os.environ.get("NANODIT_BWD_STAGES"):
    _raw = os.environ["NANODIT_BWD_STAGES"]
    if not _raw.isdigit() or not 1 <= int(_raw) <= 8:
        raise ValueError(f"NANODIT_BWD_STAGES={_raw!r}: expected 1..8 (pipeline stages; 1 = none)")
    BWD_STAGES = int(_raw)
INTERPRET_TILE = 2048  # CPU interpreter: fewer, larger programs (speed there is Python's), still multi-tile
INTERPRET_PROGRAMS = 4  # CPU interpreter: backward programs in all (its one "SM"), each looping over tiles


# How the ops reach a torch.compile graph (read at trace time; tests and benchmarks flip it, then reset dynamo):
#   "triton_op": torch.library.triton_op + wrap_triton. Inductor sees the Triton kernels and launches them from
#                its generated code (no dispatcher, no Python launcher per call) -- the default on a GPU;
#   "custom_op": torch.library.custom_op, an opaque node that calls the Python launchers at run time. Used
#                whenever the kernels run in Triton's interpreter (CPU CI), which wrap_triton cannot trace.
COMPILE_DOOR = os.environ.get("NANODIT_COMPILE_DOOR", "triton_op")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. ``triton.cdiv`` is a ``@triton.jit`` function, and calling one from Python goes
    through JITFunction.__call__: ~5 us each, a third of the launchers' own host time (cProfile, stubbed launches)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two >= n (n >= 1) on the host; symbolic sizes go through Triton's version."""
    if isinstance(n, int):
        return 1 << (n - 1).bit_length() if n > 1 else 1
    return triton.next_power_of_2(n)


def partial_tile(nblk: int, cap: int = 32) -> int:
    """How many per-block partials a finishing kernel loads at once: min(cap, next_pow2(nblk)); ``cap`` when
    nblk is symbolic (the loads are masked, and a constexpr must not be a SymInt)."""
    return cap if isinstance(nblk, torch.SymInt) else min(cap, next_pow2(nblk))


def is_interpreted(kernel) -> bool:
    """True when Triton runs ``kernel`` in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, *tensors: torch.Tensor) -> None:
    """CUDA tensors, or any tensors under the interpreter; a one-line error otherwise."""
    if is_interpreted(kernel):
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise ValueError(
                f"model.kernels=triton needs CUDA tensors (got {t.device.type}); "
                "on CPU use kernels=ref, or TRITON_INTERPRET=1 for the (slow) interpreter"
            )


@functools.lru_cache(maxsize=8)
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type != "cuda":
        return 1  # interpreter: few programs, each looping over several tiles (still exercises the 2 stages)
    return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count


def sm_count(device: torch.device) -> int:
    return _sm_count(device.type, device.index)


def row_config(D: int, bwd: bool, interpreted: bool = False, residual: bool = False) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps) of a row kernel for width D (``residual``: the gated-residual backward)."""
    if D > MAX_D:
        raise ValueError(f"kernels: width D={D} is above the row kernels' limit {MAX_D}; use kernels=ref")
    block_d = next_pow2(D)
    if bwd:
        tile, warps = (RES_BWD_TILE, RES_BWD_WARPS) if residual else (BWD_TILE, BWD_WARPS)
    else:
        tile, warps = FWD_TILE, FWD_WARPS
    tile = INTERPRET_TILE if interpreted else tile
    # wide rows: keep ~16 elements per thread (two or four 16-byte loads per tensor)
    return block_d, max(1, tile // block_d), max(warps, min(16, block_d // 512))


_RESIDENT: dict = {}
SYMBOLIC_RESIDENT = 4  # programs per SM assumed where sizes are symbolic (torch.compile with dynamic shapes)
SYMBOLIC_TILES = 4  # row tiles per backward program where sizes are symbolic (t_blocks)
RESOURCES: dict = {}  # same keys: (registers a thread, spilled registers, shared bytes) of the compiled kernel


def resident_per_sm(kernel, args: tuple, meta: dict, device: torch.device) -> int:
    """Programs of ``kernel`` one SM runs at once, launched with ``args`` (tensors, or their dtypes where the
    tensor does not exist yet) and the constexprs / ``num_warps`` in ``meta``: the least of the register,
    shared-memory, thread and block limits of the compiled kernel. Cached per specialisation; 1 under the
    interpreter (CPU), where programs run one after another."""
    if any(isinstance(a, torch.SymInt) for a in (*args, *meta.values())):
        return SYMBOLIC_RESIDENT  # a dynamic-shape trace: nothing to compile until the sizes are known
    if is_interpreted(kernel) or device.type != "cuda":
        return 1
    spec = tuple(
        a.dtype if isinstance(a, torch.Tensor) else (a % 16 == 0, a == 1) if isinstance(a, int) else a
        for a in args
    )  # what Triton specialises on: dtypes, integers divisible by 16 or equal to 1
    key = (kernel, spec, tuple(sorted(meta.items())), device.index)
    if key not in _RESIDENT:
        stand_ins = [a.dtype if isinstance(a, torch.Tensor) else a for a in args]  # warmup takes dtypes
        with torch.cuda.device(device):
            compiled = kernel.warmup(*stand_ins, grid=(1,), **meta)
            compiled._init_handles()  # loads the binary: n_regs
        props = torch.cuda.get_device_properties(device)
        warps = compiled.metadata.num_warps
        regs_per_warp = cdiv(compiled.n_regs * 32, 256) * 256  # allocated per warp, 256 at a time
        by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs_per_warp // warps
        by_threads = props.max_threads_per_multi_processor // (32 * warps)
        smem = compiled.metadata.shared + 1024  # the driver reserves 1 KB a block
        by_smem = props.shared_memory_per_multiprocessor // smem
        _RESIDENT[key] = max(1, min(by_regs, by_threads, by_smem, 32))
        RESOURCES[key] = (compiled.n_regs, compiled.n_spills, compiled.metadata.shared)
    return _RESIDENT[key]


def t_blocks(B: int, T: int, rows: int, device: torch.device, resident: int) -> tuple[int, int]:
    """(n_blocks, tiles_per_block): split each sample's T tokens into blocks so that the B * n_blocks
    programs make one full wave: min(resident, BWD_PROGRAMS_PER_SM) programs on each SM (``resident`` from
    ``resident_per_sm``), rounded down -- a second, partial wave would cost a whole program's time. Fewer,
    longer blocks mean fewer partial sums (B * n_blocks * D fp32 written and read again).

    Symbolic sizes (a dynamic-shape trace) get SYMBOLIC_TILES tiles a block and one floor division: the
    min/max/cdiv chain above, on SymInts, sent sympy's simplifier into minutes of work per launch (opcheck's
    dynamic AOT-dispatch test on an H200 did not finish in 330 s)."""
    if isinstance(B, torch.SymInt) or isinstance(T, torch.SymInt):
        return cdiv(T, rows * SYMBOLIC_TILES), SYMBOLIC_TILES  # == cdiv(cdiv(T, rows), SYMBOLIC_TILES)
    n_tiles = cdiv(T, rows)
    per_sm = min(resident if device.type == "cuda" else INTERPRET_PROGRAMS, BWD_PROGRAMS_PER_SM)
    n_blocks = min(n_tiles, max(1, per_sm * sm_count(device) // B))
    tiles = cdiv(n_tiles, n_blocks)
    return cdiv(n_tiles, tiles), tiles


def wave_blocks(
    kernel, args: Callable, meta: dict, B: int, T: int, rows: int, device: torch.device
) -> tuple[int, int]:
    """``t_blocks`` for ``kernel`` launched as ``kernel[(n_blocks, B)](*args(part, tiles), **meta)``: how many
    programs an SM holds comes from the kernel compiled for those arguments (``resident_per_sm``; the partials
    buffer does not exist yet, so its dtype stands in)."""
    resident = resident_per_sm(kernel, args(torch.float32, 1), meta, device)
    return t_blocks(B, T, rows, device, resident)


def rows3d(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) with unit stride along D (copied only when it is not); B/T strides stay free."""
    return x if x.stride(-1) == 1 else x.contiguous()


def rows2d(p: torch.Tensor) -> torch.Tensor:
    """Per-sample vector (B, D) with unit stride along D; chunk() slices of (B, kD) pass as they are."""
    return p if p.stride(-1) == 1 else p.contiguous()


def check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: expected x of shape (B, T, D), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point x, got {x.dtype}")


def check_vec(name: str, key: str, p: torch.Tensor, x: torch.Tensor) -> None:
    B, _, D = x.shape
    if tuple(p.shape) != (B, D):
        raise ValueError(f"{name}: {key} must have shape (B, D) = {(B, D)}, got {tuple(p.shape)}")
    if not p.dtype.is_floating_point:
        raise ValueError(f"{name}: {key} must be floating-point, got {p.dtype}")


@triton.jit(do_not_specialize=["BD", "plane", "nblk"])
def _sum_blocks_kernel(
    PART, OUT0, OUT1, OUT2, BD, plane, D, nblk, K: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr
):
    """OUTk[b, d] = sum_j PART[k, b, j, d]; PART (K, B, nblk, D) fp32. NB blocks at a time are loaded as
    one [NB, BLOCK] tile and tree-summed: the same order on every run."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat b * D + d
    m = offs < BD
    base = (offs // D).to(tl.int64) * nblk * D + offs % D
    # plane = BD * nblk comes from the host (an i64 argument when it needs one): a scalar argument may reach
    # this code as a Python int (Inductor's mutation analysis of the kernel), which has no .to()
    js = tl.arange(0, NB)
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, nblk, NB):
        ptr = PART + base[None, :] + (j0 + js)[:, None] * D
        mm = (j0 + js < nblk)[:, None] & m[None, :]
        acc0 += tl.sum(tl.load(ptr, mask=mm, other=0.0), axis=0)
        if K > 1:
            acc1 += tl.sum(tl.load(ptr + plane, mask=mm, other=0.0), axis=0)
        if K > 2:
            acc2 += tl.sum(tl.load(ptr + 2 * plane, mask=mm, other=0.0), axis=0)
    tl.store(OUT0 + offs, acc0.to(OUT0.dtype.element_ty), mask=m)
    if K > 1:
        tl.store(OUT1 + offs, acc1.to(OUT1.dtype.element_ty), mask=m)
    if K > 2:
        tl.store(OUT2 + offs, acc2.to(OUT2.dtype.element_ty), mask=m)


def target(kernel, traced: bool):
    """What a launcher indexes with its grid: the kernel itself, or (inside a triton_op body, ``traced``) the
    kernel wrapped so make_fx/Inductor record the launch instead of running it."""
    return torch.library.wrap_triton(kernel) if traced else kernel


def sum_blocks(
    part: torch.Tensor, dtypes: tuple[torch.dtype, ...], traced: bool = False
) -> tuple[torch.Tensor, ...]:
    """Second stage: (K, B, nblk, D) fp32 partials -> K separate (B, D) tensors in ``dtypes``, fixed order."""
    K, B, nblk, D = part.shape
    outs = tuple(torch.empty((B, D), dtype=dt, device=part.device) for dt in dtypes)
    # unused pointers when K < 3: the (read-only) partials, never an output -- two arguments aliasing one
    # output would be two separate results after functionalization (Inductor's view of the kernel)
    o = outs + (part,) * (3 - K)
    block, nb = 128, partial_tile(nblk)
    target(_sum_blocks_kernel, traced)[(cdiv(B * D, block),)](
        part, o[0], o[1], o[2], B * D, B * D * nblk, D, nblk, K=K, NB=nb, BLOCK=block, num_warps=4
    )
    return outs


_SCHEMA_TYPES = {
    "Tensor": torch.Tensor,
    "Tensor?": torch.Tensor | None,
    "int": int,
    "bool": bool,
    "float": float,
    "ScalarType": torch.dtype,
}


def signature_of(schema: str) -> inspect.Signature:
    """The annotated Python signature of an op schema such as ``(Tensor x, Tensor? g, int n) -> (Tensor, Tensor)``
    (only the types our ops use)."""
    args, ret = schema.split("->")
    params = []
    for arg in filter(None, (a.strip() for a in args.strip()[1:-1].split(","))):
        typ, name = arg.rsplit(" ", 1)
        params.append(
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_SCHEMA_TYPES[typ])
        )
    outs = [_SCHEMA_TYPES[r.strip()] for r in ret.strip().strip("()").split(",")]
    return inspect.Signature(params, return_annotation=outs[0] if len(outs) == 1 else tuple[tuple(outs)])


class CompileDoors:
    """The two torch.compile doors of one fused op (see COMPILE_DOOR), registered from one formula.

    ``fwd(*args, traced=False)`` and ``bwd(*args, traced=False)`` are the launchers; ``setup_context`` and
    ``backward(ctx, *grads, bwd_op)`` the autograd formula the eager autograd.Function uses too. Registers
    ``nanodit::{name}`` / ``{name}_bwd`` (custom ops, with the given fake impls) and ``nanodit::{name}_tt`` /
    ``{name}_bwd_tt`` (triton ops: fake impls derived by tracing the launchers with fake tensors).
    """

    def __init__(
        self,
        name: str,
        probe: object,
        fwd: Callable,
        bwd: Callable,
        fwd_schema: str,
        bwd_schema: str,
        fake_fwd: Callable,
        fake_bwd: Callable,
        setup_context: Callable,
        backward: Callable,
    ):
        self.interpreted = is_interpreted(
            probe
        )  # a bool, fixed at import (dynamo cannot isinstance a kernel)

        def doors(suffix: str, traced: bool, register: Callable):
            f = register(f"nanodit::{name}{suffix}", lambda *a, **k: fwd(*a, **k, traced=traced), fwd_schema)
            b = register(
                f"nanodit::{name}_bwd{suffix}", lambda *a, **k: bwd(*a, **k, traced=traced), bwd_schema
            )
            return f, b

        def custom(qualname, fn, schema):
            return torch.library.custom_op(qualname, fn, mutates_args=(), schema=schema)

        def triton_op(qualname, fn, schema):
            # torch <= 2.11 infers a triton op's schema from the Python signature even when one is given
            fn.__signature__ = signature_of(schema)
            return torch.library.triton_op(qualname, fn, mutates_args=(), schema=schema)

        self.custom, custom_bwd = doors("", False, custom)
        self.custom.register_fake(fake_fwd)
        custom_bwd.register_fake(fake_bwd)
        self.triton, triton_bwd = doors("_tt", True, triton_op)
        for op, bop in ((self.custom, custom_bwd), (self.triton, triton_bwd)):
            op.register_autograd(
                functools.partial(_backward_with, backward, bop), setup_context=setup_context
            )

    def __call__(self, *args):
        """The op inside a torch.compile trace."""
        use_triton = COMPILE_DOOR == "triton_op" and not self.interpreted
        return (self.triton if use_triton else self.custom)(*args)


def _backward_with(backward: Callable, bwd_op: Callable, ctx, *grads):
    return backward(ctx, *grads, bwd_op)
