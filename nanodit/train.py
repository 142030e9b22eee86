"""Train NanoDiT by flow matching.

    python -m nanodit.train                                   # nano on a GPU, smoke on a CPU, built-in shapes data
    python -m nanodit.train --config configs/nano.yaml run.dir=runs/nano train.precision=bf16
    python -m nanodit.train --config smoke run.dir=runs/smoke train.resume=auto
    torchrun --standalone --nproc_per_node 2 -m nanodit.train --config production run.dir=runs/prod  # several GPUs

The story, one function each: ``setup`` (config -> device -> run folder -> data -> model -> optimizer/EMA ->
validator -> compile -> resume), ``loop`` (``train_step``, ``log_step``, checkpoint, validate, stop), ``teardown``
(final checkpoint, final validation with the self-test, summary, the last lines).

Under torchrun the same story runs on every rank (nanodit/distributed.py owns what differs: the process group, the
DDP/FSDP wrapper, the agreement between ranks; nanodit/dist_checkpoint.py the checkpoint folders): rank 0 alone
writes the run folder's records and validates, every rank checkpoints and resumes together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanodit import distributed
from nanodit.accumulate import accumulate, forward_loss, slot_seed
from nanodit.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    list_checkpoints,
    save_state,
)
from nanodit.config import Config, ConfigError, describe, load_config, to_dict, to_yaml
from nanodit.data import build_loader
from nanodit.data.batch import Batch
from nanodit.data.prepare import prepare
from nanodit.data.schema import skip_counts
from nanodit.data.shards import ShardError
from nanodit.device import DeviceError, pick_device, set_precision
from nanodit.dist_checkpoint import layout_warnings, process_rng, restore, save_dcp, without_tensors
from nanodit.flow import draw_noise, training_loss
from nanodit.logs import add_verbosity, command_logging, ensure_configured, progress_safe, quieted, verbosity
from nanodit.model import build_model
from nanodit.nonfinite import StepGuard, grad_norm, stop_message
from nanodit.optim import EMA, build_optimizer, ema_decay_at, lr_at
from nanodit.provenance import code_version
from nanodit.resume import check_compatible, load_into, pick_checkpoint
from nanodit.runlog import (
    LossWindow,
    MetricsLogger,
    RunDirError,
    Stages,
    data_line,
    first_logged_loss,
    log_row,
    prepare_run_dir,
    write_atomic,
)
from nanodit.signals import GracefulStop, Interrupted, signal_name
from nanodit.step_graph import StepGraphs
from nanodit.tracing import StepProfiler
from nanodit.validation import Validator, read_val_samples, write_final
from nanodit.validation.report import decision_lines

log = logging.getLogger("nanodit.train")  # by name: under python -m nanodit.train, __name__ is __main__


class TrainError(RuntimeError):
    """A problem a user can fix; printed as one line."""


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The training thread
# gives the GIL up at every torch call and asks for it back microseconds later; while a worker thread runs
# Python (the validation report's plots, the TensorBoard images, pickling a checkpoint, the background
# imports), each of those asks can wait the whole interval, and a step that makes dozens of calls falls behind
# the GPU. At 0.1 ms, 30 tiny torch calls beside a busy Python thread took 1.3-2.5 ms instead of 5-70 ms (CPU
# probe; 0.10 -> 365 ms at 5 ms on an H200 host: bench/results/h200-2026-12-03/); the worker thread runs ~15% slower.
GIL_SWITCH_S = 1e-4


@contextlib.contextmanager
def gil_switch_interval(seconds: float = GIL_SWITCH_S) -> Iterator[None]:
    """``sys.setswitchinterval(seconds)`` for the block, the previous interval restored after it."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def train(cfg: Config, quiet: bool = False, stop_after: int | None = None) -> dict:
    """Run a training job described by ``cfg``. Returns a summary dict (also written as summary.json).

    Progress lines go to the ``nanodit`` logger (nanodit/logs.py: printed to stdout unless the program set up
    logging itself); ``quiet``: no bar, warnings only. ``stop_after`` (tests): stop after that step with a checkpoint, as if the job had been interrupted.
    SIGINT/SIGTERM stop it the same way and raise ``Interrupted`` (nanodit/signals.py).
    """
    ensure_configured()
    stages = Stages()
    with (
        gil_switch_interval(),  # the step's launches first, whatever the worker threads are doing
        distributed.session(cfg, agreed=(Interrupted, TrainError)) as dist,
        GracefulStop(grace_s=2.0 if dist.world > 1 else 0.0) as stop,
        quieted(
            quiet or not dist.is_main, logging.WARNING if dist.is_main else logging.ERROR
        ),  # rank 0 speaks
    ):
        quiet = quiet or not dist.is_main
        run = setup(cfg, progress=cfg.run.progress and not quiet, dist=dist, stages=stages)
        with progress_safe(run.progress):
            if not loop(run, stop, stop_after):
                return {"run_dir": str(run.dir), "steps": run.step, "interrupted": True}
            return teardown(run)


