"""Where a training step's time goes: torch.profiler over a few steps, summarised.

``python -m nanodit.train ... train.profile_steps=20`` profiles steps [profile_start, profile_start + 20)
and writes into ``<run>/profile/``:
- ``trace.json``: the Chrome / Perfetto trace (open it in ui.perfetto.dev);
- ``summary.json`` and ``summary.txt``: wall ms per step, GPU-busy ms per step (the sum of kernel and copy
  times: busy << wall means the host is the bottleneck), host ms per step in each region of the loop
  (data, forward, backward, optimizer, ema) and the top kernels.

Outside the profiled window the regions are ``nullcontext``: nothing is recorded and nothing is paid.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

REGIONS = ("data", "forward+loss", "backward", "optimizer", "ema")

# kernel classes by name, first match wins: where a step's GPU time goes, in the terms one optimises it by
KERNEL_CLASSES = (
    ("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
    ("gemm", ("nvjet", "gemm", "gemv", "xmma", "cutlass", "cublas", "sm90_", "sm80_")),
    ("nanodit triton", ("_modulate", "_residual", "_gated", "_flow", "_scale_rows")),
    ("inductor triton", ("triton_",)),
    ("layer norm", ("layer_norm", "layernorm", "gammabeta")),  # GammaBeta...: its weight gradients
    ("optimizer / ema", ("foreach", "multi_tensor", "fused_adam", "adam", "lerp")),
    ("reduction", ("reduce", "norm")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "cat")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, needles in KERNEL_CLASSES:
        if any(n in low for n in needles):
            return cls
    return "other"


def device_busy(prof, steps: int, top: int = 12) -> tuple[float, list[dict]]:
    """(GPU-busy ms per step, the ``top`` kernels by time) from a finished torch.profiler run of ``steps``
    steps: the self device time of every device-side event (kernels, memcpy, memset), each counted once."""
    total, per_kernel, classes = 0.0, [], {}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) is None or "CUDA" not in str(e.device_type):
            continue
        if getattr(e, "is_user_annotation", False) or e.key in REGIONS:
            continue  # a record_function range seen on the GPU timeline (e.g. "Optimizer.step#AdamW.step"): a span, not work
        us = getattr(e, "self_device_time_total", None)
        us = getattr(e, "self_cuda_time_total", 0.0) if us is None else us
        total += us
        per_kernel.append((e.key[:90], us / steps / 1e3, e.count // max(steps, 1)))
        cls = classes.setdefault(kernel_class(e.key), [0.0, 0])
        cls[0] += us / steps / 1e3
        cls[1] += e.count // max(steps, 1)
    per_kernel.sort(key=lambda r: -r[1])
    top_rows = [{"kernel": k, "ms": round(ms, 4), "calls": n} for k, ms, n in per_kernel[:top]]
    by_class = {
        c: {"ms": round(ms, 4), "calls": n}
        for c, (ms, n) in sorted(classes.items(), key=lambda kv: -kv[1][0])
    }
    return total / steps / 1e3, top_rows, by_class


def host_regions(prof, steps: int) -> dict[str, float]:
    """Host ms per step inside each ``record_function`` region of REGIONS (CPU wall time of the range)."""
    out: dict[str, float] = {}
    for e in prof.key_averages():  # a region appears twice on CUDA: its CPU range and its GPU-timeline span
        if e.key in REGIONS and "CUDA" not in str(getattr(e, "device_type", "")):
            out[e.key] = max(out.get(e.key, 0.0), round(e.cpu_time_total / steps / 1e3, 3))
    return out


class StepProfiler:
    """Profile steps [start, start + steps) of a loop (0-based step index); ``steps=0`` disables it.

    Call ``at(step)`` at the top of every step, wrap the loop's parts in ``region(name)``; the summary is
    written when the window closes (or by ``close()`` if the loop ends inside it).
    """

    def __init__(self, out_dir: Path, start: int, steps: int, device: torch.device):
        self.out_dir, self.start, self.steps, self.device = Path(out_dir), start, steps, device
        self._prof = None
        self._t0 = 0.0
        self.summary: dict | None = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def region(self, name: str):
        return torch.profiler.record_function(name) if self._prof is not None else contextlib.nullcontext()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def at(self, step: int) -> None:
        if self.steps <= 0:
            return
        if step == self.start and self._prof is None and self.summary is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._sync()
            self._prof = profile(activities=acts)
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        elif step == self.start + self.steps and self._prof is not None:
            self._finish(self.steps)

    def close(self, step: int) -> None:
        """The loop ended at ``step``: finish a window that is still open (with the steps it saw)."""
        if self._prof is not None:
            self._finish(max(step - self.start, 1))

    def _finish(self, n: int) -> None:
        self._sync()
        wall = (time.perf_counter() - self._t0) / n * 1e3
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        busy, top, classes = device_busy(prof, n, top=40) if self.device.type == "cuda" else (None, [], {})
        self.summary = {
            "steps": n,
            "first_step": self.start + 1,
            "wall_ms_per_step": round(wall, 3),
            "gpu_busy_ms_per_step": None if busy is None else round(busy, 3),
            "host_ms_per_step": host_regions(prof, n),
            "kernel_classes_ms": classes,
            "top_kernels": top,
            "note": "wall includes the profiler's own overhead (a few percent); host regions are CPU wall time",
        }
        (self.out_dir / "summary.json").write_text(json.dumps(self.summary, indent=1))
        table = prof.key_averages().table(
            sort_by="self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total",
            row_limit=30,
        )
        (self.out_dir / "summary.txt").write_text(json.dumps(self.summary, indent=1) + "\n\n" + table)
        prof.export_chrome_trace(str(self.out_dir / "trace.json"))
