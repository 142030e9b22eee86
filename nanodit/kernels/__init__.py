"""Fused ops of the DiT hot path, each beside its pure-PyTorch ``*_ref`` twin.

``get_ops("ref" | "triton")`` returns the namespace the model calls; model code never imports Triton.
Importing this package does not import Triton either: the Triton modules (``adaln``, ``residual``,
``flow_loss``) load on first ``get_ops("triton")``, so ``TRITON_INTERPRET=1`` can still be set before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import torch.nn as nn
import torch.nn.functional as F

from nanodit.kernels.ref import (
    adaln_modulate_ref,
    branch_dtype,
    flow_loss_ref,
    gated_residual_layer_norm_ref,
    gated_residual_ref,
    residual_adaln_modulate_ref,
)

__all__ = [
    "adaln_modulate_ref",
    "branch_dtype",
    "flow_loss_ref",
    "gated_residual_layer_norm_ref",
    "gated_residual_ref",
    "residual_adaln_modulate_ref",
    "get_ops",
    "no_weight_casts",
]


@contextlib.contextmanager
def no_weight_casts(layers: Sequence[nn.Linear]) -> Iterator[None]:
    """The ref ops' stand-in for ``linear.autocast_weights``: autocast casts each layer's weights itself."""
    yield


def get_ops(name: str) -> SimpleNamespace:
    """The op set behind ``model.kernels``: modulate, gated_residual, residual_modulate, residual_norm (the
    gated residual and the cross-attention's affine LayerNorm), linear (the token-wise linear layers: ``F.linear``
    with the bias gradient as one matrix-vector product), autocast_weights (a context in which those layers take
    their autocast weight copies from one pass), flow_loss."""
    if name == "ref":
        return SimpleNamespace(
            modulate=adaln_modulate_ref,
            gated_residual=gated_residual_ref,
            residual_modulate=residual_adaln_modulate_ref,
            residual_norm=gated_residual_layer_norm_ref,
            linear=F.linear,
            autocast_weights=no_weight_casts,
            flow_loss=flow_loss_ref,
        )
    if name == "triton":
        try:
            from nanodit.kernels.adaln import (
                adaln_modulate,
                gated_residual_layer_norm,
                residual_adaln_modulate,
            )
            from nanodit.kernels.flow_loss import flow_loss
            from nanodit.kernels.linear import autocast_weights, linear
            from nanodit.kernels.residual import gated_residual
        except ImportError as e:  # no triton package on this machine
            raise ValueError(f"model.kernels=triton needs the triton package ({e}); use kernels=ref") from e
        return SimpleNamespace(
            modulate=adaln_modulate,
            gated_residual=gated_residual,
            residual_modulate=residual_adaln_modulate,
            residual_norm=gated_residual_layer_norm,
            linear=linear,
            autocast_weights=autocast_weights,
            flow_loss=flow_loss,
        )
    raise ValueError(f"model.kernels={name!r} is not one of ref, triton")


_LAZY = {
    "adaln_modulate": "adaln",
    "residual_adaln_modulate": "adaln",
    "gated_residual_layer_norm": "adaln",
    "gated_residual": "residual",
    "flow_loss": "flow_loss",
    "linear": "linear",
}


def __getattr__(name: str):
    """``from nanodit.kernels import adaln_modulate`` etc. import Triton only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"nanodit.kernels.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'nanodit.kernels' has no attribute {name!r}")