@dataclass
class Run:
    """Everything a training job holds: built by ``setup``, advanced by ``loop``, closed by ``teardown``."""

    cfg: Config
    progress: bool  # progress bars (the data check's and the training bar)
    device: torch.device
    autocast: object
    dir: Path
    manifest: dict
    loader: object
    model: torch.nn.Module
    fwd: torch.nn.Module  # the model as called in the step (compiled, or the model itself)
    generator: torch.Generator
    optim: torch.optim.Optimizer
    ema: EMA
    guard: StepGuard
    validator: Validator | None
    cudagraphs: bool
    skipped: dict  # samples the loader skipped, by reason (data.on_error=skip)
    stages: Stages  # where the job's wall time goes (summary.json's stages_s)
    # this process's rank and strategy, the agreement between ranks (nanodit/distributed.py)
    dist: distributed.Dist = field(default_factory=distributed.Dist)
    micro_generators: list = field(default_factory=list)  # noise of micro-batches 1.. (train.grad_accum)
    validates: bool = False  # validation runs in this run (on rank 0; the other ranks wait for it)
    step: int = 0
    book: dict = field(default_factory=dict)  # carried over a resume: loss window, first loss, bad steps
    metrics: MetricsLogger | None = None
    window: LossWindow | None = None
    bar: object = None
    prof: StepProfiler | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    nonfinite_total: int = 0
    rows_logged: int = 0
    saved: dict = field(default_factory=dict)  # step -> checkpoint path written by this process
    shape: tuple = ()  # the last step's batch shapes (Stages: warm-up while a shape is new)
    graphs: StepGraphs | None = None  # train.step_graph: the whole step as a CUDA graph per batch shape
    # one process's checkpoints (train.checkpoint_async: written in the background)
    writer: CheckpointWriter | None = None

    def state(self, at: int) -> dict:
        """The complete resume state at step ``at``."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optim": self._optim_state(),
            "step": at,
            "rng": process_rng(self),
            "loader": self.loader.state_dict(),
            "config": to_dict(self.cfg),
            "manifest": self.manifest,
            "log": {
                "window": self.dist.window_state(self.window),
                "first_loss": self.first_loss,
                "nonfinite_steps": self.nonfinite_total,
                "guard": self.guard.state_dict(),  # the bad-step flags since the last log row
            },
        }

    def _optim_state(self) -> dict:
        """The optimizer's state; under train.step_graph with the lr a float and ``capturable`` off again, so that
        the checkpoint reads as any other run's (and resumes on a CPU)."""
        state = self.optim.state_dict()
        if self.graphs is not None:
            for group in state["param_groups"]:  # copies of the live groups
                group["lr"], group["capturable"] = float(group["lr"]), False
        return state

    def checkpoint(self, at: int, wait: bool = False) -> Path:
        """Save the state of step ``at`` (one process: written in the background unless ``wait``, see
        ``CheckpointWriter``); the path it has once written."""
        with self.stages("checkpoints"):
            if at not in self.saved:  # a stop right after a periodic save reuses it
                # several processes: a DCP folder, every rank writing its part
                if self.dist.sharded_checkpoints:
                    keep = self.cfg.train.keep_checkpoints
                    self.saved[at] = save_dcp(self.dir / "checkpoints", at, self.state(at), self.dist, keep)
                else:
                    self.saved[at] = self.writer.save(at, self.state(at))
            if wait:
                self.writer.wait()
        return self.saved[at]

    def keep_apart(self, at: int, bad: list) -> Path:
        """The state of a non-finite stop, in ``<run>/nonfinite/`` (never picked by resume=auto)."""
        state = {**self.state(at), "nonfinite": bad}
        if self.dist.sharded_checkpoints:
            return save_dcp(self.dir / "nonfinite", at, state, self.dist)
        return save_state(self.dir / "nonfinite" / f"ckpt-{at:08d}.pt", state)

    def close(self) -> None:
        """Join the background work (a checkpoint write, a report, imports); close the records. An error of a
        checkpoint write not raised by then (another error is on its way) is logged."""
        try:
            self.writer.wait()
        except CheckpointError as e:
            log.error(str(e))
        if self.writer.background:
            self.stages.parts("checkpoints_background", {"write": self.writer.seconds})
            self.writer.seconds = 0.0
        if self.validator is not None:
            self.validator.close()  # the last background report written (before the metrics close)
            self.stages.parts("validation_background", self.validator.background_timing)
            self.validator.background_timing = {}
            if self.validator.imports is not None:
                self.validator.imports.join()  # never leave the interpreter while a module is half imported
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        self.loader.close()


