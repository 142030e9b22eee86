"""Grid sizes: how many programs a launch gets, from what one SM holds of the compiled kernel.

Reductions over T (dscale, dshift, dgate). A backward program owns a block of consecutive tokens of one sample,
loops over its tiles, and writes one fp32 partial per (b, block, d); a second, small kernel
(``reduce.sum_blocks``) adds the blocks in order. Same shapes -> same order -> bitwise the same result on every run
(no atomics).

Backward grids are one full wave. ``resident_per_sm`` reads the compiled kernel's registers and shared memory
(Triton's ``warmup``: compiles, launches nothing) and gives how many of its programs an SM holds at once;
``t_blocks`` then splits each sample's tokens into floor(resident * SMs / B) blocks. Nsight Compute on an H200
(bench/results/h200-2026-11-27-s4/ncu_*) showed why: the adaLN backward needs 128-185 registers a thread, so an
SM holds 4-8 of its 64-thread programs, and a fixed "4 per SM, rounded up" grid left it at 0.73 waves and 17%
achieved occupancy (rounding up instead makes a second, mostly empty wave).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton

from nanodit.kernels import tiling
from nanodit.kernels.checks import is_interpreted


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


@functools.lru_cache(maxsize=8)
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type != "cuda":
        return 1  # interpreter: few programs, each looping over several tiles (still exercises the 2 stages)
    return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count


def sm_count(device: torch.device) -> int:
    return _sm_count(device.type, device.index)


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
    programs make one full wave: min(resident, tiling.BWD_PROGRAMS_PER_SM) programs on each SM (``resident`` from
    ``resident_per_sm``), rounded down -- a second, partial wave would cost a whole program's time. Fewer,
    longer blocks mean fewer partial sums (B * n_blocks * D fp32 written and read again).

    Symbolic sizes (a dynamic-shape trace) get SYMBOLIC_TILES tiles a block and one floor division: the
    min/max/cdiv chain above, on SymInts, sent sympy's simplifier into minutes of work per launch (opcheck's
    dynamic AOT-dispatch test on an H200 did not finish in 330 s)."""
    if isinstance(B, torch.SymInt) or isinstance(T, torch.SymInt):
        return cdiv(T, rows * SYMBOLIC_TILES), SYMBOLIC_TILES  # == cdiv(cdiv(T, rows), SYMBOLIC_TILES)
    n_tiles = cdiv(T, rows)
    per_sm = min(resident if device.type == "cuda" else tiling.INTERPRET_PROGRAMS, tiling.BWD_PROGRAMS_PER_SM)
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
