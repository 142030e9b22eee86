"""Calibration of the GO / NO-GO decision on the GPU machine: train recipe variants side by side, score their
checkpoints under a grid of sampler settings, re-validate with the chosen settings (self-test included), and
write the calibration JSON. Runs live under an absolute --root in /tmp so they outlive one call.

    python scripts/calibrate.py start --root /tmp/cal --name s4.5-seed0 -- --config nano train.t_shift=4.48
    python scripts/calibrate.py wait --root /tmp/cal --timeout 500          # until every run has finished
    python scripts/calibrate.py grid --root /tmp/cal --grid "1,1,1 1,3,1 1,3,3" --out $OUT/grid.jsonl
    python scripts/calibrate.py revalidate --root /tmp/cal -- val.guidance_text=3
    python scripts/calibrate.py summarize --root /tmp/cal --out bench/results/calibration/h200-<date>.json
    python scripts/calibrate.py pack --root /tmp/cal --out $OUT/runs.tgz

Training runs are separate processes started in their own session (setsid), so a call may return while they
train; the nano step at batch 16 leaves host gaps that the other processes fill on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from nanodit.checkpoint import latest_checkpoint
from nanodit.config import from_dict, load_config
from nanodit.data.prepare import prepare
from nanodit.dist_checkpoint import load_checkpoint
from nanodit.model import build_model
from nanodit.validation.cases import has_scenes, read_val_samples, select_cases
from nanodit.validation.sampling import generate
from nanodit.validation.scoring import score_cases
from nanodit.validation.tools import load_tools


def _runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "cmd.json").is_file())


def _ensure_data(train_args: list[str]) -> None:
    """Write the built-in data set before the run starts (parallel runs would race to write it)."""
    name = train_args[train_args.index("--config") + 1] if "--config" in train_args else None
    rest = [
        a for i, a in enumerate(train_args) if a != "--config" and (i == 0 or train_args[i - 1] != "--config")
    ]
    cfg = load_config(name, rest)
    if cfg.data.path is None:
        prepare(cfg)


def cmd_start(args) -> int:
    _ensure_data(args.train_args)
    root = Path(args.root)
    run = root / args.name
    run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "nanodit.train", *args.train_args, f"run.dir={run}", "run.progress=false"]
    (run / "cmd.json").write_text(json.dumps({"cmd": cmd[3:], "started": time.time()}))
    log = open(root / f"{args.name}.log", "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (run / "pid").write_text(str(p.pid))
    print(f"started {args.name} (pid {p.pid}): {' '.join(cmd[3:])}", flush=True)
    return 0


def _alive(run: Path) -> bool:
    try:
        os.kill(int((run / "pid").read_text()), 0)
    except (OSError, ValueError):
        return False
    return not (run / "summary.json").is_file()


def cmd_wait(args) -> int:
    root, t0 = Path(args.root), time.time()
    while time.time() - t0 < args.timeout:
        alive = [r.name for r in _runs(root) if _alive(r)]
        if not alive:
            break
        time.sleep(10)
    for r in _runs(root):
        last = ""
        if (r / "metrics.jsonl").is_file():
            rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines() if x.strip()]
            loss_rows = [x for x in rows if "loss" in x]
            if loss_rows:
                last = f"step {loss_rows[-1]['step']} loss {loss_rows[-1]['loss']:.4f} {loss_rows[-1].get('ms_per_step', 0):.1f} ms/step"
            vals = [x for x in rows if "val/go" in x]
            for v in vals:
                last += (
                    f" | val {v['step']}: recon {v.get('val/recon_scorer_rate')} swap {v.get('val/dino_swap_rate')}"
                    f" manip {v.get('val/text_manip_rate')}"
                )
        state = "running" if _alive(r) else "done"
        print(f"{r.name:>16} {state}: {last}", flush=True)
        log = root / f"{r.name}.log"
        if not _alive(r) and log.is_file():
            tail = [x for x in log.read_text().splitlines() if x.strip()][-12:]
            print("    " + "\n    ".join(tail), flush=True)
    return 0


def _settings(grid: str) -> list[tuple[float, float, float]]:
    return [tuple(float(x) for x in item.split(",")) for item in grid.split()]


def cmd_grid(args) -> int:
    """Pass rates of each run's latest checkpoint (EMA) under each (guidance_dino, guidance_text, shift)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = open(args.out, "a")
    for run in _runs(Path(args.root)):
        ck = latest_checkpoint(run)
        if ck is None or _alive(run):
            continue
        state = load_checkpoint(ck)
        cfg = from_dict(state["config"])
        cfg.val = replace(cfg.val, samples=args.samples)
        manifest, groups = read_val_samples(prepare(cfg), args.samples)
        shapes = has_scenes(manifest, groups)
        tools = load_tools(manifest, cfg.val, device, shapes)
        model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).to(device)
        model.load_state_dict(state["ema"])
        model.eval().requires_grad_(False)
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16" else None
        )
        cases = select_cases(groups, args.samples, shapes, cfg.val.seed)
        for gd, gt, sh in _settings(args.grid):
            vcfg = replace(cfg.val, guidance_dino=gd, guidance_text=gt, sample_shift=sh)
            t0 = time.perf_counter()
            num = score_cases(cases, generate(model, cases, vcfg, autocast), shapes, tools)["numbers"]
            row = {
                "run": run.name,
                "step": int(state["step"]),
                "guidance_dino": gd,
                "guidance_text": gt,
                "shift": sh,
            }
            row.update({k: v for k, v in num.items() if isinstance(v, (int, float)) or v is None})
            row["seconds"] = time.perf_counter() - t0
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(
                f"{run.name:>16} g=({gd:g},{gt:g}) shift {sh:g}: recon {num.get('recon_scorer_rate')} "
                f"(obj {num.get('recon_objects_rate')}) swap {num.get('dino_swap_rate')} "
                f"manip {num.get('text_manip_rate')} psnr {num.get('psnr') or 0:.1f}  {row['seconds']:.1f}s",
                flush=True,
            )
    return 0