# ---- setup ------------------------------------------------------------------------------------


def setup(
    cfg: Config, progress: bool, dist: distributed.Dist | None = None, stages: Stages | None = None
) -> Run:
    """config -> device -> run folder -> data -> model -> optimizer/EMA -> validator -> compile -> resume.
    ``dist``: this process's place among several (nanodit/distributed.py); None: one process."""
    dist = dist or distributed.Dist(device=pick_device(cfg.train.device))
    stages = stages or Stages()
    device = dist.device
    autocast = set_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    # rank 0 prepares the folder and picks the checkpoint; the others take its answer (without the tensors)
    run_dir, resume_from, state = dist.on_main(lambda: _run_folder(cfg, device, tensors=dist.world == 1))
    with stages("data"):
        # the built-in shapes set is written here when data.path is null (by rank 0 alone); build_loader only reads
        dist.on_main(lambda: prepare(cfg))
        manifest, loader = build_loader(cfg, device, progress=progress)
    log.info(data_line(loader))
    for problem in loader.problems:  # data-set problems kept going under data.on_error=skip
        log.warning("%s", problem)

    with stages("model"):
        model, fwd, generators, optim, ema, validator = _build(cfg, manifest, loader.root, dist)
        fwd, cudagraphs = _compile(cfg, model, fwd, device)
    generator, *micro_generators = generators
    run = Run(
        cfg=cfg,
        progress=progress,
        device=device,
        autocast=autocast,
        dir=run_dir,
        manifest=manifest,
        loader=loader,
        model=model,
        fwd=fwd,
        generator=generator,
        optim=optim,
        ema=ema,
        guard=StepGuard(optim),  # a non-finite step is masked on the device (nanodit/nonfinite.py)
        validator=validator,
        cudagraphs=cudagraphs,
        skipped=skip_counts(loader.skipped),
        stages=stages,
        dist=dist,
        micro_generators=micro_generators,
        validates=bool(cfg.val.every or cfg.val.at_end),
    )
    run.writer = CheckpointWriter(run_dir, cfg.train.keep_checkpoints, background=cfg.train.checkpoint_async)
    if state is not None:
        _resume(run, state, resume_from)
    run.graphs = _step_graphs(run)
    return run


def _build(cfg: Config, manifest: dict, data_root: Path, dist: distributed.Dist):
    """(model, what the step calls before compilation (DDP / FSDP2 / the model), the noise generators, optimizer,
    EMA, validator or None: rank 0 alone validates)."""
    device = dist.device
    model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).to(device)
    log.info(
        f"model: {cfg.model.size} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"kernels={cfg.model.kernels}, attention={cfg.model.attention}, precision={cfg.train.precision}, "
        f"compile={cfg.train.compile}, device={device}"
    )
    fwd = distributed.wrap(dist, model, cfg)  # DDP, FSDP2 (in place) or the model itself
    for line in dist.describe(cfg):  # several processes or micro-batches: how the batch is split
        log.info(line)
    generators = _noise_generators(cfg, dist.rank, device)
    optim = build_optimizer(model, cfg.train, device)
    ema = EMA(model)
    # validation: the run's judge, built once from its config, manifest and samples
    validator = None
    if (cfg.val.every or cfg.val.at_end) and dist.is_main:
        _, val_groups = read_val_samples(data_root, cfg.val.samples, cfg.data.on_error)
        validator = Validator(cfg, manifest, val_groups, device)  # its heavy imports start in the loop
    return model, fwd, generators, optim, ema, validator


