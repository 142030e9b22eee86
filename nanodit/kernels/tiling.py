"""Tile sizes of the row kernels, read once: the measured defaults, overridden by the environment.

A row kernel holds a [ROWS, BLOCK_D] tile in registers: BLOCK_D = next power of two >= D (the tail is masked),
ROWS so a tile is FWD_TILE / BWD_TILE elements; many small programs per SM keep the ~30 KB/SM in flight that
HBM3e needs at ~1 us latency, and the adaLN backward loops are pipelined by Triton
(``tl.range(num_stages=BWD_STAGES)``: the next tiles' loads fly while this one computes). Loads are 16-byte
vectors whenever D and the row stride are multiples of 16 (Triton specialises integer arguments divisible by 16,
so D and every stride stay specialised: a batch stride of unknown divisibility alone makes every row address
unaligned and the loads scalar); other D still work, with narrower loads. T and loop counts are
``do_not_specialize``: they change values, never the code.

This is the one place the tile knobs live: the launchers read them here at call time (``tiling.BWD_STAGES``), so a
sweep (``bench/bench_kernels.py --sweep``) or a test may set them on the module. Imports no Triton.
"""

from __future__ import annotations

import os

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


def row_config(D: int, bwd: bool, interpreted: bool = False, residual: bool = False) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps) of a row kernel for width D (``residual``: the gated-residual backward)."""
    if D > MAX_D:
        raise ValueError(f"kernels: width D={D} is above the row kernels' limit {MAX_D}; use kernels=ref")
    block_d = 1 << (D - 1).bit_length() if D > 1 else 1  # next power of two
    if bwd:
        tile, warps = (RES_BWD_TILE, RES_BWD_WARPS) if residual else (BWD_TILE, BWD_WARPS)
    else:
        tile, warps = FWD_TILE, FWD_WARPS
    tile = INTERPRET_TILE if interpreted else tile
    # wide rows: keep ~16 elements per thread (two or four 16-byte loads per tensor)
    return block_d, max(1, tile // block_d), max(warps, min(16, block_d // 512))
