"""Fused ops of the DiT hot path, each beside its pure-PyTorch ``*_ref`` twin.

``get_ops("ref" | "triton")`` returns the namespace the model calls; model code never imports Triton.
"""

from __future__ import annotations

from types import SimpleNamespace

from nanodit.kernels.ref import (
    adaln_modulate_ref,
    flow_loss_ref,
    gated_residual_ref,
    residual_adaln_modulate_ref,
)

__all__ = [
    "adaln_modulate_ref",
    "flow_loss_ref",
    "gated_residual_ref",
    "residual_adaln_modulate_ref",
    "get_ops",
]


def get_ops(name: str) -> SimpleNamespace:
    """The op set behind ``model.kernels``: modulate, gated_residual, residual_modulate, flow_loss."""
    if name == "ref":
        return SimpleNamespace(
            modulate=adaln_modulate_ref,
            gated_residual=gated_residual_ref,
            residual_modulate=residual_adaln_modulate_ref,
            flow_loss=flow_loss_ref,
        )
    if name == "triton":
        raise NotImplementedError("model.kernels=triton: the Triton kernels are not built yet")
    raise ValueError(f"model.kernels={name!r} is not one of ref, triton")