def _noise_generators(cfg: Config, rank: int, device: torch.device) -> list[torch.Generator]:
    """The t and noise generators of this rank's micro-batches: slot rank * grad_accum + j (nanodit/accumulate.py).
    One process without accumulation: one generator seeded by train.seed, as always."""
    slots = [rank * cfg.train.grad_accum + j for j in range(cfg.train.grad_accum)]
    return [torch.Generator(device=device).manual_seed(slot_seed(cfg.train.seed, s)) for s in slots]


def _run_folder(
    cfg: Config, device: torch.device, tensors: bool = True
) -> tuple[Path, Path | None, dict | None]:
    """The run folder, proven writable, and the checkpoint to resume from (checked against the model).
    ``tensors=False`` (several processes): the state without model/ema/optim (rank 0 sends it to the others)."""
    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir()
    stale = prepare_run_dir(run_dir)  # before any work: a folder that cannot be written is one line
    if stale:
        log.info(
            f"run folder: removed {len(stale)} temp file(s) of an interrupted write ({', '.join(p.name for p in stale)})"
        )
    if cfg.train.resume == "none" and list_checkpoints(run_dir):
        raise TrainError(
            f"run.dir={run_dir} already holds checkpoints; pass train.resume=auto to continue it or pick a new run.dir"
        )
    where = torch.device(pick_device(cfg.train.device)) if tensors else "cpu"
    resume_from, state = pick_checkpoint(run_dir, cfg.train.resume, where, tensors=tensors)
    if state is not None:
        check_compatible(state, cfg)  # the model's shape, before the data is read
        state = state if tensors else without_tensors(state)
    write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    return run_dir, resume_from, state


def _compile(
    cfg: Config, model: torch.nn.Module, fwd: torch.nn.Module, device: torch.device
) -> tuple[torch.nn.Module, bool]:
    """(what the step calls, whether it runs as CUDA graphs); checkpoints always hold the uncompiled module.
    ``fwd``: the module the step calls before compilation (the model, or its DDP wrapper)."""
    cudagraphs = cfg.train.compile and cfg.train.compile_mode == "reduce-overhead" and device.type == "cuda"
    if not cfg.train.compile:
        return fwd, cudagraphs
    # one graph per bucket shape (and per last-batch size and caption length, until dynamo marks those dims
    # dynamic): raise dynamo's default limit of 8 so that no bucket silently falls back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
    # None: torch's automatic dynamic shapes (a dim that changes recompiles once)
    dynamic = cfg.train.compile_dynamic
    if cfg.train.compile_scope == "model":
        return torch.compile(fwd, mode=mode, dynamic=dynamic), cudagraphs
    # regional compilation: every block runs the same compiled code (dynamo lifts the parameters to inputs), so
    # the cold start compiles one block per shape instead of the whole network; the rest of the forward
    # (embedders, final layer) stays eager. In place: state_dict keys are unchanged.
    for block in model.blocks:
        block.compile(mode=mode, dynamic=dynamic)
    return fwd, cudagraphs


def _step_graphs(run: Run) -> StepGraphs | None:
    """train.step_graph on CUDA, one process, no accumulation: the step's device work as a CUDA graph per batch
    shape (nanodit/step_graph.py). The optimizer's lr becomes a device tensor the graphs read, after a resume
    (loading a checkpoint sets the groups' lr). None where it does not apply (said once)."""
    t = run.cfg.train
    if not t.step_graph:
        return None
    off = [
        why
        for why, applies in (
            ("not on CUDA", run.device.type != "cuda"),
            ("several processes", run.dist.world > 1),
            ("train.grad_accum > 1", t.grad_accum > 1),
            ("the optimizer is not fused", not run.guard.fused),
        )
        if applies
    ]
    if off:
        log.info(f"train.step_graph: off ({off[0]}); the step runs eagerly")
        return None
    graphs = StepGraphs(lambda inputs: _graph_body(run, inputs), run.device)
    for group in run.optim.param_groups:
        group["lr"], group["capturable"] = graphs.lr, True
    run.optim.defaults["capturable"] = True
    log.info("train.step_graph: on (the whole step, one CUDA graph per batch shape)")
    return graphs


