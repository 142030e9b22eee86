"""Checkpoints of a run on several processes, and resuming any checkpoint on any world size.

A run with train.strategy ddp or fsdp writes ``ckpt-<step>.dcp/`` through torch.distributed.checkpoint (DCP):

    ckpt-00001000.dcp/
        .metadata              DCP's index: every tensor, its shards and where their bytes are
        __0_0.distcp, ...      each rank's bytes (an FSDP rank its shards; a replicated tensor is written once)
        meta.pt                step, every rank's RNG, loader position, config, manifest, log (rank 0, torch.save)

The tensors keep the single-file layout, ``{"model", "ema", "optim"}`` as ``state_dict()`` gives them (the
optimizer's state keyed by parameter index, which is the same under every strategy because the parameter order is
the model's), so a folder read whole (``load_dcp``) is exactly the dict a ``ckpt-<step>.pt`` holds, and one process
resumes it through the same code as a file. ``model.safetensors`` / ``ema.safetensors`` beside it are the full
weights, as for a file. A folder is written atomically like a file: into ``ckpt-<step>.dcp.tmp/``, renamed by rank
0 once every rank's bytes and meta.pt are on disk; a failure on any rank is the same one-line CheckpointError on
every rank, naming the newest intact checkpoint.

Resume (``restore``), from a file or a folder, on any world size:
- none or ddp: every rank reads the whole state (small models; a folder through DCP without a process group)
  and loads it as one process does; fsdp: a folder is read shard by shard into the sharded state (DCP reshards
  across world sizes), a file is read whole and every rank keeps its shards;
- the loader position (epoch, batch index) is the same on every rank (every rank takes the same steps): one is
  kept. On another world size an epoch is cut into other batches, so the rest of that epoch is the new split's
  from the same batch index on (a warning says so); from the next epoch on every epoch is whole again;
- RNG: the noise generators of every rank and micro-batch, in slot order (nanodit/accumulate.py). A resume
  where world size x grad_accum is unchanged continues every stream exactly (2 processes -> 1 process with
  grad_accum=2, say); a slot without a saved stream starts one seeded by (seed, slot, step). Each rank takes the
  Python/NumPy/torch state of the rank it replaces.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from nanodit.accumulate import slot_seed
from nanodit.checkpoint import (
    CheckpointError,
    _atomic,
    _failed,
    check_state,
    first_line,
    list_checkpoints,
    load_file,
    remove_checkpoint,
    rng_state,
    set_rng_state,
)

META = "meta.pt"
TENSORS = ("model", "ema", "optim")


def load_checkpoint(path: str | Path, map_location="cpu", tensors: bool = True) -> dict:
    """The state of a checkpoint file, or of a DCP folder read whole (the same dict). ``tensors=False``: of a
    file its tensors memory-mapped, of a folder only its metadata (model, ema and optim None; its shard files are
    checked to be complete)."""
    path = Path(path)
    if path.is_dir():
        return check_state(path, load_dcp(path, tensors))
    return load_file(path, map_location, tensors)


# ---- the process's RNG --------------------------------------------------------------------------------


def process_rng(run) -> dict:
    """This process's RNG state: Python, NumPy, torch, its own CUDA device only (``rng_state`` reads every GPU,
    which would give every rank a context on every GPU), its noise generator and micro-batch generators."""
    if run.dist.world == 1:
        state = rng_state(run.generator)
    else:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(run.device)] if run.device.type == "cuda" else [],
            "generator": run.generator.get_state(),
        }
    if run.micro_generators:
        state["micro"] = [g.get_state() for g in run.micro_generators]
    return state


def _rng_slots(saved) -> tuple[list[dict], list[torch.Tensor]]:
    """(per-rank states, generator states in slot order) of a checkpoint's ``rng`` (one dict: a file's)."""
    per_rank = saved if isinstance(saved, list) else [saved]
    slots = [g for r in per_rank for g in [r["generator"], *r.get("micro", [])]]
    return per_rank, slots


def restore_rng(run, saved, step: int) -> None:
    """The RNG of this rank from a checkpoint's (see the module docstring)."""
    per_rank, slots = _rng_slots(saved)
    d, A = run.dist, run.cfg.train.grad_accum
    mine = per_rank[d.rank] if d.rank < len(per_rank) else None
    if mine is not None and d.world == 1:
        set_rng_state({k: v for k, v in mine.items() if k != "generator"})
    elif mine is not None:
        set_rng_state({k: v for k, v in mine.items() if k not in ("generator", "cuda")})
        if run.device.type == "cuda" and mine.get("cuda"):
            torch.cuda.set_rng_state(mine["cuda"][0].cpu(), run.device)
    for j, g in enumerate([run.generator, *run.micro_generators]):
        slot = d.rank * A + j
        if slot < len(slots):
            g.set_state(slots[slot].cpu())  # a GPU resume loaded it onto the GPU
        else:
            g.manual_seed(slot_seed(run.cfg.train.seed, slot, step))


