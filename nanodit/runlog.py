"""The run folder's bookkeeping: the folder itself, ``metrics.jsonl`` (+ TensorBoard), the loss window between
log rows, and what a resumed run carries over so that its records read as one uninterrupted run.

- ``prepare_run_dir``: the folder and ``checkpoints/`` are created and proven writable before any work (a
  one-line ``RunDirError`` otherwise), and temp files that a killed run left behind are removed;
- ``MetricsLogger``: one JSON row per log step; opened at a resumed step, it first drops the rows after that
  step (the killed run logged them, the resumed run logs them again) and a torn last line, and TensorBoard
  purges its events after that step, so every step appears once;
- ``LossWindow``: device-side sums over the steps since the last row (no host sync until the row is written);
  its state goes into every checkpoint, so a run stopped between two log steps writes the same next row;
- ``Stages``: where the job's wall time went (``summary.json``'s ``stages_s``), the clock behind
  ``bench/decision_time.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from nanodit.data.schema import skip_counts


class RunDirError(RuntimeError):
    """The run folder cannot be used; the message is one line."""


def prepare_run_dir(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` and ``checkpoints/``, prove both writable, remove stale ``*.tmp`` files in both
    (returned). Raises RunDirError naming the folder."""
    ckpt_dir = run_dir / "checkpoints"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for d in (run_dir, ckpt_dir):
            probe = d / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"run.dir={run_dir}: cannot write there ({e.strerror or e}: {e.filename or run_dir})"
        ) from None
    # a temp file is never a checkpoint (only a completed rename makes one, checkpoint.py), nor a config,
    # summary or metrics file (write_atomic): what a killed run left of one goes
    stale = sorted(
        p for d in (ckpt_dir, run_dir) for p in d.iterdir() if p.name.endswith(".tmp") and p.is_file()
    )
    for p in stale:
        p.unlink()
    return stale


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (and drop a torn line); returns how many went."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and int(row.get("step", step + 1)) <= step
        except (ValueError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        write_atomic(path, "".join(line + "\n" for line in keep))
    return dropped


def first_logged_loss(path: Path) -> float | None:
    """The first training loss in ``metrics.jsonl`` (a run resumed from a checkpoint that predates the key)."""
    if not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)):
            return float(row["loss"])
    return None


class MetricsLogger:
    """Metrics to ``metrics.jsonl`` in the run folder and to TensorBoard, from ``start_step`` on."""

    def __init__(self, run_dir: Path, tensorboard: bool, start_step: int = 0):
        self.dropped = truncate_metrics(run_dir / "metrics.jsonl", start_step)
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tb = None
        self._media = None
        # purge_step: events at or after it (logged by a run that was killed later) are dropped
        self._purge = start_step + 1 if start_step else None
        self._lock = threading.Lock()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=self._purge)

    def media(self):  # -> SummaryWriter | None (torch.utils.tensorboard is imported only where it is used)
        """The TensorBoard writer for the validation's images and text, or None without TensorBoard: a second
        event file in the same folder, with its own queue, lock and writer thread, so that a background
        validation writing and flushing megabytes of PNGs never holds up the training thread's scalars
        (sharing one writer stalled a log row 1.1-1.7 s after each validation on an H200)."""
        if self.tb is None:
            return None
        with self._lock:
            if self._media is None:
                from torch.utils.tensorboard import SummaryWriter

                self._media = SummaryWriter(self.tb.log_dir, purge_step=self._purge, filename_suffix=".media")
            return self._media

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
                elif isinstance(v, dict):  # e.g. skipped samples by reason
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)):
                            self.tb.add_scalar(f"{k}/{kk}", vv, step)

    def close(self) -> None:
        self.file.close()
        for writer in (self.tb, self._media):
            if writer is not None:
                writer.close()


class LossWindow:
    """Sums over the steps since the last log row: loss and per-t-bin losses on the device, counts on the host.
    Non-finite steps (``ok`` False) add nothing but are counted."""

    def __init__(self, device: torch.device, bins: int):
        self.loss = torch.zeros((), device=device)
        self.bins = torch.zeros(2, bins, device=device)
        self.steps, self.samples, self.wait = 0, 0, 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, stats: dict, ok: torch.Tensor, samples: int) -> None:
        self.loss += torch.where(ok, loss.detach(), 0.0)  # bitwise the loss when it is finite
        self.bins += torch.where(ok, torch.stack([stats["bin_sum"], stats["bin_count"]]), 0.0)
        self.steps += 1
        self.samples += samples

    def reset(self, t0: float | None = None) -> None:
        """Empty the window; the next one is timed from ``t0`` (the last row's reading: consecutive rows then
        tile the loop, the logging between them included) or from now."""
        self.loss.zero_()
        self.bins.zero_()
        self.steps, self.samples, self.wait = 0, 0, 0.0
        self.t0 = time.perf_counter() if t0 is None else t0

    def state_dict(self) -> dict:
        return {
            "loss": self.loss.cpu(),
            "bins": self.bins.cpu(),
            "steps": self.steps,
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict) -> None:
        self.loss.copy_(state["loss"])
        self.bins.copy_(state["bins"])
        self.steps, self.samples = int(state["steps"]), int(state["samples"])