def _graph_body(run: Run, inputs: dict) -> dict:
    """The step's device work, as ``StepGraphs`` runs or captures it: forward and loss on the drawn noise, backward,
    clipping, the guarded AdamW, the EMA. Nothing here reads the device from the host."""
    t = run.cfg.train
    batch = Batch(**{k: inputs[k] for k in GRAPH_BATCH}, ids=[], captions=[], epoch=0)
    loss, stats = forward_loss(run, batch, run.generator, training_loss, noise=(inputs["t"], inputs["eps"]))
    run.optim.zero_grad(set_to_none=True)
    loss.backward()
    params = list(run.model.parameters())
    gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip > 0 else grad_norm(params)
    ok = run.guard.check(loss, gnorm)
    run.guard.apply(ok)  # masked on the device where not ok
    run.ema.update_with(run.model, run.graphs.ema_weight)
    # detached: nothing may keep this step's autograd graph alive into the next capture
    return {
        "loss": loss.detach(),
        "bin_sum": stats["bin_sum"],
        "bin_count": stats["bin_count"],
        "ok": ok,
        "gnorm": gnorm,
    }


GRAPH_BATCH = ("latent", "dino", "t5", "t5_mask", "drop_text", "drop_dino", "flipped")  # a Batch's tensors


def _graph_step(
    run: Run, batch: Batch, lr: float, decay: float
) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """One step through ``run.graphs``: (loss, t-bin stats, finite flag, gradient norm)."""
    t = run.cfg.train
    # drawn outside the graph, as the eager step draws them
    noise = draw_noise(batch, run.generator, t.t_mean, t.t_std, t.t_shift)
    inputs = {k: getattr(batch, k) for k in GRAPH_BATCH}
    out = run.graphs({**inputs, "t": noise[0], "eps": noise[1]}, lr, 1.0 - decay)
    return out["loss"], {"bin_sum": out["bin_sum"], "bin_count": out["bin_count"]}, out["ok"], out["gnorm"]


def _resume(run: Run, state: dict, path: Path) -> None:
    for warning in check_compatible(state, run.cfg, run.manifest) + layout_warnings(run, state):
        log.warning("%s", warning)
    # weights, EMA, optimizer, loader position, RNG, on any world size (nanodit/dist_checkpoint.py)
    restore(run, state, path, load_into)
    run.step = int(state["step"])
    run.book = state.get("log", {})  # the loss window and the run's first loss (runlog.py)
    log.info(f"resume: {path} (step {run.step})")


# ---- the loop ---------------------------------------------------------------------------------


def loop(run: Run, stop: GracefulStop, stop_after: int | None = None) -> bool:
    """Train from ``run.step`` to ``train.steps``: step, log, checkpoint, validate. False when stopped early by
    ``stop_after``; a signal saves and raises ``Interrupted``; a non-finite step under ``stop`` raises."""
    _open_records(run)
    stop.arm()  # from here a signal stops the run after the current step, with a checkpoint
    with run.stages.loop():
        return _steps(run, stop, stop_after)


def _steps(run: Run, stop: GracefulStop, stop_after: int | None) -> bool:
    """The loop's body, step by step (``loop``)."""
    cfg, t = run.cfg, run.cfg.train
    while run.step < t.steps:
        t0 = time.perf_counter()
        lr, gnorm = train_step(run)
        run.stages.step(run.shape, time.perf_counter() - t0)
        if run.validator is not None and run.step >= IMPORTS_AT_STEP:
            run.validator.start_imports()  # once; the GPU steps hide it
        if run.step % t.log_every == 0 or run.step == t.steps:
            log_step(run, lr, gnorm)
        if run.bar is not None:
            run.bar.update(1)
        if run.step % t.ckpt_every == 0 and run.step < t.steps:
            run.checkpoint(run.step)
        if stop_after is not None and run.step >= stop_after:
            run.checkpoint(run.step, wait=True)
            run.close()
            return False
        signum = run.dist.vote_stop(stop.requested)  # several ranks stop after the same step
        if signum is not None:  # SIGINT / SIGTERM: this step is done; save it and go
            path = run.checkpoint(run.step, wait=True)
            run.close()
            raise Interrupted(
                signum,
                f"interrupted by {signal_name(signum)} after step {run.step}: checkpoint {path} "
                "(continue with train.resume=auto)",
            )
        if run.validates and cfg.val.every and run.step % cfg.val.every == 0 and run.step < t.steps:
            with run.stages("validation"):
                validate_shared(run)
            run.window.t0 = time.perf_counter()
    return True


