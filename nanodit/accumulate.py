"""Gradient accumulation (``train.grad_accum``): one optimizer step over several micro-batches, for a batch that does
not fit the card at once (the production model at batch 16 on a 24 GB card).

- a process's batch of n samples is cut the way the loaders cut a bucket among ranks: micro-batch j holds samples
  [j n / A, (j + 1) n / A), and its loss weighs n_j / n, so the accumulated gradient is the batch-mean gradient
  and the logged loss the batch-mean loss. A bucket's last batch may hold fewer than A samples: an empty
  micro-batch then runs the batch's first sample with weight 0, so that every rank runs A forward passes (FSDP's
  all-gathers must pair up across ranks) and draws the same amount of noise;
- micro-batch j of rank r draws its t and noise from generator slot r A + j (``slot_seed``). Slot 0 is seeded by
  train.seed alone, so one process without accumulation draws what it always drew, and a run's noise depends
  only on world size x grad_accum: 2 processes, and 1 process with grad_accum=2, draw the same noise (and compute
  the same step where their batches hold the same samples: tests/test_distributed.py);
- under DDP and FSDP the gradients are reduced only in the last micro-batch's backward (``Dist.no_sync``).
With grad_accum=1 the trainer does not come here: its step is the one it always was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from nanodit.flow import training_loss

if TYPE_CHECKING:
    from nanodit.data.batch import Batch


def slot_seed(seed: int, slot: int, step: int = 0) -> int:
    """The seed of generator slot ``slot`` (train.seed itself for slot 0 at step 0). ``step``: a slot that a resume
    on another layout brings in fresh is seeded by the step too, so it never replays an earlier stream."""
    if slot == 0 and step == 0:
        return seed
    words = np.random.SeedSequence([seed, slot, step]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])  # < 2**63


def take(batch: Batch, lo: int, hi: int) -> Batch:
    """Samples [lo, hi) of a batch: every tensor and list cut along the batch, the epoch kept."""

    def cut(v):
        return v[lo:hi] if torch.is_tensor(v) or isinstance(v, list) else v

    return dataclasses.replace(
        batch, **{f.name: cut(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    )


def micro_batches(batch: Batch, parts: int) -> list[tuple[Batch, float]]:
    """(micro-batch, weight) for each of ``parts`` micro-batches; the weights sum to 1 (see the module docstring)."""
    n = batch.latent.shape[0]
    out = []
    for j in range(parts):
        lo, hi = j * n // parts, (j + 1) * n // parts
        out.append((take(batch, lo, hi), (hi - lo) / n) if hi > lo else (take(batch, 0, 1), 0.0))
    return out


def forward_loss(
    run, batch: Batch, generator: torch.Generator, loss_fn: Callable = training_loss, noise=None
):
    """(loss, stats) of ``batch`` through the step's module: ``loss_fn`` (flow.training_loss) with the run's
    train.* settings and ``generator``'s t and noise (or ``noise``: (t, eps) drawn beforehand by flow.draw_noise).
    The trainer's step without accumulation is this alone."""
    t = run.cfg.train
    return loss_fn(
        run.fwd,
        batch,
        run.model.ops.flow_loss,
        generator,
        t.t_mean,
        t.t_std,
        t.loss_bins,
        run.autocast,
        t.t_shift,
        # passed only when drawn: a loss_fn of the plain signature still serves the eager step
        **({} if noise is None else {"noise": noise}),
    )


def accumulate(run, batch: Batch, loss_fn: Callable = training_loss) -> tuple[torch.Tensor, dict]:
    """Zero the gradients, then forward and backward each micro-batch of ``batch`` (``loss_fn``: see
    ``forward_loss``); the gradients hold the batch-mean gradient. Returns (batch-mean loss, per-t-bin stats
    summed over the micro-batches), as one pass over the whole batch would."""
    prof = run.prof
    generators = [run.generator, *run.micro_generators]
    parts = micro_batches(batch, run.cfg.train.grad_accum)
    run.optim.zero_grad(set_to_none=True)
    total, bins = None, None
    for j, (micro, w) in enumerate(parts):
        with run.dist.no_sync(skip=j < len(parts) - 1):
            with prof.region("forward+loss"):
                loss, stats = forward_loss(run, micro, generators[j], loss_fn)
            with prof.region("backward"):
                (loss * w).backward()
        part = loss.detach() * w
        counted = torch.stack([stats["bin_sum"], stats["bin_count"]]) * (1.0 if w > 0 else 0.0)  # (2, bins)
        total = part if total is None else total + part
        bins = counted if bins is None else bins + counted
    return total, {"bin_sum": bins[0], "bin_count": bins[1]}
