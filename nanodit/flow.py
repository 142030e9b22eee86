"""Rectified flow: t sampling, interpolation, target, loss, and the Euler sampler with dual guidance.

    x_t = (1 - t) x0 + t eps       (t = 1 is pure noise)
    v*  = eps - x0                 (the velocity the model regresses, MSE)
    sampling integrates dx/dt = v from t = 1 to t = 0 with Euler steps.

Dual guidance (three forward passes, batched): (no DINO, no text), (DINO, no text), (DINO, text):
    v = v_00 + s_d (v_d0 - v_00) + s_t (v_dt - v_d0)
With s_d = s_t = 1 this is the conditional prediction v_dt, and only that pass is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nanodit.data.batch import Batch


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of SD3 / Flux: t' = s t / (1 + (s - 1) t), i.e. logit(t') = logit(t) + ln s.
    s > 1 moves t toward noise (t = 1); s = 1 is the identity; 0 and 1 stay fixed."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_t(
    n: int, mean: float, std: float, generator: torch.Generator, device, shift: float = 1.0
) -> torch.Tensor:
    """Logit-normal t, then the timestep shift: sigmoid(N(mean + ln shift, std^2)), shape (n,), fp32."""
    z = torch.randn(n, generator=generator, device=device)  # (B,)
    return torch.sigmoid(mean + math.log(shift) + std * z)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    return (1 - tt) * x0 + tt * eps  # (B, C, H, W)


def target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def training_loss(
    model: Callable,
    batch: Batch,
    flow_loss: Callable,
    generator: torch.Generator,
    t_mean: float = 0.0,
    t_std: float = 1.0,
    nbins: int = 10,
    autocast=None,
    t_shift: float = 1.0,
):
    """One flow-matching loss on a batch. Returns (loss, stats) where stats hold per-t-bin sums and counts.

    ``flow_loss`` is the op of ``model.kernels`` (reference or fused): per-sample MSE of v to eps - x0.
    """
    x0 = batch.latent.float()  # (B, C, H, W)
    B = x0.shape[0]
    t = sample_t(B, t_mean, t_std, generator, x0.device, t_shift)  # (B,)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)  # (B, C, H, W)
    x_t = interpolate(x0, eps, t)  # (B, C, H, W)
    with autocast if autocast is not None else torch.autocast(x0.device.type, enabled=False):
        v = model(x_t, t, batch.dino, batch.t5, batch.t5_mask, batch.drop_dino, batch.drop_text)
    per_sample, bin_sum, bin_count = flow_loss(v, x0, eps, t, None, nbins)
    return per_sample.mean(), {"bin_sum": bin_sum, "bin_count": bin_count}


def conditioned_passes(
    model: Callable, x: torch.Tensor, t: torch.Tensor, dino, t5, t5_mask, drops: tuple[tuple[bool, bool], ...]
) -> tuple[torch.Tensor, ...]:
    """The velocity of the same inputs under several conditionings, in ONE batched forward.
    ``drops[i] = (drop_dino, drop_text)``; returns one fp32 (B, C, H, W) velocity per entry, in order."""
    B, k = x.shape[0], len(drops)
    flags = torch.tensor(drops, dtype=torch.bool, device=x.device)  # (k, 2)
    v = model(
        x.repeat(k, 1, 1, 1),
        t.repeat(k),
        dino.repeat(k, 1),
        t5.repeat(k, 1, 1),
        t5_mask.repeat(k, 1),
        flags[:, 0].repeat_interleave(B),  # (kB,)
        flags[:, 1].repeat_interleave(B),
    )  # (kB, C, H, W)
    return v.float().chunk(k)


def guided_velocity(
    model: Callable,
    x: torch.Tensor,
    t: torch.Tensor,
    dino,
    t5,
    t5_mask,
    s_dino: float = 1.0,
    s_text: float = 1.0,
) -> torch.Tensor:
    """Dual-guidance velocity; the needed passes run as one batch."""
    if s_dino == 1.0 and s_text == 1.0:
        return model(x, t, dino, t5, t5_mask)
    v00, vd0, vdt = conditioned_passes(
        model, x, t, dino, t5, t5_mask, ((True, True), (False, True), (False, False))
    )  # 3 x (B, C, H, W): (0,0), (d,0), (d,t)
    return v00 + s_dino * (vd0 - v00) + s_text * (vdt - vd0)


@torch.no_grad()
def sample_euler(
    model: Callable,
    noise: torch.Tensor,
    dino,
    t5,
    t5_mask,
    steps: int = 50,
    s_dino: float = 1.0,
    s_text: float = 1.0,
    autocast=None,
    shift: float = 1.0,
) -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 with ``steps`` Euler steps. Returns x0 estimates (fp32).
    ``shift`` > 1 spaces the steps by the timestep shift (``shift_t``): more of them near t = 1, where
    the layout is decided (SD3 / Flux sample with the shift they train with)."""
    x = noise.float()  # (B, C, H, W)
    ts = shift_t(torch.linspace(1.0, 0.0, steps + 1, device=x.device), shift)  # (steps + 1,)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])  # (B,)
        with autocast if autocast is not None else torch.autocast(x.device.type, enabled=False):
            v = guided_velocity(model, x, t, dino, t5, t5_mask, s_dino, s_text)
        x = x + (ts[i + 1] - ts[i]) * v.float()
    return x