# The step after which the validation's heavy modules (metrics, plots) are imported in a worker thread. Not
# earlier: the warm-up (Triton's JIT, the graph captures) is Python on the training thread too, and two Python
# threads share one GIL, so an import beside it only moves seconds between them; at speed the training thread
# mostly waits for the GPU. The shapes world meets its 8 batch shapes within ~10 steps (an epoch is ~7).
IMPORTS_AT_STEP = 30


def _open_records(run: Run) -> None:
    """metrics.jsonl (rows after a resumed step go), the loss window, the progress bar, the profiler."""
    t, main = run.cfg.train, run.dist.is_main
    run.metrics = (
        MetricsLogger(run.dir, run.cfg.run.tensorboard, run.step) if main else distributed.NoMetrics()
    )
    if run.progress:
        from tqdm import tqdm  # imported only where a bar is drawn

        run.bar = tqdm(total=t.steps, initial=run.step, desc="train", dynamic_ncols=True)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    run.window = LossWindow(run.device, t.loss_bins)
    if "window" in run.book:
        run.dist.load_window(run.window, run.book["window"])
    if "guard" in run.book:
        run.guard.load_state_dict(run.book["guard"], run.device)
    first = run.book.get("first_loss", first_logged_loss(run.dir / "metrics.jsonl") if run.step else None)
    run.first_loss, run.nonfinite_total = first, int(run.book.get("nonfinite_steps", 0))
    run.prof = StepProfiler(run.dir / "profile", t.profile_start, t.profile_steps if main else 0, run.device)


def train_step(run: Run) -> tuple[float, torch.Tensor | None]:
    """One optimisation step: batch -> flow-matching loss -> backward -> clipped, guarded AdamW -> EMA.
    Returns (learning rate, gradient norm or None); nothing here waits for the GPU."""
    t, prof = run.cfg.train, run.prof
    prof.at(run.step)
    t_wait = time.perf_counter()
    with prof.region("data"):
        batch = next(run.loader)
    run.window.wait += time.perf_counter() - t_wait  # host time in the loader (async copies excluded)
    lr = lr_at(run.step, t.lr, t.min_lr, t.warmup_steps, t.steps)
    decay = ema_decay_at(run.step, t.ema_decay, t.ema_warmup_steps)
    if run.graphs is not None:  # the whole step as one CUDA graph of its batch shape
        with prof.region("graph step"):
            loss, stats, ok, gnorm = _graph_step(run, batch, lr, decay)
        run.guard.record(ok, run.step + 1, batch.ids)
        return _end_step(run, batch, loss, stats, ok, lr, gnorm if t.grad_clip > 0 else None)
    for g in run.optim.param_groups:
        g["lr"] = lr
    if run.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs may be reused
    if t.grad_accum > 1:  # micro-batches, each its own forward and backward (nanodit/accumulate.py)
        loss, stats = accumulate(run, batch, training_loss)
    else:
        with prof.region("forward+loss"):
            loss, stats = forward_loss(run, batch, run.generator, training_loss)
        with prof.region("backward"):
            run.optim.zero_grad(set_to_none=True)
            loss.backward()
    with prof.region("backward"):
        params = run.model.parameters()
        gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip > 0 else None
        gnorm = run.dist.plain(gnorm)  # FSDP: the norm over every shard
    with prof.region("optimizer"):
        ok = run.guard.check(
            loss, gnorm if gnorm is not None else run.dist.plain(grad_norm(run.model.parameters()))
        )
        ok = run.dist.agree_ok(ok)  # several ranks: skipped everywhere if not finite anywhere (on the device)
        run.guard.step(ok, run.step + 1, batch.ids)  # masked on the device where not ok: no host sync
    with prof.region("ema"):
        run.ema.update(run.model, decay)
    return _end_step(run, batch, loss, stats, ok, lr, gnorm)


def _end_step(
    run: Run, batch: Batch, loss, stats: dict, ok, lr: float, gnorm
) -> tuple[float, torch.Tensor | None]:
    run.step += 1
    run.shape = (tuple(batch.latent.shape), tuple(batch.t5.shape))  # the compile cache's key, near enough
    run.window.add(loss, stats, ok, batch.latent.shape[0])
    return lr, gnorm


