"""Peak GPU memory of the production training step at batch 1..16 on one GPU, with and without activation
checkpointing: what fits a 24 GB card, and the ``train.grad_accum`` a batch of 16 then needs.

    python bench/bench_memory.py --out bench/results/<card>-<date>/memory.json             # one GPU
    python bench/bench_memory.py --device cpu --size tiny --batches 1,2 --out /tmp/m.json  # the plumbing, on a CPU

Measured on an H200 at 0868b45 (bench/results/h200-2026-12-02/memory.json, --steps 2: its ms_per_step is no timing);
tests/test_bench_scripts.py runs the CPU plumbing.

The step is the trainer's own (``nanodit.train.setup`` + ``train_step``: bf16 autocast forward, flow loss, backward,
clipping, the guarded fused AdamW, the EMA) at the production shape (32 x 1024, 16 heads, ``configs/production.yaml``)
on 64x64x16 latents (512 px images), DINO 1024-d and captions padded to 256 tokens of 4096 with every token valid
(the longest the design's workload has: the worst case for the caption path). For each batch size and each
``model.activation_checkpointing``: two warm-up steps (AdamW's moments exist after the first), then
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over ``--steps`` more, after resetting the peak; a
batch that runs out of memory is recorded as "oom". ``static_gb`` is what stays allocated between steps (fp32
weights, gradients, two AdamW moments, the EMA: ~20 bytes a parameter).

A micro-batch "fits 24 GB" when its reserved peak stays under ``--budget-gb`` (default 22: a 24 GB card minus the
CUDA context, cuBLAS/cuDNN workspaces and fragmentation; an H200's numbers are a lower bound for a smaller card,
whose attention backend and workspaces may differ). ``accumulation`` names, for a global batch of 16 on one such
card, the largest micro-batch that fits and the grad_accum = 16 / micro-batch that gets there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # script mode: import nanodit from the repo

L = 256  # T5 tokens per caption, all valid


class FixedBatches:
    """A loader that yields one batch of ``B`` random production-shape samples again and again (the trainer's
    ``Batch``, built by the loaders' own ``make_batch``)."""

    def __init__(self, B: int, manifest: dict, size: int, device: torch.device, seed: int = 0):
        from nanodit.data.batch import make_batch

        g = torch.Generator().manual_seed(seed)
        C, Dd, Dt = manifest.get("latent_channels", 16), manifest["dino_dim"], manifest["t5_dim"]
        self.batch = make_batch(
            latent=torch.randn(B, C, size, size, generator=g).half().to(device),  # (B, C, H, W)
            dino=torch.randn(B, Dd, generator=g).half().to(device),  # (B, Dd)
            t5=torch.randn(B, L, Dt, generator=g).half().to(device),  # (B, L, Dt)
            t5_mask=torch.ones(B, L, dtype=torch.bool, device=device),  # (B, L)
            flags=torch.zeros(3, B, dtype=torch.bool, device=device),  # (3, B): no flip, no CFG dropout
            ids=[f"bench-{i}" for i in range(B)],
            captions=[""] * B,
            epoch=0,
        )

    def __next__(self):
        return self.batch

    def state_dict(self) -> dict:
        return {"epoch": 0, "index": 0}

    def close(self) -> None:
        pass


def build_run(args, tmp: Path):
    """The trainer's Run for the production config (no validation, no compile), records opened."""
    from nanodit.config import load_config
    from nanodit.train import _open_records, setup

    over = [
        f"run.dir={tmp / 'run'}",
        f"data.cache_dir={tmp / 'cache'}",
        "data.synth_samples=8",
        f"model.size={args.size}",
        f"train.device={args.device}",
        "train.compile=false",
        "train.batch_size=16",
        "train.log_every=100000",
        "val.every=0",
        "val.at_end=false",
        "run.tensorboard=false",
        "run.progress=false",
    ]
    if args.size != "production":
        over += ["data.synth_size=16"]
    if args.device == "cpu":
        over += ["train.precision=fp32"]
    run = setup(load_config("production", over), progress=False)
    _open_records(run)
    return run


def measure(run, B: int, ac: bool, steps: int, size: int) -> dict:
    """One row: the peak of ``steps`` steps at batch ``B`` after two warm-up steps."""
    from nanodit.train import train_step

    cuda = run.device.type == "cuda"
    run.loader = FixedBatches(B, run.manifest, size, run.device)
    run.model.activation_checkpointing = ac
    row = {"batch": B, "activation_checkpointing": ac}
    try:
        for _ in range(2):
            train_step(run)
        if cuda:
            torch.cuda.synchronize(run.device)
            row["static_gb"] = torch.cuda.memory_allocated(run.device) / 2**30
            torch.cuda.reset_peak_memory_stats(run.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(run)
        if cuda:
            torch.cuda.synchronize(run.device)
        row["ms_per_step"] = 1000 * (time.perf_counter() - t0) / steps
        row["peak_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30 if cuda else None
        row["reserved_gb"] = torch.cuda.max_memory_reserved(run.device) / 2**30 if cuda else None
    except torch.OutOfMemoryError:
        row.update(peak_gb="oom", reserved_gb="oom")
    run.optim.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.empty_cache()
    return row


def accumulation(rows: list[dict], budget_gb: float, batch: int = 16) -> dict:
    """For each activation_checkpointing setting: the largest micro-batch dividing ``batch`` whose reserved peak
    fits the budget, and the grad_accum it needs (None: not even batch 1 fits)."""
    out = {}
    for ac in (False, True):
        fits = [
            r["batch"]
            for r in rows
            if r["activation_checkpointing"] == ac
            and isinstance(r.get("reserved_gb"), float)
            and r["reserved_gb"] <= budget_gb
            and batch % r["batch"] == 0
        ]
        micro = max(fits) if fits else None
        out[f"activation_checkpointing={str(ac).lower()}"] = {
            "micro_batch": micro,
            "grad_accum": batch // micro if micro else None,
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument(
        "--device", default="cuda", help="cuda (the measurement) or cpu (a check of the plumbing)"
    )
    ap.add_argument("--size", default="production", help="model.size (tiny: the CPU check)")
    ap.add_argument("--batches", default=",".join(str(b) for b in range(1, 17)))
    ap.add_argument("--steps", type=int, default=3, help="measured steps per row, after two warm-up steps")
    ap.add_argument("--budget-gb", type=float, default=22.0)
    args = ap.parse_args(argv)
    from nanodit.device import device_name
    from nanodit.provenance import code_version

    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(args, Path(tmp))
        size = 64 if args.size == "production" else 16
        rows = []
        for B in [int(b) for b in args.batches.split(",")]:
            for ac in (False, True):
                rows.append(measure(run, B, ac, args.steps, size))
                print(json.dumps(rows[-1]), flush=True)
        params = sum(p.numel() for p in run.model.parameters())
        run.close()
    result = {
        "card": device_name(torch.device(args.device)),
        **code_version(),
        "date": time.strftime("%Y-%m-%d"),
        "workload": f"{args.size} ({params / 1e6:.1f}M params), latents 16x{size}x{size}, DINO 1024, T5 {L}x4096 "
        "all valid, bf16 autocast, fused AdamW, EMA; the trainer's train_step",
        "budget_gb": args.budget_gb,
        "rows": rows,
        "accumulation": accumulation(rows, args.budget_gb),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
