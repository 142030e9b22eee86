"""Where one validation's time goes on a GPU: the nano model (untrained weights: the sampler's cost does not depend
on them) judged on the built-in shapes set, the Validator's part timers over repeated evaluations, then one evaluation
under torch.profiler (host vs device time, the top ops). Writes ``OUT/validation_profile.json`` and ``.txt``.

    python scripts/profile_validation.py OUT [key=value ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanodit.config import load_config
from nanodit.model import build_model
from nanodit.shapes import make_dataset
from nanodit.validation import Validator, read_val_samples


def main(out: str, overrides: list[str]) -> None:
    cfg = load_config("nano", overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a check of the script
    root = Path(tempfile.mkdtemp(prefix="nanodit-valprof-"))
    make_dataset(
        root / "data", samples=cfg.data.synth_samples, seed=cfg.data.synth_seed, size=cfg.data.synth_size
    )
    manifest, groups = read_val_samples(root / "data", cfg.val.samples)
    (root / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": 10 * i, "loss": 1.0}) + "\n" for i in range(1, 9))
    )
    torch.manual_seed(0)
    model = (
        build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"])
        .to(device)
        .eval()
        .requires_grad_(False)
    )
    v = Validator(cfg, manifest, groups, device)
    rows = []
    # the first evaluation pays cuDNN plans and Triton JIT; the later ones are what a run's validations see
    for i in range(3):
        t0 = time.perf_counter()
        v.timing = {}
        v.evaluate(model, root)
        rows.append({"evaluation": i, "wall_s": time.perf_counter() - t0, **v.timing})
    v.timing = {}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        v.evaluate(model, root)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.self_device_time_total > 0)
    result = {
        "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "overrides": overrides,
        "cases": len(v.cases),
        "evaluations": rows,
        "profiled": {"wall_s": wall, "device_busy_s": device_us / 1e6, **v.timing},
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "validation_profile.json").write_text(json.dumps(result, indent=2) + "\n")
    table = events.table(sort_by="self_cpu_time_total", row_limit=25)
    if device.type == "cuda":
        table += "\n" + events.table(sort_by="self_device_time_total", row_limit=15)
    (Path(out) / "validation_profile.txt").write_text(table)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
