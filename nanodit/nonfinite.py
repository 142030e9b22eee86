"""Non-finite steps: found every step without a host sync, masked on the device, reported at log time.

``train.on_nonfinite``: ``stop`` ends the run at the next log step with a one-line error, the state kept apart
from the resumable checkpoints (``<run>/nonfinite/``); ``skip`` goes on and counts the skipped steps (log,
metrics.jsonl, summary.json). Either way a step whose loss or gradient norm is not finite changes nothing:

- the flag ``ok = isfinite(loss) & isfinite(grad norm)`` stays a device tensor: no ``.item()`` per step, so a
  CUDA step never waits for the GPU (the step may be a CUDA graph);
- the optimizer step is masked on the device: the fused AdamW (what ``optim.build_optimizer`` builds on CUDA)
  takes a ``found_inf`` tensor, the GradScaler mechanism, and its kernel skips the update (parameters, moments,
  step count) where it is set. The for-loop AdamW has no such input; it only runs on the CPU, where reading the
  flag is no device sync, so there the step is simply not called;
- the EMA then averages weights that did not move: it never sees a value of a bad step;
- the loss window adds ``where(ok, loss, 0)`` (bitwise the loss when finite) and counts the good steps.

The per-step flags of a log window are read in one transfer at the log step (``read``), with the steps and
batch ids they belong to, so a report names the first bad step and its samples.
"""

from __future__ import annotations

from pathlib import Path

import torch


class NonFiniteError(RuntimeError):
    """A non-finite step with ``train.on_nonfinite=stop``; the message is one line."""


def grad_norm(params) -> torch.Tensor:
    """The total L2 norm of the gradients, on the device (``clip_grad_norm_``'s number, without clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class StepGuard:
    """Masks the optimizer step of non-finite steps (see the module docstring) and remembers them."""

    def __init__(self, optim: torch.optim.Optimizer):
        self.optim = optim
        self.fused = bool(optim.defaults.get("fused"))
        self._flags: list[torch.Tensor] = []  # per step since the last read: True where the step was bad
        self._steps: list[int] = []
        self._ids: list[list[str]] = []

    def check(self, loss: torch.Tensor, gnorm: torch.Tensor) -> torch.Tensor:
        """The step's finite flag (0-d bool, on the loss's device)."""
        return torch.isfinite(loss.detach()) & torch.isfinite(gnorm)

    def step(self, ok: torch.Tensor, step: int, ids: list[str]) -> None:
        """``optim.step()`` where ``ok``, nothing where not; the flag remembered for ``read``."""
        self.apply(ok)
        self.record(ok, step, ids)

    def apply(self, ok: torch.Tensor) -> None:
        """The masked optimizer step alone (device work only when fused: the CUDA-graph step captures it)."""
        if self.fused:
            self.optim.found_inf = (~ok).float()  # read by the fused kernel on the device
            self.optim.step()
        elif bool(ok):  # the CPU's for-loop AdamW: reading a CPU tensor waits for no device
            self.optim.step()

    def record(self, ok: torch.Tensor, step: int, ids: list[str]) -> None:
        """Remember step ``step``'s flag (a fresh tensor: a graph's ``ok`` is rewritten by its next replay)."""
        self._flags.append(~ok)
        self._steps.append(step)
        self._ids.append(list(ids))

    def state_dict(self) -> dict:
        """The flags not yet read (steps since the last log row), for a checkpoint: a bad step between a log
        row and a checkpoint is then reported after a resume too. One transfer; a checkpoint reads the loss
        window from the device anyway."""
        bad = torch.stack(self._flags).cpu().tolist() if self._flags else []
        return {"bad": bad, "steps": list(self._steps), "ids": [list(i) for i in self._ids]}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """The flags a checkpoint carried, read at the next log row as if no resume had been between."""
        self._flags = [torch.tensor(bool(b), device=device) for b in state.get("bad", [])]
        self._steps = [int(s) for s in state.get("steps", [])]
        self._ids = [list(i) for i in state.get("ids", [])]

    def read(self) -> list[tuple[int, list[str]]]:
        """(step, batch ids) of the bad steps since the last read: one device transfer, at log time."""
        if not self._flags:
            return []
        bad = torch.stack(self._flags).tolist()
        out = [(s, ids) for s, ids, b in zip(self._steps, self._ids, bad) if b]
        self._flags, self._steps, self._ids = [], [], []
        return out


def stop_message(bad: list[tuple[int, list[str]]], step: int, kept: Path) -> str:
    """The one line of ``train.on_nonfinite=stop``: the first bad step and its batch, where the state went."""
    first, ids = bad[0]
    shown = ", ".join(ids[:4]) + (", ..." if len(ids) > 4 else "")
    return (
        f"non-finite loss or gradient at step {first} (batch {shown}; {len(bad)} such step(s) up to step {step}, "
        f"none applied to the weights or the EMA); state kept apart in {kept} (resume=auto does not pick it); "
        "continue from the last checkpoint with train.resume=auto and e.g. a lower train.lr, or "
        "train.on_nonfinite=skip"
    )
