"""Attention forward+backward at the nano shape: every backend present, bf16, eager and CUDA graphs.

Shapes (docs/design.md, nano model): B=16, 6 heads x 64, 1024 queries.
    cross  keys padded to 256, valid lengths drawn at random in 1..256 (seeded, the same for all)
    self   1024 x 1024, no mask
FLOP convention: forward 4 * B * nh * T * hd * Lvalid, counting only valid keys (Lvalid summed row by
row: two matmuls, 2 FLOP per multiply-add); backward 2.5x forward (five matmuls, S recomputed);
forward+backward = 3.5x forward.  TFLOP/s = those FLOPs / the measured time.
Timing: CUDA events around back-to-back calls after warm-up, median of the repeats.  "eager" runs the
Python call each time (launch overheads included, as a training step sees them); "graph" replays a
CUDA graph of one forward+backward (launch-free: what capture-friendly backends can reach).
Targets: cross <= 0.20 ms forward+backward; self >= 300 TFLOP/s.

Run (GPU only):
    pytest bench/bench_attention.py --benchmark [--benchmark-json out.json]
    python bench/bench_attention.py [--json out.json]      # compact table + JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # script mode: import nanodit from the repo
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/conftest.py helpers
from conftest import cuda_event_times, cuda_graph  # noqa: E402

import nanodit.attention as A  # noqa: E402

SHAPE = dict(B=16, nh=6, hd=64, T=1024, L_cross=256, L_self=1024)
TARGET_CROSS_MS = 0.20
TARGET_SELF_TFLOPS = 300.0
# the slow-to-compile ones last, so that a time budget cuts them first
PROVIDERS = ("cudnn", "sdpa", "sdpa-efficient", "sdpa-flash", "auto", "math", "flex", "flash")
MODES = ("eager", "graph")
TABLE_NAMES = ("cudnn", "sdpa-efficient", "sdpa-flash", "flash", "flex")  # nanodit.attention.AUTO_TABLE
CONVENTION = "fwd 4*B*nh*T*hd*sum(valid keys); bwd 2.5x fwd; fwd+bwd 3.5x fwd"


def make_inputs(case: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda"):
    """q, k, v (leaves needing grad), mask or None, upstream gradient, valid keys summed over rows."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B, nh, hd, T = SHAPE["B"], SHAPE["nh"], SHAPE["hd"], SHAPE["T"]
    L = SHAPE["L_cross"] if case == "cross" else SHAPE["L_self"]
    q, k, v, dout = (
        torch.randn(B, n, nh, hd, generator=g).to(device, dtype) for n in (T, L, L, T)
    )  # (B, T|L, nh, hd)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask, valid = None, B * L
    if case == "cross":
        lens = torch.randint(1, L + 1, (B,), generator=g)  # (B,)
        mask = (torch.arange(L)[None] < lens[:, None]).to(device)  # (B, L)
        valid = int(lens.sum())
    return q, k, v, mask, dout, valid


def provider_fn(name: str):
    if name.startswith("sdpa-"):
        return lambda q, k, v, m: A.attention_sdpa(q, k, v, m, kernels=(name,))
    return lambda q, k, v, m: A.attention(q, k, v, m, backend=name)


def unavailable(name: str, case: str) -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if name == "flash" and A.flash_variant(torch.cuda.get_device_capability()[0]) is None:
        return "flash-attn not installed"
    if name == "sdpa-flash" and case == "cross":
        return "torch's flash kernel takes no mask"
    return None


def cuda_ms(fn, warmup: int = 3, reps: int = 15, inner: int = 5) -> float:
    """Median milliseconds per call (CUDA events around ``inner`` back-to-back calls, ``reps`` times)."""
    return statistics.median(cuda_event_times(fn, warmup, reps, inner))


def graphed(step):
    """Capture one call of ``step`` in a CUDA graph (bench/conftest.py) -> its replay."""
    return cuda_graph(step)[0]


def prepare(case: str, name: str, mode: str):
    """A callable running one forward+backward (eager call or graph replay), its forward-only twin
    (eager, else None) and the forward+backward FLOPs."""
    q, k, v, mask, dout, valid = make_inputs(case)
    fn = provider_fn(name)

    def step():
        out = fn(q, k, v, mask)
        return torch.autograd.grad(out, (q, k, v), dout)

    def fwd():
        with torch.no_grad():
            return fn(q, k, v, mask)

    flops = 3.5 * 4 * SHAPE["nh"] * SHAPE["T"] * SHAPE["hd"] * valid
    if mode == "graph":
        return graphed(step), None, flops
    return step, fwd, flops


def measure(case: str, name: str, mode: str):
    """One row of the table (ms, TFLOP/s fwd+bwd, forward ms in eager mode, or the error that stopped
    it) and the forward+backward callable it timed (None on error)."""
    row = dict(case=case, provider=name, mode=mode)
    if name == "auto":
        plan = A.auto_plan("cuda", torch.cuda.current_device(), "torch.bfloat16", case == "cross")
        row["auto_plan"] = ">".join(plan)
    step = None
    try:
        step, fwd, flops = prepare(case, name, mode)
        ms = cuda_ms(step)
        row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
        if fwd is not None:
            row["fwd_ms"] = round(cuda_ms(fwd), 4)
    except Exception as e:  # a backend that cannot run here is a result too
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        row["error"] = f"{type(e).__name__}: {msg}"
        step = None
    return row, step


