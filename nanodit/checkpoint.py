"""Complete resume state, written atomically (temp file + rename), plus safetensors weight exports.

A checkpoint ``ckpt-<step>.pt`` holds {model, ema, optim, step, rng, loader, config, ...}: the unwrapped,
uncompiled module's weights and everything needed for a bitwise-exact resume. ``model.safetensors`` and
``ema.safetensors`` beside it hold the latest weights for other tools.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")


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
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, export weights as safetensors, keep the newest ``keep``."""
    from safetensors.torch import save_file

    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{step:08d}.pt"
    _atomic(path, lambda p: torch.save(state, p))
    for name in ("model", "ema"):
        tensors = {k: v.detach().contiguous().cpu() for k, v in state[name].items()}
        _atomic(
            ckpt_dir / f"{name}.safetensors", lambda p, t=tensors: save_file(t, str(p), {"step": str(step)})
        )
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first; temp files are never listed."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None
    for key in ("model", "ema", "optim", "step", "config"):
        if key not in state:
            raise CheckpointError(f"{path}: not a nanodit checkpoint (no {key!r})")
    return state
