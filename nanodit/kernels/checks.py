"""Checks and layouts of the launchers' inputs: the device, the shapes and dtypes, unit stride along D.

Imports Triton only for the interpreter's type (``is_interpreted``)."""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction


def is_interpreted(kernel) -> bool:
    """True when Triton runs ``kernel`` in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, *tensors: torch.Tensor) -> None:
    """CUDA tensors, or any tensors under the interpreter; a one-line error otherwise."""
    if is_interpreted(kernel):
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise ValueError(
                f"model.kernels=triton needs CUDA tensors (got {t.device.type}); "
                "on CPU use kernels=ref, or TRITON_INTERPRET=1 for the (slow) interpreter"
            )


def rows3d(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) with unit stride along D (copied only when it is not); B/T strides stay free."""
    return x if x.stride(-1) == 1 else x.contiguous()


def rows2d(p: torch.Tensor) -> torch.Tensor:
    """Per-sample vector (B, D) with unit stride along D; chunk() slices of (B, kD) pass as they are."""
    return p if p.stride(-1) == 1 else p.contiguous()


def check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: expected x of shape (B, T, D), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point x, got {x.dtype}")


def check_vec(name: str, key: str, p: torch.Tensor, x: torch.Tensor) -> None:
    B, _, D = x.shape
    if tuple(p.shape) != (B, D):
        raise ValueError(f"{name}: {key} must have shape (B, D) = {(B, D)}, got {tuple(p.shape)}")
    if not p.dtype.is_floating_point:
        raise ValueError(f"{name}: {key} must be floating-point, got {p.dtype}")
