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


def draw_noise(
    batch: Batch, generator: torch.Generator, t_mean: float = 0.0, t_std: float = 1.0, t_shift: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training step's (t (B,), eps (B, C, H, W)), both fp32, drawn from ``generator`` in this order."""
    x = batch.latent
    t = sample_t(x.shape[0], t_mean, t_std, generator, x.device, t_shift)  # (B,)
    eps = torch.randn(x.shape, generator=generator, device=x.device)  # (B, C, H, W)
    return t, eps


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
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """One flow-matching loss on a batch. Returns (loss, stats) where stats hold per-t-bin sums and counts.

    ``flow_loss`` is the op of ``model.kernels`` (reference or fused): per-sample MSE of v to eps - x0.
    ``noise``: (t, eps) drawn beforehand by ``draw_noise`` (the CUDA-graph step draws them outside its graph);
    None draws them here, from ``generator``, the same way.
    """
    x0 = batch.latent.float()  # (B, C, H, W)
    t, eps = noise if noise is not None else draw_noise(batch, generator, t_mean, t_std, t_shift)
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
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 with ``steps`` Euler steps. Returns x0 estimates (fp32).
    ``shift`` > 1 spaces the steps by the timestep shift (``shift_t``): more of them near t = 1, where
    the layout is decided (SD3 / Flux sample with the shift they train with). ``cuda_graph`` (CUDA inputs): the
    velocity is captured once as a CUDA graph and replayed at every step, the same kernels without the launch
    cost (an eager model at validation batch sizes is bound by it); where capture fails, eager."""
    x = noise.float()  # (B, C, H, W)
    ts = shift_t(torch.linspace(1.0, 0.0, steps + 1, device=x.device), shift)  # (steps + 1,)

    def velocity(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        with autocast if autocast is not None else torch.autocast(x_.device.type, enabled=False):
            return guided_velocity(model, x_, t_, dino, t5, t5_mask, s_dino, s_text).float()

    if cuda_graph and x.is_cuda and steps > 1:
        velocity = graphed(velocity, x, ts[0].expand(x.shape[0]).clone())
    for i in range(steps):
        t = ts[i].expand(x.shape[0])  # (B,)
        x = x + (ts[i + 1] - ts[i]) * velocity(x, t)
    return x


def graphed(fn: Callable, *example: torch.Tensor) -> Callable:
    """``fn(*tensors) -> tensor`` (device work only) as a CUDA graph replayed on static copies of its inputs; the
    result is a fresh tensor each call. Warmed up once on a side stream (torch's recipe). ``fn`` itself where
    capture fails (an op that cannot be captured)."""
    static = [e.clone() for e in example]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn(*static)
    except Exception:
        return fn

    def replay(*args: torch.Tensor) -> torch.Tensor:
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return out.clone()

    return replay
