"""The whole training step as one CUDA graph per batch shape (``train.step_graph``).

At the nano size the step's kernels take ~17 ms on an H200, but launching them from Python (forward, loss,
backward, clipping, AdamW, EMA: hundreds of launches and autograd's bookkeeping) takes longer: the trainer with
regional compilation and Inductor's CUDA graphs ran 28.8 ms per step against 18.6 ms for the benchmark step
(bench/results). Here the step's device work is captured once per batch shape and replayed, so a step costs the
host a few copies and one graph launch:

- the first step of a shape runs eagerly (it compiles and allocates what is lazy: torch.compile, autograd,
  cuBLAS workspaces, the optimizer's moments); the second is captured, then replayed; every later one is
  replayed. Capturing runs nothing, so every step still runs exactly once, in order, as in the eager loop;
- what changes from step to step enters through device tensors the graph reads: the batch (copied into
  static buffers), t and the noise (drawn outside the graph from the run's generator by ``flow.draw_noise``,
  exactly as the eager step draws them), the learning rate (the optimizer's ``lr``, a device tensor filled
  each step; the fused AdamW runs ``capturable``) and the EMA's lerp weight;
- the non-finite guard stays: its flag and the masked optimizer step are device work inside the graph; the
  flag is recorded outside it (``StepGuard.record`` copies it);
- all graphs share one memory pool, so memory stays that of one step whatever the number of shapes. That is
  safe here although the graphs replay in any order: a graph writes each pool address before it reads it
  within one replay, except its outputs (loss, t-bin sums, flag, gradient norm), which the loop reads right
  after the replay, before any other graph runs; the parameters, moments, EMA, static inputs and the loss
  window live outside the pool;
- one process, no gradient accumulation, CUDA only, and not with ``train.compile_mode=reduce-overhead``
  (Inductor's CUDA graphs inside this one). A shape whose capture fails runs eagerly from then on, with one
  warning; so do shapes past ``max_graphs``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# the tensors of a step that the graph reads: the batch's tensors and the drawn noise
INPUTS = ("latent", "dino", "t5", "t5_mask", "drop_text", "drop_dino", "flipped", "t", "eps")


class StepGraphs:
    """Runs ``body(inputs) -> outputs`` (dicts of tensors) eagerly or as the CUDA graph of its key.

    ``body`` must do device work only (no host reads) and read nothing that changes between steps but its
    ``inputs`` and the tensors ``lr`` and ``ema_weight`` (filled by ``__call__``)."""

    def __init__(self, body: Callable[[dict], dict], device: torch.device, max_graphs: int = 64):
        self.body, self.device, self.max_graphs = body, device, max_graphs
        self.lr = torch.zeros((), device=device)  # (,) fp32
        self.ema_weight = torch.zeros((), device=device)  # (,) fp32: 1 - EMA decay
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, dict]] = {}
        self.seen: set[tuple] = set()
        self.eager_keys: set[tuple] = set()  # capture failed or too many shapes: eager from then on
        self.replays = 0

    @staticmethod
    def key(inputs: dict) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items())

    def __call__(self, inputs: dict, lr: float, ema_weight: float) -> dict:
        self.lr.fill_(lr)
        self.ema_weight.fill_(ema_weight)
        key = self.key(inputs)
        entry = self.graphs.get(key)
        if entry is None and key in self.seen and key not in self.eager_keys:
            entry = self._capture(key, inputs)
        if entry is None:
            self.seen.add(key)
            return self.body(inputs)
        graph, static_in, static_out = entry
        for k, v in inputs.items():
            static_in[k].copy_(v, non_blocking=True)
        graph.replay()
        self.replays += 1
        return static_out

    def _capture(self, key: tuple, inputs: dict):
        if len(self.graphs) >= self.max_graphs:
            log.warning(f"train.step_graph: more than {self.max_graphs} batch shapes; new ones run eagerly")
            self.eager_keys.add(key)
            return None
        static_in = {k: v.clone() for k, v in inputs.items()}  # outside the pool: they outlive every replay
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a loader's own threads (DALI) may use CUDA while this thread captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_out = self.body(static_in)
        except Exception as e:  # an op that cannot be captured: this shape runs eagerly
            log.warning(
                f"train.step_graph: capture failed for shapes {describe(key)} "
                f"({e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); they run eagerly"
            )
            self.eager_keys.add(key)
            return None
        self.graphs[key] = (graph, static_in, static_out)
        return self.graphs[key]


def describe(key: tuple) -> str:
    return ", ".join(f"{k} {list(s)}" for k, s, _ in key if k in ("latent", "t5"))
