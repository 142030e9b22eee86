"""Registers and spills of the adaLN backward kernels for sm_90a, on a machine without a GPU.

    python scripts/ptxas_regs.py

Compiles each kernel at the launchers' default tiles (``tiling.row_config``) for the model widths, bf16 and
fp32, pipeline depths 3 and 4, through Triton's compiler to PTX, then runs the ptxas that ships with the triton
wheel (``ptxas -v``). Arguments are specialised as on the GPU for aligned rows (pointers, D and strides
divisible by 16). The numbers follow the local Triton, not necessarily the GPU machine's (3.6): with triton
3.8 they came within a few registers of Nsight Compute's on the H200 (modulate bwd 127 vs 128).
Do not run it with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanodit.kernels import adaln, tiling

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
TARGET = GPUTarget("cuda", 90, 32)


def regs(fn, types: dict, consts: dict, num_warps: int) -> tuple[int, int]:
    """(registers per thread, spill store bytes) of ``fn`` compiled with these argument types/constexprs."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in consts else types[name]
        if name not in consts and (types[name].startswith("*") or name == "D" or name.startswith("s_")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
        target=TARGET,
        options={"num_warps": num_warps},
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        out = subprocess.run(
            [str(PTXAS), "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return int(re.search(r"Used (\d+) registers", out)[1]), int(
        re.search(r"(\d+) bytes spill stores", out)[1]
    )


def arg_types(names: tuple[str, ...], dt: str) -> dict:
    out = {n: f"*{dt}" for n in names}
    out.update(STATS="*fp32", PART="*fp32", T="i32", D="i32", tiles="i32")
    return out


def main() -> None:
    for D in (384, 1024):
        block_d, rows, warps = tiling.row_config(D, bwd=True)
        for dt in ("bf16", "fp32"):
            mod_t = {
                **arg_types(("DH", "X", "SCALE", "DX"), dt),
                **{k: "i32" for k in adaln._modulate_bwd_kernel.arg_names if k.startswith("s_")},
            }
            res_t = {
                **arg_types(("DXN", "DH", "XN", "Y", "GATE", "SCALE", "DX", "DY"), dt),
                **{k: "i32" for k in adaln._residual_modulate_bwd_kernel.arg_names if k.startswith("s_")},
            }
            for stages in (3, 4):
                tile = dict(ROWS=rows, BLOCK_D=block_d, STAGES=stages)
                cells = [
                    regs(adaln._modulate_bwd_kernel, mod_t, tile, warps),
                    regs(adaln._residual_modulate_bwd_kernel, res_t, dict(HAS_GATE=False, **tile), warps),
                    regs(adaln._residual_modulate_bwd_kernel, res_t, dict(HAS_GATE=True, **tile), warps),
                ]
                row = "  ".join(
                    f"{name} {r} regs / {s} B spilled"
                    for name, (r, s) in zip(("modulate", "residual_modulate", "gated"), cells)
                )
                print(f"D={D} {dt} stages={stages} ({rows} x {block_d}, {warps} warps): {row}", flush=True)


if __name__ == "__main__":
    main()
