"""Recipe sweep for the GO / NO-GO calibration: train variants in parallel, then score their checkpoints
under a grid of sampler settings (guidance, Euler-schedule shift), all in one call on the GPU machine.

    python scripts/sweep_recipe.py train --root /tmp/sw --base "--config nano ..." \
        --variant shift4.5 "train.t_shift=4.48" --variant shift7.4 "train.t_shift=7.39"
    python scripts/sweep_recipe.py eval --root /tmp/sw --samples 32 --steps 5000 \
        --grid "1,1,1 1,3,1 1,1,3" --out /tmp/out/sweep.jsonl

``eval`` writes one JSON line per (run, checkpoint step, setting): pass rates and their sub-rates, PSNR.
Training variants run as concurrent processes on one GPU (the nano step at batch 16 leaves host gaps that
the other processes fill).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from nanodit.checkpoint import list_checkpoints, load_checkpoint
from nanodit.config import from_dict
from nanodit.data import data_root
from nanodit.model import build_model
from nanodit.validate import generate, is_shapes, load_tools, read_val_samples, score_cases, select_cases


def cmd_train(args) -> int:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    base = shlex.split(args.base)
    # the data set once, before the processes start (they would race to write it)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "nanodit.train",
            *base,
            "train.steps=1",
            f"run.dir={root}/_data",
            "val.at_end=false",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    procs = []
    for name, overrides in args.variant:
        log = open(root / f"{name}.log", "w")
        cmd = [
            sys.executable,
            "-m",
            "nanodit.train",
            *base,
            f"run.dir={root}/{name}",
            *shlex.split(overrides),
        ]
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time()))
        print(f"started {name}: {' '.join(cmd[3:])}", flush=True)
    for name, p, t0 in procs:
        rc = p.wait()
        print(f"{name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
    return 0


def _settings(grid: str) -> list[tuple[float, float, float]]:
    return [tuple(float(x) for x in item.split(",")) for item in grid.split()]


def cmd_eval(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = open(args.out, "a")
    steps = {int(s) for s in args.steps.split(",")} if args.steps else None
    for run in sorted(p for p in Path(args.root).iterdir() if p.is_dir() and not p.name.startswith("_")):
        ckpts = list_checkpoints(run)
        if not ckpts:
            print(f"{run.name}: no checkpoints", flush=True)
            continue
        state = load_checkpoint(ckpts[-1])
        cfg = from_dict(state["config"])
        cfg.val = replace(cfg.val, samples=args.samples)
        manifest, groups = read_val_samples(data_root(cfg), args.samples)
        shapes = is_shapes(manifest)
        tools = load_tools(manifest, cfg.val, device, shapes)
        model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).to(device)
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16" else None
        )
        for ck in ckpts:
            st = load_checkpoint(ck)
            step = int(st["step"])
            if steps is not None and step not in steps:
                continue
            model.load_state_dict(st["ema" if not args.live else "model"])
            model.eval().requires_grad_(False)
            for gd, gt, sh in _settings(args.grid):
                vcfg = replace(cfg.val, guidance_dino=gd, guidance_text=gt, sample_shift=sh)
                t0 = time.perf_counter()
                cases = select_cases(groups, args.samples, shapes, vcfg.seed)
                outs = generate(model, cases, vcfg, autocast)
                num = score_cases(cases, outs, shapes, tools)["numbers"]
                row = {"run": run.name, "step": step, "guidance_dino": gd, "guidance_text": gt, "shift": sh}
                row.update({k: v for k, v in num.items() if isinstance(v, (int, float)) or v is None})
                row["seconds"] = time.perf_counter() - t0
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(
                    f"{run.name:>14} {step:>6} g=({gd:g},{gt:g}) shift {sh:g}: recon {num.get('recon_scorer_rate')} "
                    f"(obj {num.get('recon_objects_rate')}) swap {num.get('dino_swap_rate')} manip {num.get('text_manip_rate')} "
                    f"psnr {num.get('psnr'):.1f}  {row['seconds']:.1f}s",
                    flush=True,
                )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--root", required=True)
    tr.add_argument("--base", default="--config nano")
    tr.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True)
    ev = sub.add_parser("eval")
    ev.add_argument("--root", required=True)
    ev.add_argument("--samples", type=int, default=32)
    ev.add_argument("--steps", default="")
    ev.add_argument("--grid", default="1,1,1")
    ev.add_argument("--live", action="store_true", help="score the live weights instead of the EMA")
    ev.add_argument("--out", required=True)
    args = ap.parse_args()
    return cmd_train(args) if args.cmd == "train" else cmd_eval(args)


if __name__ == "__main__":
    sys.exit(main())