def cmd_revalidate(args) -> int:
    """``python -m nanodit.validate --final --self-test`` on every finished run, with the given overrides."""
    for run in _runs(Path(args.root)):
        if _alive(run) or latest_checkpoint(run) is None:
            continue
        cmd = [
            sys.executable,
            "-m",
            "nanodit.validate",
            "--run",
            str(run),
            "--final",
            "--self-test",
            *args.val_args,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(
            f"== {run.name}: {' '.join(args.val_args)} (exit {r.returncode})\n{r.stdout[-2500:]}{r.stderr[-800:]}",
            flush=True,
        )
    return 0


def _variant_entry(config: str, seed: int, variant: str, decision: str, criteria: dict) -> dict:
    return {
        "config": config,
        "seed": seed,
        "variant": variant,
        "decision": decision,
        "criteria": {k: {"value": c["value"], "pass": c["pass"]} for k, c in criteria.items()},
    }


def cmd_summarize(args) -> int:
    """The calibration JSON from each run's final report (intact) and its self-test (the planted faults)."""
    from nanodit.provenance import code_version

    runs, card = [], None
    for run in _runs(Path(args.root)):
        p = run / "report" / "scores.json"
        if not p.is_file():
            continue
        s = json.loads(p.read_text())
        ident = s.get("identity", {})
        config = json.loads((run / "cmd.json").read_text())["cmd"]
        config = " ".join(a for a in config if not a.startswith(("run.dir=", "run.progress=")))
        seed = int(ident.get("seed", 0))
        card = card or s["sampling"]["device"]
        entry = _variant_entry(config, seed, "intact", s["decision"], s["criteria"])
        entry["name"] = run.name
        entry["diagnosis"] = [c["diagnosis"] for c in s["criteria"].values() if "diagnosis" in c]
        entry["sampling"] = {
            k: s["sampling"][k]
            for k in ("steps", "shift", "guidance_dino", "guidance_text", "samples_per_test")
        }
        runs.append(entry)
        for f in (s.get("self_test") or {}).get("faults", {}).values():
            e = _variant_entry(config, seed, f["fault"], f["decision"], f["criteria"])
            e.update(name=run.name, target=f["target"], caught=f["caught"])
            runs.append(e)
    ver = code_version()
    doc = {
        "card": card,
        "commit": ver["commit"],
        "torch": ver["torch"],
        "triton": ver["triton"],
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    for r in runs:
        crit = " ".join(
            f"{k}={v['value']:.3g}{'' if v['pass'] else '!'}"
            for k, v in r["criteria"].items()
            if v["value"] is not None
        )
        print(f"{r['name']:>16} {r['variant']:>10}: {r['decision']:<10} {crit}")
    return 0


def cmd_pack(args) -> int:
    """The runs' logs, metrics and reports (no checkpoints, no TensorBoard) in one archive."""
    root = Path(args.root)
    with tarfile.open(args.out, "w:gz") as tar:
        for p in sorted(root.glob("*.log")):
            tar.add(p, arcname=p.name)
        for run in _runs(root):
            for name in ("cmd.json", "config.yaml", "metrics.jsonl", "summary.json"):
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"{run.name}/{name}")
            for folder in ("report",):
                if (run / folder).is_dir():
                    tar.add(run / folder, arcname=f"{run.name}/{folder}")
            for sd in sorted((run / "validation").glob("step-*/scores.json")):
                tar.add(sd, arcname=f"{run.name}/validation/{sd.parent.name}/scores.json")
    print(f"packed {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start")
    st.add_argument("--root", required=True)
    st.add_argument("--name", required=True)
    st.add_argument("train_args", nargs=argparse.REMAINDER)
    wt = sub.add_parser("wait")
    wt.add_argument("--root", required=True)
    wt.add_argument("--timeout", type=float, default=500)
    gr = sub.add_parser("grid")
    gr.add_argument("--root", required=True)
    gr.add_argument("--samples", type=int, default=32)
    gr.add_argument("--grid", default="1,1,1")
    gr.add_argument("--out", required=True)
    rv = sub.add_parser("revalidate")
    rv.add_argument("--root", required=True)
    rv.add_argument("val_args", nargs=argparse.REMAINDER)
    sm = sub.add_parser("summarize")
    sm.add_argument("--root", required=True)
    sm.add_argument("--out", required=True)
    pk = sub.add_parser("pack")
    pk.add_argument("--root", required=True)
    pk.add_argument("--out", required=True)
    args = ap.parse_args()
    for key in ("train_args", "val_args"):
        if getattr(args, key, None) and getattr(args, key)[0] == "--":
            setattr(args, key, getattr(args, key)[1:])
    return {
        "start": cmd_start,
        "wait": cmd_wait,
        "grid": cmd_grid,
        "revalidate": cmd_revalidate,
        "summarize": cmd_summarize,
        "pack": cmd_pack,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