def versions() -> dict:
    info = {"cudnn": torch.backends.cudnn.version()}
    variant = A.flash_variant(torch.cuda.get_device_capability()[0]) if torch.cuda.is_available() else None
    info["flash_variant"] = variant
    for dist in ("flash-attn-4", "flash-attn", "flash-attn-3", "nvidia-cutlass-dsl", "quack-kernels"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info


# ---------------------------------------------------------------------------------------------
# pytest-benchmark


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("case", ("cross", "self"))
def test_attention_fwd_bwd(benchmark, bench_meta, case, name, mode):
    reason = unavailable(name, case)
    if reason:
        pytest.skip(reason)
    row, step = measure(case, name, mode)
    if step is None:
        pytest.skip(f"{name} {mode}: {row['error']}")
    inner = 10

    def run():
        for _ in range(inner):
            step()
        torch.cuda.synchronize()

    benchmark.extra_info.update(
        bench_meta, **versions(), **row, inner_calls_per_round=inner, flops=CONVENTION
    )
    benchmark.pedantic(run, rounds=10, warmup_rounds=1)


# ---------------------------------------------------------------------------------------------
# script mode


def _print_row(row: dict) -> None:
    note = row.get("error") or row.get("skipped") or row.get("auto_plan", "")
    print(
        f"{row['case']:5} {row['provider']:14} {row['mode']:5} {row.get('fwd_ms', ''):>7} "
        f"{row.get('ms', ''):>10} {row.get('tflops', ''):>8}  {note}",
        flush=True,
    )


def provider_rows(names: list[str], budget_s: float) -> list[dict]:
    """Every (provider, case, mode) row, measured in this process."""
    t0, rows = time.time(), []
    for name in names:
        for case in ("cross", "self"):
            for mode in MODES:
                reason = unavailable(name, case)
                if reason is None and time.time() - t0 > budget_s:
                    reason = f"time budget {budget_s:.0f} s spent"
                row = (
                    dict(case=case, provider=name, mode=mode, skipped=reason)
                    if reason
                    else measure(case, name, mode)[0]
                )
                rows.append(row)
                torch.cuda.empty_cache()
                _print_row(row)
    return rows


def isolated_rows(names: list[str], budget_s: float) -> list[dict]:
    """The same rows, one subprocess per provider: a crash is recorded as that provider's error."""
    import subprocess
    import tempfile

    t0, rows = time.time(), []
    for name in names:
        left = budget_s - (time.time() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            proc = subprocess.run(
                [sys.executable, __file__, "--no-isolate", "--providers", name, "--budget-s", str(max(left, 0.0)),
                 "--json", str(out)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if out.exists():
                got = json.loads(out.read_text())["rows"]
            else:
                tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][
                    -1:
                ] or [""]
                err = f"subprocess exited {proc.returncode}: {tail[0][:200]}"
                got = [
                    dict(case=c, provider=name, mode=m, error=err) for c in ("cross", "self") for m in MODES
                ]
        for row in got:
            _print_row(row)
        rows += got
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows and the summary here")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--budget-s", type=float, default=170.0, help="skip what is left after this")
    parser.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="measure every provider in this process (default: one subprocess per provider, so that a "
        "backend that faults the CUDA context -- an illegal memory access poisons every later call -- "
        "costs only its own rows)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention: needs a CUDA GPU")
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import machine_info  # bench/conftest.py: card, torch, triton, cuda, commit

    meta = {**machine_info(), **versions(), "date": time.strftime("%Y-%m-%d"), "flops": CONVENTION}
    print(" ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    print(f"{'case':5} {'provider':14} {'mode':5} {'fwd ms':>7} {'fwd+bwd ms':>10} {'TFLOP/s':>8}  note")
    names = args.providers.split(",")  # provider first: the slow-to-compile ones come last
    if args.isolate and len(names) > 1:
        rows = isolated_rows(names, args.budget_s)
    else:
        rows = provider_rows(names, args.budget_s)
    summary = {}
    for case in ("cross", "self"):
        done = [r for r in rows if r["case"] == case and "ms" in r]
        if done:
            best = min(done, key=lambda r: r["ms"])
            met = best["ms"] <= TARGET_CROSS_MS if case == "cross" else best["tflops"] >= TARGET_SELF_TFLOPS
            target = f"<= {TARGET_CROSS_MS} ms" if case == "cross" else f">= {TARGET_SELF_TFLOPS:.0f} TFLOP/s"
            summary[case] = dict(
                best=f"{best['provider']}/{best['mode']}",
                ms=best["ms"],
                tflops=best["tflops"],
                target=target,
                met=met,
            )
            print(
                f"{case}: best {best['provider']} ({best['mode']}) {best['ms']} ms, {best['tflops']} TFLOP/s; "
                f"target {target}: {'met' if met else 'NOT met'}"
            )
    # the numbers AUTO_TABLE keeps (eager fwd+bwd ms, the table's provider names), ready to paste
    for case in ("cross", "self"):
        times = {
            r["provider"]: r["ms"]
            for r in rows
            if r["case"] == case and r["mode"] == "eager" and "ms" in r and r["provider"] in TABLE_NAMES
        }
        summary[f"auto_table_{case}"] = times
        print(f'AUTO_TABLE "{case}": {json.dumps(times)}')
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, shape=SHAPE, rows=rows, summary=summary), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
