"""Kernel benchmarks: each fused op, forward and backward, against eager and compiled PyTorch.

    pytest bench/bench_kernels.py --benchmark-only [--benchmark-json FILE]   # pytest-benchmark, GPU only
    python bench/bench_kernels.py --out FILE.json [--shapes nano,large] [--kernels modulate,...]
    python bench/bench_kernels.py --table FILE.json      # the summary table of a saved run (either kind)
    python bench/bench_kernels.py --sweep                # tile configs of the row kernels (nanodit/kernels/tiling.py)

Providers: ``ref`` (the *_ref twin, eager), ``compile`` (torch.compile of the twin), ``triton`` (the op).
Shapes: rows (B, T, D) bf16 — nano (16, 1024, 384) and large (256, 1024, 384), the latter several times
the L2; flow_loss on latents (B, 16, 64, 64) with B = 16 / 256. Backward = one ``torch.autograd.grad``
through the op's graph. Two times per case, after warm-up (compilation included in the warm-up):
- ``ms``: GPU time per call — the calls captured in a CUDA graph and replayed (median of 20 replays),
  cycling through enough input sets that a pass is >= 3x the L2, so the data comes from HBM. Host
  launch cost is out of it, as in a CUDA-graphed training step. GB/s and % copy come from this.
- ``ms_eager``: wall clock per call of back-to-back eager calls (the slower of host and GPU): what an
  un-graphed eager or compiled step pays, launch overhead included.

Bytes model (the fewest bytes each op must move: every input read once, every output written once; the
(B, D) vectors are left out). N = B*T*D, M = B*16*64*64, e = 2 (bf16):
| kernel | fwd | bwd |
|---|---|---|
| modulate | x, h: 2Ne | x, dh, dx: 3Ne |
| gated_residual | x, y, out: 3Ne | dout, y, dy: 3Ne (dx = dout) |
| residual_modulate (no gate, as in the model) | x, y, x_new, h: 4Ne | x_new, dx_new, dh, dx (= dy): 4Ne |
| residual_modulate_gated | 4Ne | x_new, dx_new, dh, y, dx, dy: 6Ne |
| flow_loss | v, x0, eps, dL/dv: 4Me | dL/dv, dv: 2Me; fwdbwd: 6Me |
GB/s = that count / time, the same count for every provider (so it reads as speed); % copy = GB/s over
the card's device-to-device copy bandwidth measured in the same run (1 GiB copy, read + write bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROW_SHAPES = {"nano": (16, 1024, 384), "large": (256, 1024, 384)}
LOSS_SHAPES = {"nano": (16, 16, 64, 64), "large": (256, 16, 64, 64)}
DTYPE = torch.bfloat16
PROVIDERS = ("ref", "compile", "triton")
# kernel -> (directions, bytes per element of the row / latent tensor for each direction)
KERNELS = {
    "modulate": {"fwd": 2, "bwd": 3},
    "gated_residual": {"fwd": 3, "bwd": 3},
    "residual_modulate": {"fwd": 4, "bwd": 4},
    "residual_modulate_gated": {"fwd": 4, "bwd": 6},
    "flow_loss": {"fwd": 4, "bwd": 2, "fwdbwd": 6},
}
CASES = [(k, d, p, s) for k, dirs in KERNELS.items() for d in dirs for s in ROW_SHAPES for p in PROVIDERS]


# ---------------------------------------------------------------------------------------------
# the ops under test


def _op(kernel: str, ops):
    """kernel name -> f(*inputs) -> tuple of differentiable outputs, through an op set (ref or triton)."""
    if kernel == "modulate":
        return lambda x, mod: (ops.modulate(x, *mod.chunk(6, dim=1)[:2]),)
    if kernel == "gated_residual":
        return lambda x, y, mod: (ops.gated_residual(x, mod.chunk(6, dim=1)[2], y),)
    if kernel == "residual_modulate":
        return lambda x, y, mod: ops.residual_modulate(x, y, None, *mod.chunk(6, dim=1)[:2])
    if kernel == "residual_modulate_gated":
        return lambda x, y, mod: ops.residual_modulate(x, y, mod.chunk(6, dim=1)[2], *mod.chunk(6, dim=1)[:2])
    if kernel == "flow_loss":
        return lambda v, x0, eps, t: (ops.flow_loss(v, x0, eps, t)[0],)
    raise ValueError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}")


def _inputs(kernel: str, shape: str, device) -> tuple[list[torch.Tensor], list[int]]:
    """Fresh random inputs and the indices of those that take a gradient."""
    if kernel == "flow_loss":
        v, x0, eps = (torch.randn(LOSS_SHAPES[shape], device=device, dtype=DTYPE) for _ in range(3))
        return [v, x0, eps, torch.rand(v.shape[0], device=device)], [0]
    B, T, D = ROW_SHAPES[shape]
    mod = 0.5 * torch.randn(B, 6 * D, device=device, dtype=DTYPE)  # shift/scale/gate: chunk() slices
    x, y = torch.randn(B, T, D, device=device, dtype=DTYPE), torch.randn(B, T, D, device=device, dtype=DTYPE)
    if kernel == "modulate":
        return [x, mod], [0, 1]
    return [x, y, mod], [0, 1, 2]


def nbytes(kernel: str, direction: str, shape: str) -> int:
    numel = torch.Size(LOSS_SHAPES[shape] if kernel == "flow_loss" else ROW_SHAPES[shape]).numel()
    return KERNELS[kernel][direction] * numel * DTYPE.itemsize


_COMPILED: dict = {}
L2_BYTES = 60 << 20  # H200 60 MB, H100 50 MB: the larger, so rotation always leaves the L2 cold


def make_case(kernel: str, direction: str, provider: str, shape: str, sets: int = 1, device="cuda"):
    """A no-argument callable running one (kernel, direction, provider, shape) once on each of ``sets``
    independent input sets (so repeated runs do not find the data in the L2), warmed up."""
    from nanodit.kernels import get_ops

    if provider == "compile":
        if kernel not in _COMPILED:  # one compiled twin per kernel; each shape is its own graph
            _COMPILED[kernel] = torch.compile(_op(kernel, get_ops("ref")), dynamic=False)
        fn = _COMPILED[kernel]
    else:
        fn = _op(kernel, get_ops("ref" if provider == "ref" else "triton"))
    runs = [_one_run(fn, kernel, direction, shape, device) for _ in range(sets)]
    run = runs[0] if sets == 1 else lambda: [r() for r in runs]
    for _ in range(3):  # compile (forward and backward graphs), caches
        run()
    torch.cuda.synchronize()
    return run


def _one_run(fn, kernel, direction, shape, device):
    inputs, diff = _inputs(kernel, shape, device)
    leaves = [a.requires_grad_(True) if i in diff else a for i, a in enumerate(inputs)]
    grad_of = [leaves[i] for i in diff]
    outs = fn(*leaves)
    cots = [torch.randn_like(o) for o in outs]
    if direction == "fwd":
        return lambda: fn(*leaves)
    if direction == "fwdbwd":
        return lambda: torch.autograd.grad(fn(*leaves), grad_of, cots)
    return lambda: torch.autograd.grad(outs, grad_of, cots, retain_graph=True)  # backward alone


def rotation(kernel: str, direction: str, shape: str) -> int:
    """Input sets to cycle through so one pass over them is >= 3x the L2 (1 at the large shape)."""
    return max(1, -(-3 * L2_BYTES // nbytes(kernel, direction, shape)))


def time_ms(run) -> float:
    """Median milliseconds of CUDA-event timed calls, L2 flushed before each (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"))


def graph_ms(run, calls: int, stream: torch.cuda.Stream, reps: int = 20) -> float:
    """Median GPU milliseconds per call: ``run`` (``calls`` calls on rotating input sets) captured once in
    a CUDA graph and replayed, so host launch overhead is out of the number (as under CUDA graphs).
    ``run`` must have been set up and warmed up on ``stream`` (autograd replays the backward there)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        run()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def eager_ms(run, calls: int, reps: int = 20) -> float:
    """Wall-clock milliseconds per call of back-to-back eager calls: the slower of host and GPU."""
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps / calls


def copy_bandwidth_gbs(device="cuda") -> float:
    """Device-to-device copy of 1 GiB, counting bytes read + written (the card's practical ceiling)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def measure(kernel: str, direction: str, provider: str, shape: str, then=None) -> dict:
    """GPU ms per call (CUDA-graph replay over rotating input sets) and eager wall ms per call.
    ``then(run)``, if given, is called with the warmed-up callable (``sets`` calls) before it is freed."""
    sets = rotation(kernel, direction, shape)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run = make_case(kernel, direction, provider, shape, sets=sets)
        out = {"ms_eager": eager_ms(run, sets), "sets": sets}
        try:
            out["ms"], out["graphed"] = graph_ms(run, sets, stream), True
        except Exception as e:  # a provider that cannot be captured: report its eager time, say so
            torch.cuda.synchronize()
            out["ms"], out["graphed"] = out["ms_eager"], False
            out["graph_error"] = f"{type(e).__name__}: {e}"[:200]
        if then is not None:
            then(run)
    torch.cuda.synchronize()
    del run
    torch.cuda.empty_cache()
    return out


def record(kernel, direction, provider, shape, timing: dict, copy_gbs, meta) -> dict:
    ms = timing["ms"]
    gbs = nbytes(kernel, direction, shape) / ms / 1e6
    return {
        "kernel": kernel,
        "direction": direction,
        "provider": provider,
        "shape": shape,
        "dims": list(LOSS_SHAPES[shape] if kernel == "flow_loss" else ROW_SHAPES[shape]),
        "dtype": str(DTYPE).removeprefix("torch."),
        "ms": round(ms, 5),
        "ms_eager": round(timing["ms_eager"], 5),
        "bytes": nbytes(kernel, direction, shape),
        "gbs": round(gbs, 1),
        "pct_copy": round(100 * gbs / copy_gbs, 1),
        "copy_gbs": round(copy_gbs, 1),
        **{k: v for k, v in timing.items() if k not in ("ms", "ms_eager")},
        **meta,
    }


# ---------------------------------------------------------------------------------------------
# pytest-benchmark


@pytest.fixture(scope="session")
def copy_gbs() -> float:
    return copy_bandwidth_gbs()


@pytest.mark.parametrize("kernel,direction,provider,shape", CASES, ids=["-".join(c) for c in CASES])
def test_kernel(benchmark, bench_meta, copy_gbs, kernel, direction, provider, shape):
    def pedantic(run):  # pytest-benchmark's own stats: wall clock of `sets` eager calls, synced
        def synced():
            run()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=3, iterations=1, warmup_rounds=1)

    timing = measure(kernel, direction, provider, shape, then=pedantic)
    benchmark.extra_info.update(record(kernel, direction, provider, shape, timing, copy_gbs, bench_meta))


# ---------------------------------------------------------------------------------------------
# plain script mode and the summary table


def table(records: list[dict]) -> str:
    """One line per (kernel, direction, shape): GPU ms per provider (graph replay), the triton op's GB/s
    and % of copy bandwidth, its speedup over ref and compile, and eager-call ms of compile and triton."""
    by = {}
    for r in records:
        by.setdefault((r["kernel"], r["direction"], r["shape"]), {})[r["provider"]] = r
    nan = float("nan")
    head = f"{'kernel':<24}{'dir':<7}{'shape':<6}{'ref':>8}{'comp':>8}{'triton':>8}{'GB/s':>7}{'%copy':>6}"
    head += f"{'x ref':>7}{'x comp':>7} |{'comp e':>8}{'trit e':>8}"
    lines = [head]
    for (k, d, s), p in by.items():
        ms = {n: p[n]["ms"] if n in p else nan for n in PROVIDERS}
        eager = {n: p[n]["ms_eager"] if n in p else nan for n in PROVIDERS}
        t = p.get("triton", {})
        line = f"{k:<24}{d:<7}{s:<6}{ms['ref']:>8.4f}{ms['compile']:>8.4f}{ms['triton']:>8.4f}"
        line += f"{t.get('gbs', nan):>7.0f}{t.get('pct_copy', nan):>6.1f}"
        line += f"{ms['ref'] / ms['triton']:>7.2f}{ms['compile'] / ms['triton']:>7.2f} |"
        line += f"{eager['compile']:>8.4f}{eager['triton']:>8.4f}"
        if not all(p[n].get("graphed", True) for n in p):
            line += "  (some not graphed: eager ms)"
        lines.append(line)
    if records:
        r = records[0]
        lines.append(
            f"card {r.get('card')}, copy {r['copy_gbs']:.0f} GB/s, torch {r.get('torch')}, "
            f"triton {r.get('triton')}, commit {r.get('commit')}, dtype {r['dtype']}; "
            "ms = GPU time per call (CUDA graph), e = eager call (host launch cost included)"
        )
    return "\n".join(lines)


def load_records(path: str) -> list[dict]:
    """Records of a script-mode JSON, or the extra_info of a pytest-benchmark JSON."""
    data = json.loads(Path(path).read_text())
    if "benchmarks" in data:
        return [b["extra_info"] for b in data["benchmarks"] if "ms" in b.get("extra_info", {})]
    return data["records"]


# Swept on an H200 (bench/results/h200-2026-11-27-s3/): kernels_sweep_1.txt varied tiles and programs per SM
# (more, shorter programs did not help the backward); kernels_sweep_2.txt added how the backward loop
# prefetches (0 = the next tile by hand, since removed; S = Triton's pipeliner, S - 1 tiles in flight).
# Since the fourth session the backward grid fills one wave of what the SM holds (grid.resident_per_sm) and
# "per SM" is only a cap on that (32 = no cap). Stages apply to the adaLN backward kernels; the gated-residual
# backward takes the tile and warps only, and its best config is chosen on its own.
FWD_SWEEP = [(2048, 2), (1024, 1), (1024, 2), (4096, 4)]
BWD_SWEEP = [  # (tile, warps, max programs per SM, stages)
    (1024, 2, 32, 3), (1024, 2, 4, 3), (1024, 2, 32, 2), (1024, 2, 32, 4), (1024, 1, 32, 3), (512, 1, 32, 3),
    (2048, 2, 32, 3), (2048, 4, 32, 3), (1024, 4, 32, 3), (2048, 4, 32, 1),
]  # fmt: skip
ADALN_BWD = ["modulate", "residual_modulate", "residual_modulate_gated"]


def sweep(shapes: list[str], env_out: str | None = None) -> None:
    """Print % of copy bandwidth of the triton row kernels for each tile config of ``nanodit.kernels.tiling`` (the knobs
    FWD_TILE/FWD_WARPS, BWD_TILE/BWD_WARPS/BWD_PROGRAMS_PER_SM/BWD_STAGES, RES_BWD_*) and the best of each
    (geometric mean over kernels and shapes: the forwards; the adaLN backwards; the gated-residual backward);
    ``env_out`` gets them as NANODIT_*_TILES/STAGES exports, so that a script can measure and test the winner
    in the same session before it is written into tiling.py."""
    import math

    from nanodit.kernels import tiling

    copy_gbs = copy_bandwidth_gbs()
    rows = [k for k in KERNELS if k != "flow_loss"]

    def pct(kernel, direction, shape):
        gbs = nbytes(kernel, direction, shape) / measure(kernel, direction, "triton", shape)["ms"] / 1e6
        return 100 * gbs / copy_gbs

    def gmean(vals):
        return math.exp(sum(math.log(v) for v in vals) / len(vals))

    print(f"% of copy bandwidth ({copy_gbs:.0f} GB/s); columns: {', '.join(rows)} x {', '.join(shapes)}")
    best = {}

    def row(direction: str, label: str, key: tuple) -> None:
        vals = {(k, s): pct(k, direction, s) for k in rows for s in shapes}
        cells = "".join(f" {v:5.1f}" for v in vals.values())
        groups = {"fwd": rows} if direction == "fwd" else {"bwd": ADALN_BWD, "res_bwd": ["gated_residual"]}
        means = {g: gmean([v for (k, _), v in vals.items() if k in ks]) for g, ks in groups.items()}
        print(
            f"{direction} {label:44s}{cells}  " + " ".join(f"{g} {m:5.1f}" for g, m in means.items()),
            flush=True,
        )
        for g, m in means.items():
            if m > best.get(g, (0.0,))[0]:
                best[g] = (m, key)

    for tile, warps in FWD_SWEEP:
        tiling.FWD_TILE, tiling.FWD_WARPS = tile, warps
        row("fwd", f"tile {tile:5d} warps {warps:2d}", (tile, warps))
    for tile, warps, per_sm, stages in BWD_SWEEP:
        tiling.BWD_TILE, tiling.BWD_WARPS, tiling.BWD_PROGRAMS_PER_SM = tile, warps, per_sm
        tiling.RES_BWD_TILE, tiling.RES_BWD_WARPS, tiling.BWD_STAGES = tile, warps, stages
        row(
            "bwd",
            f"tile {tile:5d} warps {warps:2d} max per SM {per_sm:2d} stages {stages}",
            (tile, warps, per_sm, stages),
        )
    (fg, (ft, fw)), (bg, (bt, bw, bp, bs)) = best["fwd"], best["bwd"]
    rg, (rt, rw, rp, _) = best["res_bwd"]
    print(f"best fwd: {ft},{fw} (gmean {fg:.1f}%)")
    print(f"best adaLN bwd: {bt},{bw},{bp} stages {bs} (gmean {bg:.1f}%)")
    print(f"best gated-residual bwd: {rt},{rw} (max per SM {rp}; gmean {rg:.1f}%)")
    if rp != bp:
        print("  (the programs-per-SM cap is shared: the export keeps the adaLN one)")
    if env_out:  # every knob the sweep set
        Path(env_out).write_text(
            f"export NANODIT_FWD_TILES={ft},{fw} NANODIT_BWD_TILES={bt},{bw},{bp} NANODIT_BWD_STAGES={bs}"
            f" NANODIT_RES_BWD_TILES={rt},{rw}\n"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the records here as JSON")
    ap.add_argument("--shapes", default=",".join(ROW_SHAPES), help="comma list of nano, large")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)}")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--table", metavar="JSON", help="only print the summary table of a saved run")
    ap.add_argument("--sweep", action="store_true", help="sweep the row kernels' tile configs (triton only)")
    ap.add_argument(
        "--sweep-env", metavar="FILE", help="with --sweep: write the winners here as shell exports"
    )
    args = ap.parse_args()
    if args.table:
        print(table(load_records(args.table)))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA GPU")
    if args.sweep:
        sweep(args.shapes.split(","), args.sweep_env)
        return
    from conftest import machine_info

    meta = machine_info()
    copy_gbs = copy_bandwidth_gbs()
    records = []
    for kernel, direction, provider, shape in CASES:
        if (
            kernel in args.kernels.split(",")
            and shape in args.shapes.split(",")
            and provider in args.providers
        ):
            timing = measure(kernel, direction, provider, shape)
            records.append(record(kernel, direction, provider, shape, timing, copy_gbs, meta))
            print(f"{kernel:<24}{direction:<7}{provider:<8}{shape:<6}{timing['ms']:9.4f} ms", flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"meta": meta, "copy_gbs": copy_gbs, "records": records}, indent=1)
        )
    print(table(records))


if __name__ == "__main__":
    main()
