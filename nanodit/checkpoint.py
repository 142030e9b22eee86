"""Complete resume state, written atomically (temp file + rename), plus safetensors weight exports.

A checkpoint ``ckpt-<step>.pt`` holds {model, ema, optim, step, rng, loader, config, ...}: the unwrapped,
uncompiled module's weights and everything needed for a bitwise-exact resume. ``model.safetensors`` and
``ema.safetensors`` beside it hold the latest weights for other tools.

A write that fails (a full disk, a vanished mount) removes its temp file and raises a one-line
``CheckpointError`` naming the newest intact checkpoint; older checkpoints are deleted (``keep``) only after a
new one is complete. A kill during a write leaves at most a ``*.tmp`` file, never a listed checkpoint; the
trainer removes such leftovers at start (``runlog.prepare_run_dir``).

``CheckpointWriter`` takes the state at save time (a host copy of every tensor, queued on the GPU behind the step
that made it: no host sync) and writes it in a background thread, one write at a time, while training goes on;
a failed background write is raised, as the same one-line error, at the writer's next call (the trainer polls it
at every log step) and no later checkpoint is written after it. ``wait()`` returns once the write is on disk; a
non-daemon thread, so the interpreter never exits with a checkpoint half written.

A run on several processes writes ``ckpt-<step>.dcp/`` folders instead (torch.distributed.checkpoint, readable on
any world size: nanodit/dist_checkpoint.py); both kinds are listed and pruned here alike and loaded by
``dist_checkpoint.load_checkpoint`` (this module never imports that one: it builds on this).
"""

from __future__ import annotations

import copy
import os
import random
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt-(\d{8})\.(pt|dcp)$")  # a file (one process) or a DCP folder (several)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line and names the file."""


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Restore ``rng_state``'s states. Each is a CPU ByteTensor for torch, also a CUDA generator's; a checkpoint
    loaded with map_location=cuda (a GPU resume) moved them to the GPU, hence the ``.cpu()``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"].cpu())


def first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{err.__class__.__name__}: {lines[0]}" if lines else err.__class__.__name__


