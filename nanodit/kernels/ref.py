"""Pure-PyTorch reference ops: the spec, the CPU path, the test oracle and the benchmark baseline.

Shapes: x, y (B, T, D); shift, scale, gate (B, D), broadcast over the T tokens of a sample.
LayerNorm has no affine parameters (adaLN-Zero supplies them) and eps=1e-6; statistics are fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LN_EPS = 1e-6


def branch_dtype(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of a branch input h made from x (modulated or normalised): under autocast, outside torch.compile,
    the autocast dtype, which is what the linear layer reading h casts it to (the op then stores h once in that
    dtype instead of writing fp32 for the layer to cast: the same values, less traffic and no cast kernel);
    otherwise ``dtype`` (default x's). Inside a torch.compile trace h keeps that dtype (Inductor fuses the layer's
    cast)."""
    dev = x.device.type
    if torch.compiler.is_compiling() or not torch.is_autocast_enabled(dev):
        return dtype or x.dtype
    return torch.get_autocast_dtype(dev)


def adaln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = LayerNorm(x) * (1 + scale[b]) + shift[b], in x's dtype (under autocast the autocast dtype:
    ``branch_dtype``)."""
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=LN_EPS)  # (B, T, D)
    y = h * (1 + scale.float()[:, None, :]) + shift.float()[:, None, :]  # (B, T, D)
    return y.to(branch_dtype(x))


def gated_residual_ref(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate[b] * y."""
    return x + gate[:, None, :] * y  # (B, T, D)


def residual_adaln_modulate_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block boundary: x' = x + gate[b] * y (gate None: x + y), h = adaln_modulate(x', shift, scale)."""
    x_new = x + y if gate is None else gated_residual_ref(x, gate, y)  # (B, T, D)
    return x_new, adaln_modulate_ref(x_new, shift, scale)


def gated_residual_layer_norm_ref(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-LN of the cross-attention after the self-attention's residual: x' = x + gate[b] * y,
    h = LayerNorm(x') * weight + bias (an affine LayerNorm, eps=1e-6: ``nn.LayerNorm(D, eps=1e-6)``); h in
    ``branch_dtype(x')`` (autocast's LayerNorm computes it in fp32, the next linear layer casts it)."""
    x_new = gated_residual_ref(x, gate, y)  # (B, T, D)
    h = F.layer_norm(x_new, (x.shape[-1],), weight, bias, LN_EPS)  # (B, T, D)
    return x_new, h.to(branch_dtype(x_new))


def flow_loss_ref(
    v: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor | None = None,
    nbins: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample flow-matching MSE to the target eps - x0, and per-t-bin sums for logging.

    v, x0, eps: (B, ...) any float dtype; t: (B,) in [0, 1]; weight: (B,) or None.
    Returns (per_sample (B,) fp32 [weighted], bin_sum (nbins,) fp32 [unweighted, no grad],
    bin_count (nbins,) fp32). Only v receives a gradient.
    """
    err = v.float() - (eps.float() - x0.float())  # (B, ...)
    per_sample = err.flatten(1).pow(2).mean(1)  # (B,)
    with torch.no_grad():
        idx = (t.float() * nbins).long().clamp_(0, nbins - 1)  # (B,)
        bin_sum = torch.zeros(nbins, device=v.device).index_add_(0, idx, per_sample.detach())
        bin_count = torch.zeros(nbins, device=v.device).index_add_(0, idx, torch.ones_like(per_sample))
    if weight is not None:
        per_sample = per_sample * weight.float()
    return per_sample, bin_sum, bin_count