def layout_warnings(run, state: dict) -> list[str]:
    """One line when the checkpoint was written by another world size or grad_accum."""
    old_world = len(state["rng"]) if isinstance(state["rng"], list) else 1
    old_accum = int(state["config"]["train"].get("grad_accum", 1))
    new_world, new_accum = run.dist.world, run.cfg.train.grad_accum
    if (old_world, old_accum) == (new_world, new_accum):
        return []
    same = old_world * old_accum == new_world * new_accum
    return [
        f"warning: resume: {old_world} process(es) x grad_accum {old_accum} -> {new_world} x {new_accum}: weights, "
        "EMA, optimizer and schedule continue exactly; the rest of this epoch is cut into the new split's batches"
        + (
            "; the noise streams continue"
            if same
            else "; new noise streams for the micro-batches without one"
        )
    ]


# ---- save ----------------------------------------------------------------------------------------------


def _full_weights(run_state: dict, is_main: bool) -> dict:
    """{"model", "ema"}: every tensor whole on CPU, on rank 0 (a DTensor is all-gathered: every rank calls this)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name in ("model", "ema"):
        out[name] = {}
        for k, v in run_state[name].items():
            full = v.full_tensor() if isinstance(v, DTensor) else v
            if is_main:
                out[name][k] = full.detach().contiguous().cpu()
    return out


def _finish_on_main(tmp: Path, final: Path, meta: dict, weights: dict | None, keep: int | None) -> None:
    """Rank 0: meta.pt, the rename into place, then (a resumable checkpoint) the safetensors exports and pruning."""
    from safetensors.torch import save_file

    _atomic(tmp / META, lambda p: torch.save(meta, p))
    os.replace(tmp, final)
    if keep is None:
        return
    for name, tensors in weights.items():
        target = final.parent / f"{name}.safetensors"
        _atomic(target, lambda p, t=tensors: save_file(t, str(p), {"step": str(meta["step"])}))
    for old in list_checkpoints(final.parent.parent)[:-keep]:
        remove_checkpoint(old)


def save_dcp(folder: Path, step: int, state: dict, d, keep: int | None = None) -> Path:
    """Write ``<folder>/ckpt-<step>.dcp`` (a collective: every rank calls it with its ``state``; see the module
    docstring). ``state["rng"]`` is this rank's; the folder keeps every rank's. ``keep``: a run's checkpoints/
    (export the weights, keep the newest ``keep``); None: a state kept apart (``<run>/nonfinite/``)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    final = folder / f"ckpt-{step:08d}.dcp"
    tmp = final.with_name(final.name + ".tmp")
    meta = {k: v for k, v in state.items() if k not in TENSORS}
    meta["rng"] = d.gather(state["rng"])

    def failed(err: BaseException) -> str:
        shutil.rmtree(tmp, ignore_errors=True)
        return str(_failed(final, step, err, folder.parent))

    error = None
    if d.is_main:
        try:
            for stale in folder.glob("*.dcp.tmp"):  # a killed save's leftovers
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = failed(e)
    _raise(d.first_error(error))
    weights = None
    try:
        dcp.save({k: state[k] for k in TENSORS}, checkpoint_id=str(tmp))
        weights = _full_weights(state, d.is_main) if keep is not None else None
    except Exception as e:  # DCP raises on every rank when one rank's write fails
        error = failed(e) if d.is_main else first_line(e)
    _raise(d.first_error(error))
    if d.is_main:
        try:
            _finish_on_main(tmp, final, meta, weights, keep)
        except Exception as e:
            error = failed(e)
    _raise(d.first_error(error))
    return final