def _atomic(path: Path, write) -> None:
    """``write(tmp)``, fsync, rename over ``path``; on any failure the temp file goes and ``path`` is untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _failed(what: Path, step: int, err: BaseException, run_dir: Path) -> CheckpointError:
    msg = first_line(err)
    if isinstance(err, OSError) and err.strerror:
        msg = err.strerror
    try:
        free = f"; {shutil.disk_usage(what.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    newest = latest_checkpoint(run_dir)
    kept = f"the newest intact checkpoint is {newest}" if newest else "no earlier checkpoint exists"
    return CheckpointError(
        f"checkpoint of step {step} not written: {what}: {msg}{free}; temp file removed, {kept}"
    )


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, export weights as safetensors, keep the newest ``keep``.
    Raises CheckpointError (one line) when a write fails; what was intact before stays intact."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    path = ckpt_dir / f"ckpt-{step:08d}.pt"
    target = path
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _atomic(path, lambda p: torch.save(state, p))
        for name in ("model", "ema"):
            tensors = {k: v.detach().contiguous().cpu() for k, v in state[name].items()}
            target = ckpt_dir / f"{name}.safetensors"
            _atomic(target, lambda p, t=tensors: save_file(t, str(p), {"step": str(step)}))
        for old in list_checkpoints(run_dir)[:-keep]:
            target = old
            remove_checkpoint(old)
    except Exception as e:  # OSError (ENOSPC, EIO, ...) or torch's RuntimeError from its zip writer
        raise _failed(target, step, e, run_dir) from None
    return path


def snapshot(state, staging: list[torch.Tensor] | None = None):
    """A copy of ``state`` that later training cannot change: tensors copied to host memory (CUDA ones into
    pinned memory, asynchronously on the current stream, behind the work that made them), everything else
    deep-copied. ``staging``: pinned tensors of an earlier snapshot that nothing reads any more, reused
    by shape and dtype (allocating pinned memory costs ~0.5 s per GB); the ones used are appended
    to it again. Returns (copy, CUDA event to wait for before reading the copy, or None)."""
    on_gpu = False
    reuse: dict[tuple, list[torch.Tensor]] = {}
    for buf in staging or []:
        reuse.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)
    used: list[torch.Tensor] = []
    if staging is not None:
        staging.clear()

    def host_buffer(t: torch.Tensor) -> torch.Tensor:
        free = reuse.get((tuple(t.shape), t.dtype))
        buf = free.pop() if free else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        used.append(buf)
        return buf

    def copy_of(obj):
        nonlocal on_gpu
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if t.device.type == "cuda":
                on_gpu = True
                return host_buffer(t).copy_(t, non_blocking=True)
            return t.clone()
        if isinstance(obj, dict):
            return type(obj)((k, copy_of(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(copy_of(v) for v in obj)
        return copy.deepcopy(obj)

    out = copy_of(state)
    if staging is not None:
        staging.extend(used)
    event = None
    if on_gpu:
        event = torch.cuda.Event()
        event.record()
    return out, event


class CheckpointWriter:
    """``save_checkpoint`` in a background thread (``background=False``: in the caller, as before), one write in
    flight. ``save`` returns the path the checkpoint will have; ``wait`` blocks until it is written; an error of
    a background write is raised (CheckpointError, one line) by the next ``save``, ``wait`` or ``poll``.
    ``seconds``: the writes' wall time (in the background: time the training loop did not wait)."""

    def __init__(self, run_dir: str | Path, keep: int, background: bool = True):
        self.run_dir, self.keep, self.background = Path(run_dir), keep, background
        self.seconds = 0.0
        self._thread: threading.Thread | None = None
        self._error: CheckpointError | None = None
        self._staging: list[torch.Tensor] = []  # the last snapshot's pinned buffers, reused by the next

    def save(self, step: int, state: dict) -> Path:
        self.wait()  # one write at a time (and an earlier failure raised before anything more is written)
        path = self.run_dir / "checkpoints" / f"ckpt-{step:08d}.pt"
        if not self.background:
            t0 = time.perf_counter()
            save_checkpoint(self.run_dir, step, state, keep=self.keep)
            self.seconds += time.perf_counter() - t0
            return path
        snap, event = snapshot(state, self._staging)  # the last write is done: its buffers are free
        self._thread = threading.Thread(
            target=self._write, args=(step, snap, event), name="nanodit-checkpoint"
        )
        self._thread.start()
        return path

    def _write(self, step: int, snap: dict, event) -> None:
        t0 = time.perf_counter()
        try:
            if event is not None:
                event.synchronize()
            save_checkpoint(self.run_dir, step, snap, keep=self.keep)
        except CheckpointError as e:
            self._error = e
        except Exception as e:  # anything else (the event, pickling): the same one-line form
            self._error = _failed(self.run_dir / "checkpoints" / f"ckpt-{step:08d}.pt", step, e, self.run_dir)
        finally:
            self.seconds += time.perf_counter() - t0

    def poll(self) -> None:
        """Raise the error of a finished background write, if one failed; never waits."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def wait(self) -> None:
        """Until the write in flight is on disk; then ``poll``."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.poll()


def save_state(path: str | Path, state: dict) -> Path:
    """A state outside the resumable checkpoints (e.g. ``<run>/nonfinite/``), written atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(path, lambda p: torch.save(state, p))
    except Exception as e:
        raise _failed(path, int(state.get("step", -1)), e, path.parent.parent) from None
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first; temp files are never listed."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name) and (p.is_dir() == (p.suffix == ".dcp"))]
    return sorted(found, key=lambda p: (int(CKPT_RE.match(p.name).group(1)), p.name))


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file or DCP folder."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_file(path: str | Path, map_location="cpu", tensors: bool = True) -> dict:
    """The state of a checkpoint file (``tensors=False``: memory-mapped, so that its tensors are not read). A DCP
    folder is read by ``dist_checkpoint.load_checkpoint``, which takes either."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=not tensors)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({first_line(e)})") from None
    return check_state(path, state)


def check_state(path: Path, state) -> dict:
    """``state`` itself, if it has what every nanodit checkpoint has; else a one-line CheckpointError."""
    for key in ("model", "ema", "optim", "step", "config"):
        if not isinstance(state, dict) or key not in state:
            raise CheckpointError(f"{path}: not a nanodit checkpoint (no {key!r})")
    return state