def log_row(window: LossWindow, bad: list, lr: float, gnorm, epoch: int, bins: int, now: float) -> dict:
    """The metrics row of a log step: means over the window's finite steps (loss None if it had none), and
    how many were not finite (only when some were: rows stay as they were otherwise). Its speed is timed
    from ``window.t0`` to ``now`` (a ``time.perf_counter()`` reading)."""
    elapsed = now - window.t0
    good = window.steps - len(bad)
    row = {
        "loss": window.loss.item() / good if good else None,
        "lr": lr,
        "samples_per_s": window.samples / elapsed,
        "ms_per_step": 1000 * elapsed / window.steps,
        "epoch": epoch,
        "data_wait_frac": window.wait / elapsed,
    }
    if gnorm is not None:
        row["grad_norm"] = float(gnorm)
    bs, bc = window.bins.tolist()
    for i in range(bins):
        if bc[i] > 0:
            row[f"loss_t{i / bins:.1f}"] = bs[i] / bc[i]
    if bad:
        row["nonfinite_steps"] = len(bad)
    return row


@contextlib.contextmanager
def timed(into: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall seconds of the ``with`` body to ``into[key]`` (0 where absent), also when it raises."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - t0


class Stages:
    """Host wall seconds of a training job by stage, from ``train()``'s entry to the written summary:

    - ``data``: writing the built-in set (a cold run) and building the loader (reading, checking, caching);
    - ``model``: the model, optimizer, EMA, validator and compile wrappers (the compile itself happens later);
    - ``warmup``: the training steps in which a batch shape is met for one of its first ``WARM_CALLS`` times:
      torch.compile traces and compiles there, and CUDA graphs are recorded (their host time; the GPU work
      still queued from earlier steps is waited for only where a stage ends with a sync);
    - ``checkpoints``, ``validation``: their calls (each waits for the GPU as it reads the weights);
    - ``train``: the rest of the loop (the steps at speed, logging, the GPU work the log rows wait for); its
      parts ``log_wait`` (a log step's sync: the GPU's queue drains) and ``log_write`` (the row written);
    - ``other``: what is left of the total (resume, summary, closing records).
    Nothing here syncs the GPU; the step stays free of host syncs."""

    WARM_CALLS = 3  # reduce-overhead: a warm-up call, the recording call, then the first replay
    NAMES = ("data", "model", "warmup", "train", "checkpoints", "validation", "other")

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds = dict.fromkeys(self.NAMES, 0.0)
        self.shapes: dict[tuple, int] = {}
        # stage -> {part: seconds}, where a stage reports parts
        self.breakdown: dict[str, dict[str, float]] = {}

    def __call__(self, name: str) -> contextlib.AbstractContextManager[None]:
        return timed(self.seconds, name)

    def parts(self, stage: str, seconds: dict[str, float]) -> None:
        """Add ``seconds`` by part to ``stage``'s breakdown (summary()'s ``<stage>_parts``)."""
        into = self.breakdown.setdefault(stage, {})
        for part, s in seconds.items():
            into[part] = into.get(part, 0.0) + s

    def step(self, shape: tuple, seconds: float) -> None:
        """A training step of ``shape`` took ``seconds`` of host time: warm-up while the shape is new."""
        seen = self.shapes.get(shape, 0)
        self.shapes[shape] = seen + 1
        if seen < self.WARM_CALLS:
            self.seconds["warmup"] += seconds

    @contextlib.contextmanager
    def loop(self) -> Iterator[None]:
        """The training loop: what its warm-up steps, checkpoints and validations did not take is ``train``."""
        t0 = time.perf_counter()
        before = self._inside()
        try:
            yield
        finally:
            self.seconds["train"] += max(0.0, time.perf_counter() - t0 - (self._inside() - before))

    def _inside(self) -> float:
        return self.seconds["warmup"] + self.seconds["checkpoints"] + self.seconds["validation"]

    def summary(self) -> dict:
        """{stage: seconds, "total": seconds since ``train()``'s entry, "shapes": batch shapes met}."""
        total = time.perf_counter() - self.t0
        out = {
            **self.seconds,
            "other": max(0.0, total - sum(v for k, v in self.seconds.items() if k != "other")),
        }
        parts = {f"{k}_parts": {p: round(s, 3) for p, s in v.items()} for k, v in self.breakdown.items()}
        return {
            **{k: round(v, 3) for k, v in out.items()},
            "total": round(total, 3),
            "shapes": len(self.shapes),
            **({"launch": launch} if (launch := _since_process_start(self.t0)) is not None else {}),
            **parts,
        }


def _since_process_start(t0: float) -> float | None:
    """Seconds from this process's start (Linux ``/proc``: interpreter, imports, config) to ``t0``
    (a ``time.perf_counter()`` reading); None where ``/proc`` does not tell."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")  # the process's age now
    return round(max(0.0, age - (time.perf_counter() - t0)), 3)


def data_line(loader) -> str:
    """What the loader holds: the samples that passed the check (not the manifest's count), what was skipped."""
    n = sum(loader.counts.values())
    buckets = ", ".join(f"{h}x{w}" for h, w in sorted(loader.counts))
    line = (
        f"data: {loader.root} ({n} samples, buckets {buckets}, {loader.batches_per_epoch} batches/epoch), "
        f"loader {loader.name} ({loader.reason})"
    )
    if loader.checked == "stamp":
        line += "; arrays vouched for by the data check's stamp"
    if loader.skipped:
        reasons = ", ".join(f"{k}: {v}" for k, v in skip_counts(loader.skipped).items())
        line += f"; skipped {len(loader.skipped)} of {n + len(loader.skipped)} samples ({reasons}), first: {loader.skipped[0]}"
    return line
