"""Where the nano step's GPU time comes from, by line of nanodit code.

    python bench/step_anatomy.py --out step_anatomy.json [--variant triton-eager] [--t5-len 32]

The benchmark step of ``bench_step.py`` (forward, flow loss, backward, clipping, AdamW, EMA; B16, bf16), run
eagerly under torch.profiler with Python stacks: every kernel's device time is charged to the innermost frame of
``nanodit/`` (or ``torch/optim``, ``torch/nn/utils``) in the stack of the op that launched it, and to the op
itself. A backward kernel has no Python stack of its own; it is charged to its autograd node's name. The step
graph replays the same kernels, so the table says which lines of the model a faster step has to change.
``--t5-len 32`` is the trainer's padded caption length on the shapes world (``data.t5_pad_multiple``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402

from nanodit.tracing import kernel_class  # noqa: E402

KEEP = ("nanodit/", "torch/optim/", "torch/nn/utils/")


def _ours(name: str) -> bool:
    return any(k in name for k in KEEP) and "step_anatomy" not in name and "bench_step" not in name


def attribute(e) -> str:
    """The two innermost frames of our code (or the optimizer / clipping) above ``e`` in the profiler's tree
    (Python frames are events there, parents of the ops they called), innermost first; for a backward op, its
    autograd node's name."""
    frames, p = [], e.cpu_parent
    while p is not None and len(frames) < 2:
        if "autograd::engine" in p.name:
            return "backward: " + p.name.split(": ")[-1]
        if _ours(p.name):
            frames.append(p.name.split("site-packages/")[-1])
        p = p.cpu_parent
    return " <- ".join(frames) if frames else "?"


def anatomy(steps: int, prof) -> dict:
    by_site: dict[str, list] = defaultdict(lambda: [0.0, 0])
    by_op: dict[str, list] = defaultdict(lambda: [0.0, 0])
    by_class: dict[str, list] = defaultdict(lambda: [0.0, 0])
    total = 0.0
    for e in prof.events():
        kernels = getattr(e, "kernels", [])
        if not kernels:
            continue
        where = attribute(e)
        for k in kernels:
            us = k.duration
            total += us
            for table, key in ((by_site, where), (by_op, e.name), (by_class, kernel_class(k.name))):
                table[key][0] += us / steps / 1e3
                table[key][1] += 1 / steps

    def rows(t, n=60):
        return [
            {"where": k, "ms": round(v[0], 4), "kernels": round(v[1], 1)}
            for k, v in sorted(t.items(), key=lambda kv: -kv[1][0])[:n]
        ]

    return {
        "gpu_ms_per_step": round(total / steps / 1e3, 3),
        "kernels_per_step": round(sum(v[1] for v in by_class.values()), 1),
        "by_class": rows(by_class),
        "by_site": rows(by_site),
        "by_op": rows(by_op),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--variant", default="triton-eager")
    ap.add_argument("--t5-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_anatomy: needs a CUDA device (kernel times come from CUPTI)")
    bench_step.L = args.t5_len
    device = torch.device("cuda")
    step, _, _ = bench_step.make_step(args.variant, device)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    out = {"variant": args.variant, "t5_len": args.t5_len, "card": torch.cuda.get_device_name()}
    out.update(anatomy(args.steps, prof))
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
