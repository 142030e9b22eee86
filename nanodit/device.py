"""Device and numeric precision: which device a run uses and what ``train.precision`` switches on.

    device = pick_device("auto")               # cuda if there is one, else cpu
    autocast = set_precision("bf16", device)   # matmul flags + the autocast context (a null context for fp32/tf32)

The trainer, the validator and the command lines share these, so a run is validated in the precision it
was trained in.
"""

from __future__ import annotations

import contextlib

import torch


class DeviceError(RuntimeError):
    """A device the machine does not have; printed as one line."""


def pick_device(name: str) -> torch.device:
    """``train.device``: auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"train.device={name}: CUDA is not available on this machine")
    return dev


def set_precision(precision: str, device: torch.device):
    """Matmul precision flags and the autocast context for ``train.precision`` (fp32 | tf32 | bf16)."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_for(precision: str, device: torch.device) -> torch.autocast | None:
    """The bf16 autocast context for sampling, or None (fp32/tf32 run without autocast)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