def _raise(message: str | None) -> None:
    """The first rank's error, raised on every rank (agreed: see distributed.session)."""
    if message is not None:
        err = CheckpointError(message)
        err.agreed = True
        raise err


# ---- load ----------------------------------------------------------------------------------------------


def _check_shards(path: Path) -> None:
    """DCP's index readable and every byte range it names present (a truncated copy fails here, not mid-load)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a DCP checkpoint ({first_line(e)})") from None
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in need.items():
        f = path / name
        if not f.is_file() or f.stat().st_size < size:
            raise CheckpointError(f"{path}: shard {name} is missing or truncated (DCP checkpoint incomplete)")


def _load_all(path: Path) -> dict:
    """Every tensor of a folder, whole, in memory, without a process group (DCP's own dcp_to_torch_save path)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    _load_state_dict(
        sd, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    optim = sd["optim"]
    optim["state"] = {int(k): v for k, v in optim["state"].items()}  # DCP's keys are strings
    return sd


def load_dcp(path: Path, tensors: bool = True) -> dict:
    """A folder's state: the same dict as a file's; with ``tensors=False`` model/ema/optim are None."""
    path = Path(path)
    try:
        meta = torch.load(path / META, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({first_line(e)})") from None
    _check_shards(path)
    if not tensors:
        return without_tensors(meta)
    try:
        return {**meta, **_load_all(path)}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({first_line(e)})") from None


def without_tensors(state: dict) -> dict:
    """A checkpoint's state with model/ema/optim dropped (what rank 0 sends the others; ``restore`` reads them)."""
    return {**state, **dict.fromkeys(TENSORS)}


def init_optim_state(optim: torch.optim.Optimizer) -> None:
    """Create AdamW's state tensors (moments, step) before the first step, as targets to load into: one step with
    zero gradients at lr 0 (the weights do not move: decay is lr x wd, the update lr x ...)."""
    if optim.state:
        return
    lrs = [g["lr"] for g in optim.param_groups]
    for g in optim.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    optim.found_inf = None  # the guard's flag of an earlier step, if any
    optim.step()
    optim.zero_grad(set_to_none=True)
    for g, lr in zip(optim.param_groups, lrs):
        g["lr"] = lr


def _fill(target, full) -> object:
    """``target`` (a state_dict tree of DTensors and tensors) overwritten in place from a whole-tensor tree of the
    same shape: each rank keeps its own shards. Non-tensor leaves are taken from ``full``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, dict):
        for k in target:
            target[k] = _fill(target[k], full[k])
        return target
    if isinstance(target, DTensor):
        mine = distribute_tensor(
            full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None
        )
        target.to_local().copy_(mine.to_local())
        return target
    if torch.is_tensor(target):
        target.copy_(full)
        return target
    return full


def _load_sharded(run, state: dict, path: Path) -> None:
    """FSDP: the model, EMA and optimizer state loaded into their shards, from a folder or a file."""
    import torch.distributed.checkpoint as dcp

    init_optim_state(run.optim)
    targets = {"model": run.model.state_dict(), "ema": run.ema.state_dict(), "optim": run.optim.state_dict()}
    try:
        if path.is_dir():
            dcp.load(targets, checkpoint_id=str(path))
        else:
            whole = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            targets = _fill(targets, {k: whole[k] for k in TENSORS})
        run.model.load_state_dict(targets["model"])
        run.ema.load_state_dict(targets["ema"])
        run.optim.load_state_dict(targets["optim"])
    except Exception as e:
        raise CheckpointError(f"cannot resume from {path}: {first_line(e)}") from None


def restore(run, state: dict, path: Path, load_into) -> None:
    """Weights, EMA, optimizer, loader position and RNG from ``state`` (read from ``path``) on this run's world
    size and strategy (see the module docstring). ``load_into``: resume.load_into, one process's loader."""
    if run.dist.strategy == "fsdp":
        _load_sharded(run, state, Path(path))
    else:
        if state["model"] is None:  # several ranks: the pick read only the folder's metadata
            state = {**state, **{k: v for k, v in load_checkpoint(path).items() if k in TENSORS}}
        load_into(state, run.model, run.ema, run.optim, path)
    run.loader.load_state_dict(state["loader"])
    restore_rng(run, state["rng"], int(state["step"]))
