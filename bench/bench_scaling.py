"""Two GPUs against one: loss parity at the same global batch and scaling efficiency at the same batch per GPU, for
nano (DDP) and production (FSDP), through the trainer as a user starts it (``python -m nanodit.train`` and
``torchrun --standalone --nproc_per_node 2 -m nanodit.train``).

    python bench/bench_scaling.py --sizes nano                      # on a 2-GPU machine
    python bench/bench_scaling.py --sizes production                # both write into the same file
    python bench/bench_scaling.py --dry-run                         # print the commands only

Not run yet: written without a 2-GPU machine; tests/test_bench_scripts.py checks its plumbing and rules on a CPU.

Results go to ``bench/results/<card>x2-<date>/scaling.json`` (``--out`` to choose); a second call adds its sizes to
the file. NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are forced into the children's environment and recorded), as the machine's notes require.

Per size, four runs of ``--steps`` steps on the built-in shapes set (``data.synth_samples`` 1024: 256 per bucket,
so a rank's share of a bucket holds whole batches), warmup 20 steps (the production config's 5000 would keep the LR
near 0 for the whole run), no validation, regional compilation without CUDA graphs (``reduce-overhead`` is refused
under DDP/FSDP, so the 1-GPU baselines run without it too):
- ``parity-1gpu`` / ``parity-2gpu``: the same global batch ``--batch`` (16), a log row every step;
- ``speed-1gpu`` / ``speed-2gpu``: the same batch per GPU (16 and 2 x 16), a log row every 10 steps (a log row waits
  for the GPU, so fewer rows disturb the timing less).
Reported: samples/s (median of the log rows after the first ``--skip`` steps: compile and warm-up), ms/step, peak
memory, the strategy each run used.

Rules (stated before measuring):
- parity: the two curves differ in their noise and in how each epoch is cut (the rank split), so only statistical
  agreement is expected (the exact, rounding-only parity is the CPU test's, tests/test_distributed.py). The curve
  after ``--skip`` is cut into windows of 25 steps; in each, |mean_2 - mean_1| <= 3 sqrt((s_1^2 + s_2^2) / 25) (a
  two-sample z-test at 3 sigma on the per-step losses). Parity holds when every window passes;
- efficiency: samples/s of ``speed-2gpu`` / (2 x samples/s of ``speed-1gpu``); the issue's bar is >= 0.90 for
  production; nano's is reported. ``strong_efficiency`` (the parity pair's samples/s, same global batch) is reported
  beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SIZES = {
    "nano": ["--config", "nano", "train.compile_mode=default"],
    "production": ["--config", "production", "train.compile_scope=blocks"],
}
WINDOW = 25


def run_command(
    size: str, gpus: int, batch: int, steps: int, log_every: int, run_dir: Path, cache: Path
) -> list:
    """The trainer's command line for one run."""
    over = [
        *SIZES[size],
        f"run.dir={run_dir}",
        f"data.cache_dir={cache}",
        "data.synth_samples=1024",
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        f"train.log_every={log_every}",
        "train.warmup_steps=20",
        "train.ckpt_every=1000000",
        "val.every=0",
        "val.at_end=false",
        "run.tensorboard=false",
        "run.progress=false",
    ]
    if gpus == 1:
        return [sys.executable, "-m", "nanodit.train", *over]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    return [*launch, "-m", "nanodit.train", *over]


def plan(size: str, gpus: int, batch: int, steps: int, root: Path) -> dict[str, list]:
    cache = root / "cache"
    return {
        "parity-1gpu": run_command(size, 1, batch, steps, 1, root / size / "parity-1gpu", cache),
        f"parity-{gpus}gpu": run_command(
            size, gpus, batch, steps, 1, root / size / f"parity-{gpus}gpu", cache
        ),
        "speed-1gpu": run_command(size, 1, batch, steps, 10, root / size / "speed-1gpu", cache),
        f"speed-{gpus}gpu": run_command(
            size, gpus, gpus * batch, steps, 10, root / size / f"speed-{gpus}gpu", cache
        ),
    }


