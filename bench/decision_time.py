"""Time to decision: the whole training job, from a fresh process to the final report, cold and warm.

    python bench/decision_time.py --out bench/results/<card>-<date>/decision_time.json [--config nano] [key=value ...]
    python bench/decision_time.py --out ... --bench triton-compile-cg   # + bench_step.py's step in the same sitting

Runs ``python -m nanodit.train`` twice, each in a fresh process, with compile caches in one fresh folder
(``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``) and the built-in data set written under it: **cold** starts
with empty caches and no data set; **warm** runs again with what the cold run left (a researcher's second run).
Each wall time is measured around the process. The stages come from the run's ``summary.json`` (``stages_s``,
``nanodit.runlog.Stages``); ``startup`` is the process wall time less the trainer's own total, split into
``launch`` (process start to ``train()``: interpreter, imports, config; read by the trainer from ``/proc``) and
``exit`` (after the summary: interpreter shutdown, worker pools). ``trainer_ms_per_step`` is the median ``ms_per_step`` of the warm run's log rows in the second
half of training (compiled, at speed); ``train_mean_ms_per_step`` is the ``train`` stage over its steps (every
step after a shape's warm-up calls, logging and the log rows' waits included: what the median hides), and
``ms_per_step_rows`` every log row's ``[step, ms_per_step]``, to find the windows that ran slow. With ``--bench VARIANT`` the step benchmark (``bench/bench_step.py``) runs
in the same sitting and its ms/step is written beside it (GPU only). The decision is the final report's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # script mode: import nanodit from the repo

from nanodit.provenance import code_version  # noqa: E402
from nanodit.runlog import Stages  # noqa: E402


def run_job(config: str | None, overrides: list[str], run_dir: Path, cache: Path) -> dict:
    """One training job in a fresh process: {"wall_s", "stages", "summary", "rows"}; raises on failure. It runs in
    REPO: ``python -m`` puts the working directory first on sys.path, ahead of PYTHONPATH, so from elsewhere it
    would import whatever ``nanodit`` lies there (a baseline tree timed the checkout's code that way)."""
    run_dir, cache = run_dir.resolve(), cache.resolve()
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "nanodit.train", "-q"]
    cmd += ["--config", config] if config else []
    cmd += [*overrides, f"run.dir={run_dir}", f"data.cache_dir={cache / 'data'}", "run.progress=false"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"decision_time: {' '.join(cmd)} exited {done.returncode}: {tail[0]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stages = dict(summary["stages_s"])
    stages["startup"] = round(max(0.0, wall - stages["total"]), 3)
    if "launch" in stages:  # the trainer's own reading: process start -> train(); the rest of startup is exit
        stages["exit"] = round(max(0.0, stages["startup"] - stages["launch"]), 3)
    return {"wall_s": round(wall, 3), "stages": stages, "summary": summary, "rows": rows}


def at_speed_ms(rows: list[dict], steps: int) -> float | None:
    """Median ms/step of the log rows in the second half of training (compiled and warm)."""
    late = [r["ms_per_step"] for r in rows if "ms_per_step" in r and r.get("step", 0) > steps // 2]
    return round(statistics.median(late), 3) if late else None


def train_mean_ms(stages: dict, steps: int) -> float | None:
    """The ``train`` stage's seconds over its steps (those after each shape's ``Stages.WARM_CALLS`` warm-up calls)."""
    n = steps - Stages.WARM_CALLS * stages.get("shapes", 0)
    return round(1000 * stages["train"] / n, 3) if n > 0 else None


def row_ms(rows: list[dict]) -> list[list[float]]:
    """[[step, ms_per_step], ...] of the log rows that carry a speed."""
    return [[r["step"], round(r["ms_per_step"], 3)] for r in rows if "ms_per_step" in r and "step" in r]


def bench_ms(variant: str, cache: Path) -> float | None:
    """bench_step.py's ms/step of ``variant``, in this sitting (None where it could not run)."""
    out = cache / "step.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_step.py"), "--out", str(out), "--variants", variant]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        return None
    rows = [r for r in json.loads(out.read_text())["rows"] if "ms_per_step" in r]
    return rows[0]["ms_per_step"] if rows else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/decision_time.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where decision_time.json goes")
    ap.add_argument("--config", default=None, help="the trainer's --config (default: the trainer's default)")
    ap.add_argument("--bench", metavar="VARIANT", help="also run bench_step.py's VARIANT in this sitting")
    ap.add_argument("--keep", metavar="DIR", help="keep the runs and caches in DIR (default: a temp folder)")
    ap.add_argument("--cold-only", action="store_true", help="the cold run only (warm fields null)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nanodit-decision-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        cold = run_job(args.config, args.overrides, root / "cold", root)
        write(
            args.out, result_of(args, cold, None, None)
        )  # the cold run's numbers stand if the warm run is cut
        if args.cold_only:
            return 0
        warm = run_job(args.config, args.overrides, root / "warm", root)
        bench = bench_ms(args.bench, root) if args.bench else None
    result = result_of(args, cold, warm, bench)
    write(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


def write(out: str, result: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


def result_of(args: argparse.Namespace, cold: dict, warm: dict | None, bench: float | None) -> dict:
    """decision_time.json; ``warm`` None: written after the cold run (warm fields null)."""
    s = (warm or cold)["summary"]
    return {
        "card": s["device"],
        "commit": s["code"]["commit"] or code_version()["commit"],
        "torch": s["code"]["torch"],
        "config": args.config or "default",
        "overrides": args.overrides,
        "steps": s["steps"],
        "cold_wall_s": cold["wall_s"],
        "warm_wall_s": warm["wall_s"] if warm else None,
        "stages": {"cold": cold["stages"], "warm": warm["stages"] if warm else None},
        "trainer_ms_per_step": at_speed_ms((warm or cold)["rows"], s["steps"]),
        "train_mean_ms_per_step": {
            name: train_mean_ms(r["stages"], s["steps"]) if r else None
            for name, r in (("cold", cold), ("warm", warm))
        },
        "ms_per_step_rows": {
            name: row_ms(r["rows"]) if r else None for name, r in (("cold", cold), ("warm", warm))
        },
        "bench_ms_per_step": bench,
        "bench_variant": args.bench,
        "decision": (s.get("report") or {}).get("decision"),
        "decision_cold": (cold["summary"].get("report") or {}).get("decision"),
        "peak_memory_gb": s.get("peak_memory_gb"),
    }


if __name__ == "__main__":
    sys.exit(main())