def log_step(run: Run, lr: float, gnorm: torch.Tensor | None) -> None:
    """The log row of the window since the last one (the one host sync of a log interval), and what a
    non-finite step means under ``train.on_nonfinite``."""
    t, step = run.cfg.train, run.step
    t_enter = time.perf_counter()
    run.writer.poll()  # a checkpoint write that failed in the background ends the run here
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    bad = distributed.merge_bad(run.dist, run.guard.read())  # the window's finite flags, in one transfer
    run.dist.reduce_window(run.window)  # several ranks: the window of the whole run
    run.nonfinite_total += len(bad)
    epoch, now = run.loader.state_dict()["epoch"], time.perf_counter()
    row = log_row(run.window, bad, lr, gnorm, epoch, t.loss_bins, now)
    if run.skipped and not run.rows_logged:
        row["data_skipped"] = run.skipped  # samples skipped by reason, in this process's first row
    run.rows_logged += 1
    if row["loss"] is not None:
        run.first_loss = row["loss"] if run.first_loss is None else run.first_loss
        run.last_loss = row["loss"]
    run.metrics.log(step, row)
    if run.bar is not None and row["loss"] is not None:
        run.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{row['samples_per_s']:.0f}")
    run.window.reset(now)  # the next row's time starts where this one's ended: the rows tile the loop
    # train_parts: the log steps' wait (the sync: the GPU's queue drains) and their writing (rows, TensorBoard)
    run.stages.parts("train", {"log_wait": now - t_enter, "log_write": time.perf_counter() - now})
    if bad and t.on_nonfinite == "stop":
        kept = run.keep_apart(step, bad)
        run.close()
        raise TrainError(stop_message(bad, step, kept))
    if bad:
        log.warning(
            f"step {step}: skipped {len(bad)} non-finite step(s) ({', '.join(str(s) for s, _ in bad[:5])})"
        )


# ---- teardown ---------------------------------------------------------------------------------