def read_run(run_dir: Path, skip: int) -> dict:
    """samples/s, ms/step (medians over the rows after ``skip`` steps), per-step losses, peak memory, strategy."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    late = [r for r in rows if r["step"] > skip]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in late),
        "ms_per_step": statistics.median(r["ms_per_step"] for r in late),
        "losses": [[r["step"], r["loss"]] for r in rows],
        "peak_memory_gb": summary.get("peak_memory_gb"),
        "strategy": summary.get("distributed", {}).get("strategy", "none"),
        "steps": summary["steps"],
    }


def parity(one: list, two: list, skip: int, window: int = WINDOW) -> dict:
    """The window test of the module docstring on per-step losses [[step, loss], ...]."""
    a = {s: x for s, x in one if s > skip}
    b = {s: x for s, x in two if s > skip}
    steps = sorted(set(a) & set(b))
    windows = []
    for i in range(0, len(steps) - window + 1, window):
        part = steps[i : i + window]
        xa, xb = [a[s] for s in part], [b[s] for s in part]
        bound = 3 * math.sqrt((statistics.variance(xa) + statistics.variance(xb)) / window)
        diff = statistics.fmean(xb) - statistics.fmean(xa)
        windows.append(
            {"steps": [part[0], part[-1]], "diff": diff, "bound": bound, "pass": abs(diff) <= bound}
        )
    return {"windows": windows, "pass": bool(windows) and all(w["pass"] for w in windows)}


def efficiency(one: dict, many: dict, gpus: int) -> float:
    return many["samples_per_s"] / (gpus * one["samples_per_s"])


def summarize(size: str, runs: dict, gpus: int, skip: int) -> dict:
    p1, p2, s1, s2 = (runs[k] for k in ("parity-1gpu", f"parity-{gpus}gpu", "speed-1gpu", f"speed-{gpus}gpu"))
    eff = efficiency(s1, s2, gpus)
    out = {
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in runs.items()},
        "losses": {k: runs[k]["losses"] for k in ("parity-1gpu", f"parity-{gpus}gpu")},
        "parity": parity(p1["losses"], p2["losses"], skip),
        "efficiency": eff,
        "strong_efficiency": efficiency(p1, p2, gpus),
    }
    if size == "production":
        out["efficiency_pass"] = eff >= 0.90
    return out


def environment() -> dict:
    env = {**os.environ, **NO_MULTICAST}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def card_info(gpus: int) -> dict:
    import torch

    from nanodit.provenance import code_version

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    return {"card": name, "gpus": gpus, "nccl": nccl, **code_version(), "env": NO_MULTICAST}


def default_out(card: str, gpus: int) -> Path:
    slug = card.lower().replace("nvidia", "").strip().replace(" ", "-") or "cpu"
    return REPO / "bench" / "results" / f"{slug}x{gpus}-{time.strftime('%Y-%m-%d')}" / "scaling.json"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="nano,production")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument(
        "--batch", type=int, default=16, help="global batch of the parity pair, per-GPU of the speed pair"
    )
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--skip", type=int, default=50, help="steps left out of the medians and the parity windows"
    )
    ap.add_argument("--out", help="default: bench/results/<card>x<gpus>-<date>/scaling.json")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    info = card_info(args.gpus)
    out = Path(args.out) if args.out else default_out(info["card"], args.gpus)
    result = json.loads(out.read_text()) if out.is_file() else {**info, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            commands = plan(size, args.gpus, args.batch, args.steps, Path(tmp))
            if args.dry_run:
                for name, cmd in commands.items():
                    print(name, " ".join(cmd))
                continue
            runs = {}
            for name, cmd in commands.items():
                print(f"{size} {name}: {' '.join(cmd)}", flush=True)
                subprocess.run(cmd, env=environment(), cwd=REPO, check=True)
                run_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("run.dir="))
                runs[name] = read_run(Path(run_dir), args.skip)
            result["sizes"][size] = {
                "steps": args.steps,
                "batch": args.batch,
                **summarize(size, runs, args.gpus, args.skip),
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
            print(json.dumps({k: v for k, v in result["sizes"][size].items() if k != "losses"}, indent=1))
    return result


if __name__ == "__main__":
    main()
