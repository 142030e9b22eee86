"""The self-test: the same tests on the trained weights with planted faults, to show on THIS run that each test
can fail the model it is meant to catch.

    with planted(model, "zero_cross"):      # every block's cross-attention output is zero: the caption is cut
        ...
    FAULTS["zero_cross"].target             # "text_manip": the criterion this fault must fail

Faults (defined on NanoDiT's parts, applied by hooks, removed afterwards):
- zero_cross: every block's cross-attention output is zeroed -> the caption path is cut (targets text_manip);
- const_dino: the DINO input is replaced by one constant vector, the mean DINO of the validation samples
  (targets dino_swap);
- untrained: freshly initialised weights of the same config (targets reconstruction).
On the shapes world a fault that does not fail its target means the test has no power on this run; on real
data, where no factors are known, the report shows how far each fault moves the scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    target_shapes: str  # the criterion it must fail on the shapes world
    target_real: str  # ... and on real data


FAULTS = {
    "zero_cross": Fault(
        "zero_cross", "cross-attention output zeroed in every block", "text_manip", "text_manip"
    ),
    "const_dino": Fault(
        "const_dino",
        "DINO input replaced by one constant (the validation samples' mean)",
        "dino_swap",
        "dino_swap",
    ),
    "untrained": Fault(
        "untrained", "freshly initialised weights of the same config", "recon_scorer", "lpips"
    ),
}


@contextlib.contextmanager
def planted(
    model: torch.nn.Module, fault: str, dino_mean: np.ndarray | None = None
) -> Iterator[torch.nn.Module]:
    """``model`` with ``fault`` planted by hooks (zero_cross, const_dino), removed on exit. ``untrained`` is
    not a hook: build a fresh model instead (``Validator.self_test`` does)."""
    handles = []
    if fault == "zero_cross":
        for block in model.blocks:
            handles.append(block.cross.register_forward_hook(lambda m, args, out: torch.zeros_like(out)))
    elif fault == "const_dino":
        if dino_mean is None:
            raise ValueError("planted(const_dino) needs dino_mean")
        device = next(model.parameters()).device  # on the device once: the hook copies nothing from the host
        const = torch.as_tensor(dino_mean, dtype=torch.float32, device=device)  # (Dd,)

        def replace_dino(m, args):
            (d,) = args  # (B, Dd)
            return (const.to(d.dtype)[None].expand_as(d),)

        handles.append(model.dino_embed.register_forward_pre_hook(replace_dino))
    else:
        raise ValueError(f"planted: unknown fault {fault!r} (hooks: zero_cross, const_dino)")
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def target(fault: str, shapes: bool) -> str:
    f = FAULTS[fault]
    return f.target_shapes if shapes else f.target_real


def summarize(fault: str, shapes: bool, intact: dict, faulty: dict) -> dict:
    """One fault's entry of ``scores.json["self_test"]``: its decision and criteria, the target, whether the
    target failed (``caught``; None when the target could not be computed), and how far each criterion moved."""
    tgt = target(fault, shapes)
    crit = faulty["criteria"]
    tc, ic = crit.get(tgt), intact["criteria"].get(tgt)
    caught = None if tc is None or not tc["computed"] else not tc["pass"]
    moved = {
        k: (c["value"] - intact["criteria"][k]["value"])
        for k, c in crit.items()
        if c["computed"] and k in intact["criteria"] and intact["criteria"][k]["computed"]
    }
    return {
        "fault": fault,
        "what": FAULTS[fault].what,
        "target": tgt,
        "decision": faulty["decision"],
        "caught": caught,
        "target_value": None if tc is None else tc["value"],
        "intact_pass": None
        if ic is None
        else ic["pass"],  # a fault is telling only where the intact model passes
        "criteria": {k: {"value": c["value"], "pass": c["pass"]} for k, c in crit.items()},
        "moved": moved,
    }