def teardown(run: Run) -> dict:
    """Final checkpoint, the final validation (with the self-test), summary.json and the last lines."""
    if run.bar is not None:
        run.bar.close()
        run.bar = None
    run.prof.close(run.step)
    final = run.checkpoint(run.step)
    device = run.device
    summary = {
        "run_dir": str(run.dir),
        "steps": run.step,
        "first_logged_loss": run.first_loss,
        "last_logged_loss": run.last_loss,
        "checkpoint": str(final),
        "data": {
            "samples": sum(run.loader.counts.values()),
            "skipped": run.skipped,
            "checked": run.loader.checked,
        },
        "nonfinite_steps": run.nonfinite_total,
        "params": sum(p.numel() for p in run.model.parameters()),
        "code": code_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if run.prof.summary is not None:
        summary["profile"] = run.prof.summary
        log.info(f"profile: {run.dir / 'profile'} (trace.json, summary.txt)")
    if (
        run.dist.world > 1 or run.dist.strategy != "none" or run.cfg.train.grad_accum > 1
    ):  # DDP: replicas compared
        summary["distributed"] = distributed.summary(run.dist, run.cfg, run.model, run.ema)
    report = None
    if run.validates and run.cfg.val.at_end:
        with run.stages("validation"):
            report = validate_shared(run, final=True)
        if report is not None:  # the scores themselves are in the report folder's scores.json
            summary["report"] = {"path": report["path"], "decision": report["decision"]}
    run.checkpoint(run.step, wait=True)  # the final checkpoint, written while the validation ran
    run.close()
    summary["stages_s"] = run.stages.summary()
    if run.dist.is_main:
        write_atomic(run.dir / "summary.json", json.dumps(summary, indent=2))
    log.info(f"done: {run.step} steps, loss {run.first_loss} -> {run.last_loss}")
    log.info(f"run folder: {run.dir} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)")
    if report is not None:
        for line in decision_lines(report["scores"], report["path"]):
            log.info(line)
    return summary


def validate_shared(run: Run, final: bool = False) -> dict | None:
    """``validate_ema`` on rank 0 (the EMA gathered whole under FSDP: every rank takes part in that), while the other
    ranks wait at a barrier. One process: ``validate_ema`` itself."""
    ema = distributed.full_ema(run.dist, run.ema)
    report = None
    if run.validator is not None:
        ckpt = run.saved.get(run.step)  # saved at this step, perhaps still being written in the background
        report = validate_ema(
            run.validator, ema, run.dir, run.step, run.metrics, final=final, checkpoint=ckpt
        )
        run.stages.parts("validation", run.validator.timing)
    run.dist.barrier()
    return report


def validate_ema(
    validator: Validator,
    ema: EMA,
    run_dir: Path,
    step: int,
    metrics,
    *,
    final: bool = False,
    checkpoint: Path | None = None,
):
    """Judge the EMA weights at ``step`` into ``run_dir/validation/step-<step>/`` (with ``final`` also
    ``run_dir/report/``, and the self-test when ``val.self_test``). The live model is not touched: an eager twin
    (built at the first validation, kept by the validator) gets the EMA weights (the live blocks may be compiled,
    and validation shapes would only add compiles). A failure here is reported and logged but never ends training
    or loses a checkpoint (re-validate later). ``checkpoint``: the checkpoint of ``step`` the report names (else the
    file of that step, where one exists). Returns {"path", "decision", "scores"} or None."""
    cfg, manifest = validator.cfg, validator.manifest
    step_dir = run_dir / "validation" / f"step-{step:08d}"
    try:
        t0 = time.perf_counter()
        if validator.twin is None:  # built once, the EMA weights copied in at each validation
            twin = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).to(validator.device)
            validator.twin = twin.eval().requires_grad_(False)
        vmodel = validator.twin
        ema.copy_to(vmodel)
        t_twin = time.perf_counter() - t0
        saved = [run_dir / "checkpoints" / f"ckpt-{step:08d}{s}" for s in (".pt", ".dcp")]
        # the weights judged, when saved at this step: the trainer names its checkpoint (a background write may
        # not have reached the disk yet); otherwise the file of that step, if there is one
        ckpt = checkpoint if checkpoint is not None else next((p for p in saved if p.exists()), None)
        extra = {"checkpoint": str(ckpt)} if ckpt is not None else None
        result = validator.run(
            vmodel,
            step,
            step_dir,
            run_dir,
            metrics,
            self_test=final and cfg.val.self_test,
            extra=extra,
            background=not final,  # the folder is written while training goes on
        )
        validator.timing["twin"] = t_twin
        t0 = time.perf_counter()
        path = write_final(run_dir, step_dir, result) if final else step_dir
        if final:
            validator.timing["final_report"] = time.perf_counter() - t0
    except Exception as e:  # validation must not kill a long run: the checkpoint can be re-validated later
        msg = f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning(
            f"validation failed at step {step}: {msg} (re-run: python -m nanodit.validate --run {run_dir})"
        )
        metrics.log(step, {"validation_error": msg})
        return None
    if not final:
        log.info(f"validation step {step}: {result['decision']}  ({step_dir})")
    return {"path": str(path), "decision": result["decision"], "scores": result}


def say_err(line: str) -> None:
    """One line on stderr in one write: ranks sharing a terminal or a pipe never splice their lines (print
    writes the text and the newline apart, and another rank's text landed between them)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests): one write call is enough
        sys.stderr.write(f"{line}\n")
        return
    sys.stderr.flush()
    os.write(fd, f"{line}\n".encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="nanodit train",
        description="Train NanoDiT by flow matching, then validate it: the GO / NO-GO report.",
        epilog="config keys (key=value; the values shown are the defaults):\n" + describe(Config()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--config",
        help="a YAML file or a bundled name (nano, nano-plan, smoke, production); "
        "default: nano on a GPU, smoke on a CPU",
    )
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 run.dir=runs/x")
    add_verbosity(ap)
    args = ap.parse_args(argv)
    with command_logging(verbosity(args)):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        name = args.config
        if name is None:
            name = "nano" if torch.cuda.is_available() else "smoke"
            if name == "smoke":
                log.info(
                    "no GPU found: running the smoke config (a minute on a CPU); pass --config to choose"
                )
        cfg = load_config(name, args.overrides)
        train(cfg, quiet=args.quiet > 0)
    except Interrupted as e:
        say_err(f"{distributed.log_prefix()}{e}")
        return e.exit_code
    except (ConfigError, TrainError, ShardError, CheckpointError, DeviceError, RunDirError) as e:
        say_err(f"{distributed.log_prefix()}error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
