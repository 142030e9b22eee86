"""Several processes, one run: the process group torchrun starts, the strategy that wraps the model, and the few
collectives that make every rank take the same decisions.

    torchrun --standalone --nproc_per_node 2 -m nanodit.train --config nano run.dir=runs/nano2 train.compile_mode=default
    torchrun --standalone --nproc_per_node 2 -m nanodit.train --config production run.dir=runs/prod2

What this module owns:
- the process group (``session``): initialised from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR/PORT); NCCL on GPUs (one GPU per process: cuda:LOCAL_RANK), gloo on CPUs. A process started without
  torchrun is a world of one and touches no process group, unless ``train.strategy`` names ddp or fsdp (then a
  group of one, e.g. to measure FSDP's memory on one GPU). A second, gloo group with a long timeout carries the
  host-side agreement (stop votes, barriers, small objects), so that no NCCL watchdog fires while rank 0 validates;
- the strategy (``train.strategy``). auto: none on one process; on several, ddp for a model under
  ``AUTO_FSDP_PARAMS`` (250M) parameters and fsdp from there on. The rule is the replicated training state: 20
  bytes a parameter (fp32 weights, gradients, two AdamW moments, the EMA), i.e. 0.8 GB for nano (42M) and 15 GB
  for production (749.8M), which FSDP divides by the world size. ddp: DistributedDataParallel, gradients
  all-reduced during the backward. fsdp: FSDP2 (``fully_shard`` on every block, then on the root): weights,
  gradients, AdamW moments and the EMA are sharded fp32 tensors (the master weights); with train.precision=bf16
  the policy all-gathers parameters in bf16 and reduces gradients in fp32, and forward inputs are not cast
  (autocast decides activation dtypes, so the residual stream stays fp32 as on one GPU);
- the batch: train.batch_size is the global batch of one optimizer step whatever the world: each rank takes
  batch_size / world samples (the loaders' rank split, nanodit/data/loader.py) in train.grad_accum micro-batches
  (nanodit/accumulate.py);
- agreement: a non-finite step is skipped on every rank if it is on one (``agree_ok``: a device all-reduce of the
  flag, no host sync); a stop signal seen by any rank stops every rank after the same step (``vote_stop``: an
  asynchronous host all-reduce, read one step later); the loss window is summed over ranks at log time;
- rank 0 writes (metrics.jsonl, TensorBoard, reports, summary.json, the checkpoint's metadata) and validates;
  the other ranks say nothing and wait at a host barrier while it validates.
Checkpoints of a distributed run are folders written by torch.distributed.checkpoint: nanodit/dist_checkpoint.py.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from nanodit.config import ConfigError
from nanodit.device import DeviceError, pick_device

AUTO_FSDP_PARAMS = 250_000_000  # train.strategy=auto on several processes: fsdp from this many parameters on
# host-side waits (rank 0 validating while the others wait): a final validation with its self-test takes minutes
HOST_TIMEOUT = timedelta(hours=2)
EXIT_TIMEOUT = timedelta(seconds=60)  # ranks leaving together after an agreed stop


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def log_prefix() -> str:
    """What a non-zero rank puts before the lines it prints (errors): '' on rank 0 and on one process."""
    rank, world, _ = launch_env()
    return f"[rank {rank}] " if world > 1 and rank else ""


@dataclass
class Dist:
    """This process's place in the run. ``strategy`` is resolved ("auto" decided) by ``wrap``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"
    backend: str | None = None
    host: object = None  # the gloo group of host-side agreement (None: a world of one without a group)
    owned: bool = False  # the process group was started here (and is destroyed here)
    why: str = ""  # why this strategy
    ddp: object = None  # the DistributedDataParallel wrapper (its no_sync)
    model: object = None  # the FSDP2 root (its set_requires_gradient_sync)
    _vote: tuple | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded_checkpoints(self) -> bool:
        """Checkpoints through torch.distributed.checkpoint (a folder): every strategy but none."""
        return self.strategy != "none"

    # ---- host-side collectives (no-ops on one process) -------------------------------------------

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.host)

    def gather(self, obj) -> list:
        """Every rank's ``obj``, by rank (a host collective)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.host)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.host)
        return box[0]

    def on_main(self, fn: Callable):
        """``fn()`` run by rank 0 alone (files, the run folder); every rank returns its result or raises the same
        exception (one-line errors: their messages travel)."""
        if self.world == 1:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # sent to the others, raised everywhere
                error = e
        result, error = self.broadcast((result, error))
        if error is not None:
            error.agreed = True  # raised on every rank at the same point (see ``session``)
            raise error
        return result

    def first_error(self, message: str | None) -> str | None:
        """The first rank's error message, on every rank (None when every rank succeeded)."""
        return next((m for m in self.gather(message) if m is not None), None)

    def vote_stop(self, requested: int | None) -> int | None:
        """The stop signal every rank agrees on, or None. On several ranks the vote of the previous step is read
        and this step's is posted (an asynchronous gloo all-reduce): every rank stops after the same step, one
        step after the last rank saw the signal, and no step waits for the vote."""
        if self.world == 1:
            return requested
        agreed = None
        if self._vote is not None:
            work, buf = self._vote
            work.wait()
            agreed = int(buf.item()) or None
        buf = torch.tensor([requested or 0], dtype=torch.int64)
        self._vote = (dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.host, async_op=True), buf)
        return agreed

    def flush(self) -> None:
        """Wait for a vote still in flight (before the group goes)."""
        if self._vote is not None:
            self._vote[0].wait()
            self._vote = None

    # ---- device-side agreement -----------------------------------------------------------------------

    def agree_ok(self, ok: torch.Tensor) -> torch.Tensor:
        """A step is finite only if it is finite on every rank: the flag's all-reduce (MIN) stays on the device."""
        if self.world == 1:
            return ok
        flag = ok.to(torch.float32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag > 0

    def reduce_window(self, window) -> None:
        """At a log step: the loss window summed over ranks (the loss as the mean of the ranks' losses)."""
        if self.world == 1:
            return
        state = self.window_state(window)
        window.loss.copy_(state["loss"])
        window.bins.copy_(state["bins"])
        window.samples = state["samples"]

    def window_state(self, window) -> dict:
        """The loss window of the whole run (what a checkpoint keeps): summed over ranks, the loss divided by the
        world size. On one process, the window's own state."""
        if self.world == 1:
            return window.state_dict()
        samples = torch.tensor([float(window.samples)], device=window.loss.device)
        buf = torch.cat([window.loss.view(1), window.bins.flatten(), samples])  # (1 + 2 bins + 1,)
        dist.all_reduce(buf)
        return {
            "loss": (buf[0] / self.world).cpu(),
            "bins": buf[1:-1].view_as(window.bins).cpu(),
            "steps": window.steps,
            "samples": int(buf[-1].item()),
        }

    def load_window(self, window, state: dict) -> None:
        """A checkpoint's window (``window_state``): rank 0 holds the sums, the others start from zero, so the next
        log row sums to the uninterrupted run's on any world size."""
        if self.world == 1:
            window.load_state_dict(state)
            return
        window.load_state_dict(state)
        if self.is_main:
            window.loss.mul_(self.world)  # reduce_window divides by the world size
        else:
            window.loss.zero_()
            window.bins.zero_()
            window.samples = 0

    def plain(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A DTensor (FSDP's gradient norm) as the plain tensor every rank holds; anything else as it is."""
        from torch.distributed.tensor import DTensor

        return x.full_tensor() if isinstance(x, DTensor) else x

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        """With ``skip``: a micro-batch whose gradients stay local (accumulated; reduced in the last one)."""
        if not skip or self.strategy == "none":
            yield
        elif self.strategy == "ddp":
            with self.ddp.no_sync():
                yield
        else:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

    def describe(self, cfg) -> list[str]:
        """The log line of how a step is split (none for one process without accumulation)."""
        batch, accum = cfg.train.batch_size, cfg.train.grad_accum
        if self.world == 1 and self.strategy == "none" and accum == 1:
            return []
        per_rank = batch // self.world
        return [
            f"distributed: {self.world} process(es) ({self.backend or 'no process group'}, {self.device.type}), "
            f"strategy {self.strategy} ({self.why}); global batch {batch} = {self.world} x {per_rank} samples "
            f"in {accum} micro-batch(es) of {per_rank // accum}"
        ]


# ---- the process group ----------------------------------------------------------------------------


def _device(name: str, local_rank: int, world: int) -> torch.device:
    """This process's device: under torchrun ``auto``/``cuda`` mean cuda:LOCAL_RANK."""
    if world == 1 or name == "cpu":
        device = pick_device(name)
        if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if name not in ("auto", "cuda"):
        raise DeviceError(
            f"train.device={name}: with {world} processes each takes cuda:LOCAL_RANK; use train.device=auto, cuda or cpu"
        )
    if not torch.cuda.is_available():
        return pick_device(name)  # cpu for auto; a one-line DeviceError for cuda
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise DeviceError(
            f"torchrun started local rank {local_rank} but this machine has {n} GPU(s): use --nproc_per_node {n} or fewer"
        )
    return torch.device("cuda", local_rank)


def setup(cfg) -> Dist:
    """The process group for this run (see the module docstring); one-line errors for what cannot work."""
    rank, world, local = launch_env()
    strategy = cfg.train.strategy
    if dist.is_available() and dist.is_initialized():  # started by a caller (a harness, a notebook)
        rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1 and strategy in ("auto", "none"):
        return Dist(device=pick_device(cfg.train.device), why="one process")
    if strategy == "none":
        raise ConfigError(
            f"config: train.strategy=none with {world} processes: each would train its own copy; use auto, ddp or fsdp"
        )
    if not dist.is_available():
        raise DeviceError(f"train.strategy={strategy}: this torch build has no torch.distributed")
    device = _device(cfg.train.device, local, world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_gloo_available():  # CPU tensors travel over gloo; on GPUs the host-side agreement does
        raise DeviceError(
            f"train.strategy={strategy} needs torch.distributed's gloo backend (on a CPU for everything, on GPUs for "
            "the ranks' host-side agreement), which this torch build lacks"
        )
    check_batch(cfg, world)
    owned = not dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owned and world == 1 and "MASTER_ADDR" not in os.environ:  # a group of one without a launcher
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif owned:
        dist.init_process_group(backend)
    host = dist.new_group(backend="gloo", timeout=HOST_TIMEOUT)
    return Dist(rank, world, local, device, strategy, backend, host, owned)


def check_batch(cfg, world: int) -> None:
    """train.batch_size is the global batch: it must split evenly over the ranks and their micro-batches."""
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(
            f"config: train.batch_size={t.batch_size} is not divisible by {world} process(es) x "
            f"train.grad_accum={t.grad_accum} (batch_size is the global batch of one optimizer step)"
        )


def finish(d: Dist, together: bool) -> None:
    """The end of a run's process group: with ``together``, every rank waits for the others first (an agreed
    stop: rank 0 has printed its line before anyone exits, so no launcher kills it mid-sentence)."""
    if not d.owned or not dist.is_initialized():
        return
    try:
        d.flush()
        if together and d.world > 1:
            dist.monitored_barrier(group=d.host, timeout=EXIT_TIMEOUT)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def session(cfg, agreed: tuple[type[BaseException], ...] = ()) -> Iterator[Dist]:
    """The process group for one ``train`` call: set up, then torn down when the run ends. An agreed exception (of
    an ``agreed`` type, or marked ``agreed``: raised on every rank at the same point, e.g. a stop signal, a
    non-finite stop, an error rank 0 found for all) leaves the group to the end of the process, where the ranks
    leave together after the caller printed its line; anything else tears it down at once (the other ranks may be
    gone, and the launcher ends them)."""
    d = setup(cfg)
    try:
        yield d
    except BaseException as e:
        if d.owned and d.world > 1 and (isinstance(e, agreed) or getattr(e, "agreed", False)):
            atexit.register(finish, d, True)
        else:
            finish(d, False)
        raise
    finish(d, True)


# ---- the model --------------------------------------------------------------------------------------


def resolve_strategy(d: Dist, n_params: int) -> None:
    """``auto`` decided by the rule of the module docstring; the reason kept for the log."""
    if d.strategy == "auto":
        big = n_params >= AUTO_FSDP_PARAMS
        d.strategy = "fsdp" if big else "ddp"
        d.why = f"auto: {n_params / 1e6:.1f}M parameters {'>=' if big else '<'} {AUTO_FSDP_PARAMS / 1e6:.0f}M"
    elif not d.why:
        d.why = "train.strategy"


def wrap(d: Dist, model: torch.nn.Module, cfg) -> torch.nn.Module:
    """The module the step calls: the model itself (none), a DDP wrapper, or the model sharded in place (fsdp).
    Call before the optimizer and the EMA are built: FSDP replaces the parameters with sharded ones."""
    resolve_strategy(d, sum(p.numel() for p in model.parameters()))
    check_compile(cfg, d)
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        d.ddp = DistributedDataParallel(model, device_ids=ids)  # the model has no buffers to broadcast
        return d.ddp
    if d.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        low = torch.bfloat16 if cfg.train.precision == "bf16" else None
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.blocks:  # one all-gather per block, freed after its forward (and its backward)
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the rest: embedders, null tokens, the final layer
        d.model = model
    return model


def check_compile(cfg, d: Dist) -> None:
    """CUDA graphs (compile_mode=reduce-overhead) around DDP's or FSDP's collectives were never measured here."""
    t = cfg.train
    if t.compile and t.compile_mode == "reduce-overhead" and d.strategy != "none" and d.device.type == "cuda":
        raise ConfigError(
            f"config: train.compile_mode=reduce-overhead (CUDA graphs) is not supported with train.strategy="
            f"{d.strategy}; use train.compile_mode=default"
        )


class FullEMA:
    """The EMA's weights gathered whole (FSDP shards them), for the validation model of rank 0."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.state, strict=True)


def full_ema(d: Dist, ema):
    """What rank 0 validates: the EMA itself, or under FSDP its shards all-gathered (a collective: every rank
    calls it; the others get None)."""
    if d.strategy != "fsdp":
        return ema
    from torch.distributed.tensor import DTensor

    state = {}
    for k, v in ema.state_dict().items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if d.is_main:
            state[k] = full
    return FullEMA(state) if d.is_main else None


def replicas_agree(d: Dist, model: torch.nn.Module, ema) -> bool | None:
    """DDP: are the weights and the EMA bitwise the same on every rank? (per-tensor float64 sums compared
    exactly: one all-gather of a few hundred numbers). None where there is nothing to compare."""
    if d.strategy != "ddp" or d.world == 1:
        return None
    tensors = list(model.parameters()) + list(ema.params.values())
    sums = torch.stack([x.detach().double().sum() for x in tensors])  # (P,)
    every = [torch.empty_like(sums) for _ in range(d.world)]
    dist.all_gather(every, sums)
    return all(torch.equal(s, every[0]) for s in every)


# ---- records ------------------------------------------------------------------------------------------


class NoMetrics:
    """The metrics logger of a rank other than 0: rank 0 writes metrics.jsonl and TensorBoard for the run."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def merge_bad(d: Dist, bad: list[tuple[int, list[str]]]) -> list[tuple[int, list[str]]]:
    """The non-finite steps of a log window with every rank's batch ids (every rank holds the same steps, since
    the flags were agreed; the ids are each rank's own): a host gather, only when there are any."""
    if d.world == 1 or not bad:
        return bad
    every = d.gather(bad)
    return [(step, [i for rank in every for i in rank[k][1]]) for k, (step, _) in enumerate(bad)]


def summary(d: Dist, cfg, model: torch.nn.Module, ema) -> dict:
    """summary.json's "distributed" entry (a collective under DDP: the replicas are compared)."""
    return {
        "world_size": d.world,
        "strategy": d.strategy,
        "why": d.why,
        "backend": d.backend,
        "global_batch": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "replicas_identical": replicas_agree(d, model, ema),
    }
